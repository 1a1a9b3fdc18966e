"""Reward statistics shared by every process, so each rank normalises and decides alike."""

from __future__ import annotations


def gather_floats(values: list[float]) -> tuple[list[float], slice]:
    """``values`` from every process concatenated in rank order, and where this process's own sit in them
    (the list itself and all of it outside torch.distributed).

    TRL calls each reward function once per generation batch on every process with that process's completions,
    so the collective is matched; values are Python floats (NaN stands for a missing reward)."""
    import torch.distributed as dist

    values = [float(v) for v in values]
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values, slice(0, len(values))
    parts: list[list[float] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, values)
    start = sum(len(p) for p in parts[: dist.get_rank()])
    return [v for part in parts for v in part], slice(start, start + len(values))
