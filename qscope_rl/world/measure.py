"""The world's regime, measured on its LM's own samples: failure rates, the task reward's indifference,
and how far the script judge and lingua see the switches the lexicon's ground truth finds.

Every sample is judged three ways for code-switching: the world's lexicon (ground truth, `lexicon_judge`),
the Unicode-script judge and lingua (`qscope_rl.judges`); loops by the loop detector. The judged samples go
to samples.jsonl beside the world, the rates into stats.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import judges
from .corpus import LANGS
from .model import sample
from .task import answer_of


def judge_sample(world, completion: str, lang: str, topic: str) -> dict:
    """One completion judged: ground-truth languages, script and lingua verdicts, loop, task reward."""
    foreign = world.judge.foreign(completion, lang)
    answer = answer_of(completion)
    units = judges.units(completion)
    start = judges.loop_start(units)
    answer_units = len(judges.units(answer)) if answer is not None else None
    switch_in_answer = answer is not None and bool(world.judge.foreign(answer, lang))
    return {
        "code_switch": bool(foreign),
        "switch_languages": foreign,
        "switch_in_answer": switch_in_answer,
        "script_code_switch": judges.script_code_switch(completion, lang),
        "lingua_code_switch": judges.lingua_code_switch(completion, lang),
        "loop": start is not None,
        # a loop "after the answer" starts once the answer sentence is complete
        "loop_after_answer": start is not None and answer_units is not None and start >= answer_units,
        "task_reward": world.task_reward(completion, topic),
    }


def _rate(rows: list[dict], key: str) -> float:
    return sum(bool(r[key]) for r in rows) / len(rows) if rows else float("nan")


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def measure_samples(world, model, tokenizer, prompts, ev, out: Path | None = None) -> dict:
    """Sample `ev.samples_per_prompt` completions of the first `ev.n_prompts_per_lang` prompts of each
    language, judge them, write samples.jsonl to `out`, and return the regime's rates."""
    chosen = [p for lang in LANGS for p in [q for q in prompts if q.lang == lang][: ev.n_prompts_per_lang]]
    chosen = chosen * ev.samples_per_prompt
    completions = sample(model, tokenizer, [p.text for p in chosen], ev.max_new_tokens, ev.temperature, ev.seed,
                         batch_size=128)
    judged = [{**p.to_dict(), "completion": c, **judge_sample(world, c, p.lang, p.topic)}
              for p, c in zip(chosen, completions)]
    if out is not None:
        (Path(out) / "samples.jsonl").write_text(
            "".join(json.dumps(j, ensure_ascii=False) + "\n" for j in judged), encoding="utf-8")
    return regime_rates(judged)


def regime_rates(judged: list[dict]) -> dict:
    """The regime's numbers from judged samples (see `judge_sample`)."""
    rates = {"n_samples_per_lang": len(judged) // len(LANGS)}
    for lang in LANGS:
        mine = [j for j in judged if j["lang"] == lang]
        rates[f"code_switch_rate_{lang}"] = _rate(mine, "code_switch")
        for other in LANGS:
            if other != lang:
                rates[f"code_switch_rate_{lang}_to_{other}"] = sum(other in j["switch_languages"]
                                                                   for j in mine) / len(mine)
        rates[f"loop_rate_{lang}"] = _rate(mine, "loop")
    rates["loop_rate"] = _rate(judged, "loop")
    # the same-script pair: what the script judge and lingua see of the ground-truth switches to Spanish
    en = [j for j in judged if j["lang"] == "en"]
    to_es = [j for j in en if j["switch_languages"] == ["es"]]
    clean = [j for j in en if not j["code_switch"]]
    rates["script_recall_en_to_es"] = _rate(to_es, "script_code_switch")
    rates["lingua_recall_en_to_es"] = _rate(to_es, "lingua_code_switch")
    rates["lingua_false_positive_rate_en"] = _rate(clean, "lingua_code_switch")
    # indifference of the task reward: what failing samples earn beside clean ones
    rates["topic_reward_mean"] = _mean([j["task_reward"] for j in judged])
    switched, looped = [j for j in judged if j["code_switch"]], [j for j in judged if j["loop"]]
    ok = [j for j in judged if not j["code_switch"] and not j["loop"]]
    for name, rows in (("clean", ok), ("switch", switched), ("loop", looped)):
        rates[f"task_reward_{name}"] = _mean([j["task_reward"] for j in rows])
    rates["switch_after_answer_share"] = 1 - _rate(switched, "switch_in_answer") if switched else None
    rates["loop_after_answer_share"] = _rate(looped, "loop_after_answer") if looped else None
    return rates


# The regime the default world is built to reproduce (issue 16), fixed before it was measured. Each claim is
# (key in stats, low, high); `regime_checks` reports every one, met or not. The test world is not meant to
# meet them (it only has to show every failure mode to the tests).
REGIME_CLAIMS = (
    ("code_switch_rate_en", 0.01, 0.05, "rare code-switching: the untrained policy's English samples switch at 1-5%"),
    ("loop_rate_en", 0.01, 0.05, "rare loops: its English samples loop at 1-5%"),
    ("switch_after_answer_share", 0.5, 1.0, "most switches come after the answer sentence the task reward reads"),
    ("loop_after_answer_share", 0.8, 1.0, "loops come after the answer sentence"),
    ("script_recall_en_to_es", 0.0, 0.0, "the script judge cannot see an English -> Spanish switch"),
    ("lingua_false_positive_rate_en", 0.001, 1.0, "lingua is fallible on clean English samples"),
    ("d_sae", 4096, float("inf"), "an SAE of at least 4,096 features"),
    ("sae_fvu", 0.0, 0.15, "SAE FVU <= 0.15"),
    ("sae_dead_fraction", 0.0, 0.10, "SAE dead latents <= 10%"),
    ("build_cpu_seconds", 0.0, 600.0, "builds in <= 5 minutes on 2 cores (<= 600 CPU-seconds)"),
)


def regime_checks(stats: dict) -> list[dict]:
    """Every regime claim against the world's stats: {key, claim, measured, low, high, met}."""
    out = []
    for key, low, high, claim in REGIME_CLAIMS:
        value = stats.get(key)
        met = value is not None and low <= value <= high
        out.append({"key": key, "claim": claim, "measured": value, "low": low, "high": high, "met": met})
    return out
