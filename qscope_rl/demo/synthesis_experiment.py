"""Synthesis on the demo world: the setting, the data-efficiency measure and the downstream experiment.

The report's claim (Qwen-Scope, point 3): data aimed at the features a dataset never activates covers them
(99.74% at a matched budget) and trains a better model than more real data or random synthetic data
(4k real + 4k targeted beat 8k real and 4k real + 4k random on safety). The world's version, fixed up front:

- real data: ``n_real`` training documents, most in English and ``tail_share`` of them in the tail language
  (Chinese), topics balanced: real data are thin on some part of the domain;
- domain: the features alive on reference held-out documents of the tail language; targets = domain features the
  real data never activate;
- targeted: ``synthesize`` (context + steering, the whole-prefix contexts of the reference texts); unguided /
  random: plain samples prompted by random prefixes of the same reference texts (the same information, no aim);
- downstream model: a TF-IDF + logistic topic classifier (independent of the SAE), trained on real, twice the
  real, real + targeted, real + random (the same number of synthetic texts, their completions only, labelled by
  the world's topic judge), judged on other held-out documents of the tail language (the long tail), macro-F1
  with paired bootstrap intervals over the test documents.
"""

from __future__ import annotations

import random
from collections import Counter

import torch


def judged_topic(world, text: str) -> str | None:
    """The topic whose vocabulary, in any of the world's languages, makes up most of ``text``; None if none."""
    best, share = None, 0.0
    for topic, by_lang in world.topic_vocab.items():
        for lang in by_lang:
            s = world.topic_share(text, topic, lang)
            if s > share:
                best, share = topic, s
    return best


def synthesis_setting(world, n_real: int = 64, tail_share: float = 0.125, tail_lang: str = "zh",
                      main_lang: str = "en", seed: int = 0) -> dict:
    """Real (and twice-real) training documents, reference texts and the long-tail test documents."""
    rng = random.Random(seed)
    train = [d for d in world.documents("train") if d.switch_char is None and d.loop_char is None]
    n_tail = max(1, round(tail_share * n_real))

    def draw(lang: str, n: int) -> list:
        docs = [d for d in train if d.lang == lang]
        by_topic = {t: [d for d in docs if d.topic == t] for t in world.topics}
        for v in by_topic.values():
            rng.shuffle(v)
        out, i = [], 0
        while len(out) < n:  # round robin over topics: balanced
            t = world.topics[i % len(world.topics)]
            if by_topic[t]:
                out.append(by_topic[t].pop())
            i += 1
        return out

    main, tail = draw(main_lang, 2 * (n_real - n_tail)), draw(tail_lang, 2 * n_tail)
    real = main[: n_real - n_tail] + tail[:n_tail]
    twice = real + main[n_real - n_tail:] + tail[n_tail:]
    held = [d for d in world.documents("heldout") if d.lang == tail_lang]
    rng.shuffle(held)
    half = len(held) // 2
    return {"real": real, "twice_real": twice, "reference": [d.text for d in held[:half]][:300],
            "tail_test": held[half:][:300]}


def _tfidf_topic_model(texts: list[str], labels: list[str]):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), sublinear_tf=True),
                         LogisticRegression(max_iter=2000)).fit(texts, labels)


def downstream(world, setting: dict, arms: dict[str, list[str]], *, boot: int = 1000, seed: int = 0) -> dict:
    """Macro-F1 on the long-tail test set of the topic classifier trained on each arm's texts.

    ``arms``: {name: synthetic texts added to the real data} (an empty list: the real data alone); "twice_real"
    is added here. Synthetic texts are labelled by the world's topic judge (unlabelled ones are dropped).
    Returns per arm: F1, its 95% bootstrap interval, the training size, for a synthetic arm its texts' judged topics
    counted ({topic: n}, ``synthetic_topics``); and the bootstrap distribution's
    paired differences are available through ``gain_interval``.
    """
    from qscope_rl.features.classifier import macro_f1

    real = [(d.text, d.topic) for d in setting["real"]]
    sets = {"real": real, "twice_real": [(d.text, d.topic) for d in setting["twice_real"]]}
    synthetic_topics = {}
    for name, texts in arms.items():
        labelled = [(t, judged_topic(world, t)) for t in texts if t.strip()]
        sets[name] = real + [(t, y) for t, y in labelled if y is not None]
        # how balanced the added classes are: macro-F1 weighs every topic alike
        synthetic_topics[name] = dict(Counter(y for _, y in labelled if y is not None))
    test = setting["tail_test"]
    truth = [d.topic for d in test]
    classes = sorted(world.topics)
    preds = {name: list(_tfidf_topic_model([t for t, _ in data], [y for _, y in data]).predict([d.text for d in test]))
             for name, data in sets.items()}
    rng = torch.Generator().manual_seed(seed)
    samples = torch.randint(len(test), (boot, len(test)), generator=rng)
    dist = {name: torch.tensor([macro_f1([truth[i] for i in s], [p[i] for i in s], classes) for s in samples.tolist()])
            for name, p in preds.items()}
    out = {}
    for name, p in preds.items():
        lo, hi = dist[name].quantile(torch.tensor([0.025, 0.975], dtype=dist[name].dtype)).tolist()
        out[name] = {"f1": macro_f1(truth, p, classes), "ci": [lo, hi], "n_train": len(sets[name])}
        if name in synthetic_topics:
            out[name]["synthetic_topics"] = synthetic_topics[name]
    out["_bootstrap"] = dist
    return out


def gain_interval(result: dict, arm: str, against: list[str]) -> dict:
    """F1(arm) - max over ``against`` of F1, with its paired 95% bootstrap interval."""
    dist = result["_bootstrap"]
    best = max(against, key=lambda a: result[a]["f1"])
    diff = dist[arm] - dist[best]
    lo, hi = diff.quantile(torch.tensor([0.025, 0.975], dtype=diff.dtype)).tolist()
    return {"gain": result[arm]["f1"] - result[best]["f1"], "ci": [lo, hi], "against": best}
