"""Statistics of the main job: bootstrap intervals over prompts and seeds, ratios, sample efficiency, and power.

A policy's held-out measurement is a matrix (seeds, prompts) of per-prompt means (each prompt sampled
several times). An interval resamples seeds and prompts with replacement (the same prompt draw for every
arm, so arms compared on one draw are paired over prompts) and takes the 2.5th and 97.5th percentiles.
"""

from __future__ import annotations

import math

import numpy as np


def bootstrap_draws(n_seeds: int, n_prompts: int, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Index draws (n_boot, n_seeds) over seeds and (n_boot, n_prompts) over prompts, shared by every arm."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_seeds, (n_boot, n_seeds)), rng.integers(0, n_prompts, (n_boot, n_prompts))


def resampled_means(matrix: np.ndarray, draws: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Mean of `matrix` (seeds, prompts) under each bootstrap draw: (n_boot,)."""
    seed_idx, prompt_idx = draws
    matrix = np.asarray(matrix, dtype=float)
    if matrix.ndim != 2:
        raise ValueError(f"a measurement must be a (seeds, prompts) matrix, got shape {matrix.shape}")
    seed_idx = seed_idx % matrix.shape[0]  # the untrained policy may have fewer seeds than the arms
    by_prompt = matrix[seed_idx].mean(1)  # (n_boot, prompts): the seed draw averaged
    return np.take_along_axis(by_prompt, prompt_idx, axis=1).mean(1)


def interval(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return (math.nan, math.nan)
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return float(lo), float(hi)


def summarize(matrix: np.ndarray, draws) -> dict:
    """{"mean", "ci": [lo, hi], "per_seed": [...]} of a (seeds, prompts) matrix."""
    matrix = np.asarray(matrix, dtype=float)
    return {"mean": float(matrix.mean()), "ci": list(interval(resampled_means(matrix, draws))),
            "per_seed": [float(v) for v in matrix.mean(1)]}


def ratio(numerator: np.ndarray, denominator: np.ndarray, draws) -> dict:
    """numerator / denominator of two policies' means, with its bootstrap interval (paired prompt draws)."""
    num, den = resampled_means(numerator, draws), resampled_means(denominator, draws)
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(num > 0, np.inf, np.nan))
    point_den = float(np.mean(denominator))
    point = float(np.mean(numerator)) / point_den if point_den > 0 else (math.inf if np.mean(numerator) else math.nan)
    return {"value": point, "ci": list(interval(boot))}


def moving_average(values, window: int) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if window <= 1 or len(values) == 0:
        return values
    cumsum = np.cumsum(np.insert(values, 0, 0.0))
    out = np.empty_like(values)
    for i in range(len(values)):  # trailing window, shorter at the start
        lo = max(0, i + 1 - window)
        out[i] = (cumsum[i + 1] - cumsum[lo]) / (i + 1 - lo)
    return out


def half_step(curves: list[list[float]], baseline: list[list[float]], window: int = 10) -> int | None:
    """First GRPO step (1-based) at which an arm's rollout rate (mean over seeds, trailing moving average)
    is at most half of the baseline arm's at the same step; None if it never is."""
    if not curves or not baseline:
        return None
    steps = min(min(len(c) for c in curves), min(len(c) for c in baseline))
    if steps == 0:
        return None
    arm = moving_average(np.mean([c[:steps] for c in curves], axis=0), window)
    base = moving_average(np.mean([c[:steps] for c in baseline], axis=0), window)
    hits = np.nonzero((arm <= 0.5 * base) & (base > 0))[0]
    return int(hits[0]) + 1 if len(hits) else None


def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return not (a[1] < b[0] or b[1] < a[0])


# Power (benchmarks/demo_power.py): with n seeds per arm, the log of two arms' mean ratio has a standard error of about
# sqrt(2 / n) * CV (delta method; CV the between-seed coefficient of variation of one arm's rate). A planning
# figure: it treats seeds as the only unit, where the report's intervals also resample prompts.
_Z = 1.959963984540054 + 0.8416212335729143  # two-sided 5% level, 80% power


def pooled_cv(per_seed: list[list[float]]) -> float:
    """Root mean square over arms of each arm's between-seed CV (sd with ddof 1 / mean); all-zero arms skipped."""
    cvs = []
    for values in per_seed:
        values = np.asarray(values, dtype=float)
        if len(values) < 2:
            raise ValueError(f"a between-seed CV needs at least two seeds per arm, got {len(values)}")
        if values.mean() > 0:
            cvs.append(values.std(ddof=1) / values.mean())
    return float(np.sqrt(np.mean(np.square(cvs)))) if cvs else math.nan


def seeds_needed(cv: float, ratio: float) -> int:
    """Seeds per arm to resolve a true ratio of two arms' rates (80% power, 5% level)."""
    if not 0 < ratio < 1:
        raise ValueError(f"the ratio to resolve must be in (0, 1), got {ratio}")
    return math.ceil(2 * cv ** 2 * _Z ** 2 / math.log(ratio) ** 2 - 1e-9)


def detectable_ratio(cv: float, seeds: int) -> float:
    """The ratio (< 1) that ``seeds`` per arm resolve with 80% power at the 5% level."""
    return math.exp(-_Z * cv * math.sqrt(2 / seeds))
