"""Held-out measurement of one policy on the demo world: per-prompt rates by the ground-truth judges.

Each held-out prompt is sampled `samples_per_prompt` times; the result holds, per measure, the per-prompt
mean (so `demo_stats` can bootstrap over prompts). Code-switching is judged by the world's lexicon (per
target language: "zh" is also what a script judge sees, "es" is what it cannot), loops by the loop
detector, the task by the world's reward.
"""

from __future__ import annotations

import numpy as np

from qscope_rl import judges
from qscope_rl.world.model import sample

MEASURES = ("code_switch_rate", "code_switch_rate_zh", "code_switch_rate_es", "loop_rate", "task_reward")


def measure_policy(world, model, prompts, samples_per_prompt: int, max_new_tokens: int, temperature: float,
                   seed: int, batch_size: int = 128) -> dict[str, list[float]]:
    """{measure: per-prompt means} of `model`'s samples on `prompts` (each sampled n times)."""
    texts = [p.text for p in prompts] * samples_per_prompt
    completions = sample(model, world.tokenizer, texts, max_new_tokens, temperature, seed=seed, batch_size=batch_size)
    meta = list(prompts) * samples_per_prompt
    rows = {m: np.zeros((samples_per_prompt, len(prompts))) for m in MEASURES}
    for i, (c, p) in enumerate(zip(completions, meta)):
        s, j = divmod(i, len(prompts))
        foreign = world.judge.foreign(c, p.lang)
        rows["code_switch_rate"][s, j] = bool(foreign)
        rows["code_switch_rate_zh"][s, j] = "zh" in foreign
        rows["code_switch_rate_es"][s, j] = "es" in foreign
        rows["loop_rate"][s, j] = judges.has_loop(c)
        rows["task_reward"][s, j] = world.task_reward(c, p.topic)
    return {m: rows[m].mean(0).tolist() for m in MEASURES}
