"""Controllable inference: generate with SAE features amplified or suppressed, and measure what it costs.

Builds on ``qscope_rl.tools.steering.steer`` (the context manager that adds ``alpha * d_j`` or clamps a feature)
with what a steering session needs around it:

- strengths relative to a feature's typical activation: the Qwen-Scope demo's presets light / medium /
  strong = 0.5x / 2x / 10x the contrastive activation difference (mean activation on positive minus
  negative texts, as a feature pack records it); a leading "-" suppresses;
- ``generate``: batched, seeded sampling with any HF causal LM (left padding, completions only);
- ``perplexity``: the unsteered model's perplexity on (steered) completions, the fluency cost that
  AxBench finds additive steering pays at large alpha.

    pack = FeaturePack.load("language-zh.json")
    with steer(model, sae, relative_strengths(pack, "-medium", top=8)):
        completions = generate(model, tokenizer, prompts)
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from qscope_rl.features.feature_pack import FeaturePack

from .steering import MODES, steer

__all__ = ["MODES", "PRESETS", "contrastive_scale", "generate", "merge_strengths", "parse_strength", "perplexity",
           "relative_strengths", "steer"]

# Qwen-Scope demo: multiples of the feature's contrastive activation difference.
PRESETS = {"light": 0.5, "medium": 2.0, "strong": 10.0}
_RELATIVE = re.compile(r"^([+-]?)(?:(light|medium|strong)|(\d+(?:\.\d+)?)x)$")


def parse_strength(strength: float | str) -> tuple[float, bool]:
    """(value, relative): ``-3.5`` -> (-3.5, False); ``"-strong"`` -> (-10.0, True); ``"4x"`` -> (4.0, True)."""
    bad = ValueError(f"bad steering strength {strength!r}: give a finite number (raw alpha), a preset "
                     f"{'/'.join(PRESETS)} (optionally with a leading '-' to suppress) or a multiple like '4x' / "
                     f"'-0.5x'")
    if isinstance(strength, (int, float)) and not isinstance(strength, bool):
        value, relative = float(strength), False
    else:
        text = str(strength).strip().lower()
        match = _RELATIVE.match(text)
        if match:
            sign = -1.0 if match[1] == "-" else 1.0
            return sign * (PRESETS[match[2]] if match[2] else float(match[3])), True
        try:
            value, relative = float(text), False
        except ValueError:
            raise bad from None
    if not math.isfinite(value):  # a NaN or infinite alpha turns every later logit into NaN
        raise bad
    return value, relative


def contrastive_scale(pack: FeaturePack, features: Iterable[int] | None = None) -> dict[int, float]:
    """Each feature's contrastive activation difference, mean_act_pos - mean_act_neg (the presets' unit)."""
    wanted = None if features is None else {int(i) for i in features}
    scales = {}
    for f in pack.features:
        if wanted is not None and f.id not in wanted:
            continue
        if "mean_act_pos" not in f.stats or "mean_act_neg" not in f.stats:
            raise ValueError(f"feature pack {pack.name!r}: feature {f.id} has no mean_act_pos / mean_act_neg "
                             f"stats, so relative strengths cannot be computed for it")
        scales[f.id] = f.stats["mean_act_pos"] - f.stats["mean_act_neg"]
    return scales


def relative_strengths(pack: FeaturePack, strength: float | str, *, top: int | None = None,
                       features: Iterable[int] | None = None) -> dict[int, float]:
    """``{feature: alpha}`` for a pack's features (the first ``top``, or the ids in ``features``).

    A preset / multiple ("strong", "-2x") scales each feature by its own contrastive activation difference;
    a plain number is used as the raw alpha for every feature.
    """
    value, relative = parse_strength(strength)
    listed = [f.id for f in pack.features]
    ids = listed[:top] if features is None else [int(i) for i in features]
    unknown = [i for i in ids if i not in listed]
    if unknown:
        raise ValueError(f"features {unknown} are not in feature pack {pack.name!r} (it lists {listed})")
    if not ids:
        raise ValueError(f"feature pack {pack.name!r} gives no features to steer")
    scales = contrastive_scale(pack, ids) if relative else dict.fromkeys(ids, 1.0)
    return {i: value * scales[i] for i in ids}


def sampling_kwargs(temperature: float) -> dict:
    """`generate` arguments for pure ancestral sampling at `temperature` (0 = greedy): no top-k / top-p."""
    if not temperature >= 0:  # a negative one would silently decode greedily
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    return dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 \
        else dict(do_sample=False)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 48,
             temperature: float = 1.0, seed: int = 0, batch_size: int = 64, progress: bool = True,
             min_new_tokens: int = 0) -> list[str]:
    """Completions (only) of ``prompts``: batched ``generate`` with left padding, pure ancestral sampling
    (no top-k / top-p; temperature 0 = greedy). Seeded without touching the global RNG, so a steered and
    an unsteered call with the same seed draw the same random numbers. ``min_new_tokens``: no end-of-text
    before that many tokens (``min_new_tokens=max_new_tokens`` makes every call decode the same number of
    steps, as a throughput comparison needs)."""
    if isinstance(prompts, str) or not prompts:
        raise ValueError("generate needs a non-empty list of prompts")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens}")
    sampling = sampling_kwargs(temperature) | ({"min_new_tokens": min_new_tokens} if min_new_tokens else {})
    _check_context(model, tokenizer, prompts, max_new_tokens)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # decoder-only models generate from the left
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for i in tqdm(range(0, len(prompts), batch_size), desc="generate", leave=False, disable=not progress):
                enc = tokenizer(list(prompts[i:i + batch_size]), return_tensors="pt", padding=True).to(device)
                ids = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=pad,
                                     eos_token_id=tokenizer.eos_token_id, **sampling)
                out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def _check_context(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int) -> None:
    """Refuse prompts that with ``max_new_tokens`` pass the model's context (they would crawl past it, not fail)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    lengths = [len(ids) for ids in tokenizer(list(prompts))["input_ids"]]
    too_long = [(i, n) for i, n in enumerate(lengths) if n + max_new_tokens > limit]
    if too_long:
        i, n = too_long[0]
        raise ValueError(f"prompt {i + 1} ({prompts[i][:40]!r}...) is {n} tokens: with max_new_tokens={max_new_tokens} "
                         f"it passes the model's context of {limit} tokens ({len(too_long)} prompt(s) do); shorten "
                         f"them or lower max_new_tokens")


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, prompts: Sequence[str], completions: Sequence[str], *,
               batch_size: int = 32) -> float:
    """Perplexity of ``model`` (run it unsteered) on the completion tokens given their prompts, pooled over
    all completion tokens. Empty completions are skipped; NaN if nothing is left."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    pairs = [(tokenizer(p)["input_ids"], tokenizer(c, add_special_tokens=False)["input_ids"])
             for p, c in zip(prompts, completions)]
    pairs = [(p, c) for p, c in pairs if c]
    if not pairs:
        return math.nan
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(pairs), batch_size):
        batch = pairs[i:i + batch_size]
        seqs = [p + c for p, c in batch]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        labels = torch.full_like(input_ids, -100)
        for row, ((p, c), s) in enumerate(zip(batch, seqs)):  # right padding; score completion tokens only
            input_ids[row, :len(s)] = torch.tensor(s)
            labels[row, len(p):len(s)] = torch.tensor(c)
        mask = torch.arange(width) < torch.tensor([len(s) for s in seqs])[:, None]
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.long().to(device)).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                labels[:, 1:].flatten().to(device), reduction="sum")
        total += float(nll)
        count += int((labels[:, 1:] != -100).sum())
    return math.exp(total / count)


def merge_strengths(*parts: Mapping[int, float]) -> dict[int, float]:
    """Several ``{feature: alpha}`` maps as one (alphas of a feature listed twice add up)."""
    merged: dict[int, float] = {}
    for part in parts:
        for feature, alpha in part.items():
            merged[int(feature)] = merged.get(int(feature), 0.0) + float(alpha)
    return merged
