"""Amplified sampling on the demo world: are the amplified rollouts the realistic repetitions Qwen-Scope's
RL recipe needs? The vector is the trainer's own (``amplify_alpha`` times the sum of the pack's top decoder
directions, added to the residual after the SAE layer at every position), so the rates measured here are
those of arm (e)'s amplified rollouts on the untrained policy.

`choose_amplification` picks the features and the strength on TRAINING prompts: over the grid of pack x number
of top features x alpha, the least steering (the shortest vector alpha * sum d) whose amplified samples loop in
>= `target` of cases; `amplified_loop_rate` then measures the choice on held-out prompts.
"""

from __future__ import annotations

import torch

from qscope_rl import judges
from qscope_rl.features.feature_pack import FeaturePack
from qscope_rl.hooks import add_to_residual
from qscope_rl.sae.loaders import load_sae
from qscope_rl.world.model import sample

ALPHAS = (10.0, 20.0, 40.0, 80.0, 160.0)  # times unit decoder directions; the residual norm there is about 150
TOP_NS = (1, 2, 4, 8)  # how many of a pack's top features are amplified together
PACKS = ("repetition", "loop")


def amplify_vector(sae, pack: FeaturePack, top_n: int, alpha: float) -> torch.Tensor:
    """alpha * the sum of the top_n features' decoder directions: what SAETrainerMixin adds."""
    return alpha * sae.W_dec[:, pack.top(top_n).ids].sum(-1)


def amplified_samples(world, model, prompts: list[str], vector: torch.Tensor, max_new_tokens: int,
                      temperature: float, seed: int) -> list[str]:
    with add_to_residual(model, world.layer, vector):
        return sample(model, world.tokenizer, prompts, max_new_tokens, temperature, seed=seed)


def amplified_loop_rate(world, prompts, pack_file: str, top_n: int, alpha: float, *, max_new_tokens: int,
                        temperature: float = 1.0, seed: int = 0) -> dict:
    """Loop rate, answer-before-loop share and task reward of amplified samples of the world's model."""
    sae, pack = load_sae(world.sae_dir, layer=world.layer), FeaturePack.load(pack_file)
    vector = amplify_vector(sae, pack, top_n, alpha)
    completions = amplified_samples(world, world.model, [p.text for p in prompts], vector, max_new_tokens,
                                    temperature, seed)
    loops = [judges.has_loop(c) for c in completions]
    rewards = [world.task_reward(c, p.topic) for c, p in zip(completions, prompts)]
    return {"loop_rate": sum(loops) / len(loops), "task_reward": sum(rewards) / len(rewards),
            "n": len(completions), "examples": completions[:3]}


def choose_amplification(world, prompts, pack_files: dict, top_ns=TOP_NS, *, max_new_tokens: int,
                         target: float = 0.8, temperature: float = 1.0, seed: int = 0) -> dict:
    """Of the grid (pack x top_n x alpha), the candidate with the shortest steering vector whose amplified
    samples loop in >= `target` on `prompts` (the most looping one if none does), and the whole grid.

    The least steering that makes rollouts loop keeps them closest to the policy's own distribution: the
    realistic negatives the recipe asks for. Along alpha a candidate only steers harder, so each (pack, top_n)
    stops at its first alpha that reaches the target."""
    sae = load_sae(world.sae_dir, layer=world.layer)
    grid = []
    for name in PACKS:
        pack = FeaturePack.load(pack_files[name])
        for top_n in top_ns:
            for alpha in ALPHAS:
                rate = amplified_loop_rate(world, prompts, pack_files[name], top_n, alpha,
                                           max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
                norm = float(amplify_vector(sae, pack, top_n, alpha).norm())
                grid.append({"pack": name, "top_n": top_n, "alpha": alpha, "norm": norm,
                             "loop_rate": rate["loop_rate"], "task_reward": rate["task_reward"]})
                if rate["loop_rate"] >= target:
                    break
    reached = [g for g in grid if g["loop_rate"] >= target]
    best = min(reached, key=lambda g: g["norm"]) if reached else max(grid, key=lambda g: g["loop_rate"])
    return {"pack": best["pack"], "alpha": best["alpha"], "top_n": best["top_n"], "grid": grid,
            "reached": bool(reached)}
