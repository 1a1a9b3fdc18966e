"""Classification tasks with ground truth in the demo world, measured the way the Qwen-Scope report measures them.

Four tasks, every label read from the corpus's own records (never from the SAE):

- ``topic``: the document's topic (8 classes on today's world);
- ``language``: the document's language (its main language; a switched burst does not change it);
- ``switch``: does the document switch language somewhere ("yes" / "no");
- ``loop``: does the document fall into a repetition loop ("yes" / "no").

Discovery data (seeds) come from the training split, the test set from the held-out split, both balanced
per class (up to ``pool_per_class`` / ``test_per_class`` documents a class, fewer if the world has fewer).
Measures: macro-F1 vs seeds per class for the Qwen-Scope OR rule and the baselines (`few_shot_curve`), and
macro-F1 vs the share of the discovery pool the rule sees (`discovery_share_curve`).
"""

from __future__ import annotations

import random

TASKS = ("topic", "language", "switch", "loop")
SHARE_METHODS = ("sae_rule", "sae_rule_seed_threshold", "sae_rule_cv")  # the rule variants on the share curve


def task_label(task: str, doc) -> str:
    """The ground-truth label of ``doc`` for ``task``."""
    if task == "topic":
        return doc.topic
    if task == "language":
        return doc.lang
    if task == "switch":
        return "yes" if doc.switch_char is not None else "no"
    if task == "loop":
        return "yes" if doc.loop_char is not None else "no"
    raise ValueError(f"unknown classification task {task!r}; expected one of {TASKS}")


def balanced(docs, task: str, per_class: int, rng: random.Random) -> list:
    """Up to ``per_class`` documents of each label (all labels get the size of the smallest, capped)."""
    by_label: dict[str, list] = {}
    for d in docs:
        by_label.setdefault(task_label(task, d), []).append(d)
    if len(by_label) < 2:
        raise ValueError(f"task {task!r}: the documents hold one label only ({list(by_label)})")
    n = min(per_class, *(len(v) for v in by_label.values()))
    return [d for label in sorted(by_label) for d in rng.sample(by_label[label], n)]


def world_task(world, task: str, pool_per_class: int = 160, test_per_class: int = 100, seed: int = 0):
    """(discovery pool, test set) of documents for ``task``, balanced per class."""
    rng = random.Random(seed)
    return (balanced(world.documents("train"), task, pool_per_class, rng),
            balanced(world.documents("heldout"), task, test_per_class, rng))


def world_classification(world, sae, tasks=TASKS, *, seeds=(4, 16, 64), shares=(0.05, 0.1, 0.25, 0.5, 1.0),
                         repeats: int = 3, pool_per_class: int = 160, test_per_class: int = 100,
                         seed: int = 0, progress: bool = True) -> dict:
    """Per task: sizes, the few-shot curve of every method and the rule's discovery-share curve."""
    from qscope_rl.features.text_features import encode_texts
    from qscope_rl.tools.classify import discovery_share_curve, few_shot_curve

    out = {}
    for task in tasks:
        pool, test = world_task(world, task, pool_per_class, test_per_class, seed)
        texts = [d.text for d in pool + test]
        feats = encode_texts(world.model, world.tokenizer, sae, texts, desc=f"classify: {task}", progress=progress)
        train, held = _split(feats, len(pool))
        args = (sae, train, texts[:len(pool)], [task_label(task, d) for d in pool],
                held, texts[len(pool):], [task_label(task, d) for d in test])
        usable = [n for n in seeds if n <= len(pool) // len({task_label(task, d) for d in pool})]
        out[task] = {"classes": sorted({task_label(task, d) for d in pool}), "pool": len(pool), "test": len(test),
                     "curve": few_shot_curve(*args, seeds_per_class=usable, repeats=repeats, seed=seed),
                     "shares": discovery_share_curve(*args, shares=shares, repeats=repeats, seed=seed,
                                                     methods=SHARE_METHODS)}
    return out


def _split(feats, n: int):
    """The first ``n`` texts' TextFeatures and the rest's."""
    from qscope_rl.features.text_features import TextFeatures
    from qscope_rl.sae.autoencoder import SparseActs

    def part(sl):
        return TextFeatures(feats.max_acts[sl], SparseActs(feats.last.values[sl], feats.last.indices[sl]),
                            feats.mean_hidden[sl], feats.n_tokens[sl])

    return part(slice(0, n)), part(slice(n, None))
