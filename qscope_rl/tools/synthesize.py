"""Data synthesis for features a dataset never activates (Qwen-Scope, point 3).

1. ``feature_coverage``: on how many of the dataset's texts each feature fires (max over tokens > 0).
2. ``target_features``: features with zero coverage, optionally only those of a domain: a feature pack,
   explicit ids, or the features alive on reference texts of the domain (dead features can't be reached).
3. ``synthesize``: for each target, generate candidates aimed at it, by prompting with a context of it in the
   reference texts (``"context"``: the tokens just before a token where it fires, the one the model itself
   most likely writes first, among the texts where it fires hardest), by steering
   toward it (``"steer"``: ``h + alpha * d_j`` from a random prompt, alpha = ``strength`` x its typical
   activation), or both. A candidate is prompt + completion, and it is kept only if the unsteered model + SAE
   find the target firing on a GENERATED token (the prompt is context only; copied text never counts). A
   candidate that misses its own target but fires another uncovered target is kept for that one. Candidates are
   generated in rounds, one per still-uncovered target, up to ``per_target`` rounds.
4. ``unguided``: the baseline, plain sampling of random prompts at the same budget; ``random_contexts`` gives it
   the same information the targeted method reads (random prefixes of the reference texts) without the aim.

Both results record coverage after every generated sample (``curve``), so ``samples_to(0.9)`` is the data
efficiency the report means: how many samples a method needs to cover 90% of the targets.

The result is a ``datasets.Dataset`` (text, completion, target_feature, target_activation, strategy, prompt,
round),
saved as JSONL by ``save_jsonl``.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from qscope_rl.features.feature_pack import FeaturePack
from qscope_rl.features.text_features import check_texts, encode_texts, sae_layer
from qscope_rl.hooks import ResidualEdit, capture_residual
from qscope_rl.plots import pyplot, save_figure
from qscope_rl.sae.autoencoder import SparseAutoencoder

from .steered_generation import generate

STRATEGIES = ("context", "steer", "both")


def feature_coverage(model, tokenizer, sae: SparseAutoencoder, texts: Sequence[str], **kwargs) -> Tensor:
    """(d_sae,) number of texts on which each feature fires (max activation over the text's tokens > 0)."""
    texts = check_texts(texts, "dataset")
    return encode_texts(model, tokenizer, sae, texts, desc="synthesize: coverage", **kwargs).fires.sum(0)


def target_features(coverage: Tensor, domain: FeaturePack | Iterable[int] | Tensor | None = None) -> Tensor:
    """Ids of features with zero coverage, restricted to ``domain`` if given (ids, a pack, or a (d_sae,) bool
    mask such as ``feature_coverage(reference) > 0``)."""
    inactive = coverage == 0
    if domain is None:
        return inactive.nonzero().flatten()
    if isinstance(domain, FeaturePack):
        domain = domain.ids
    domain = torch.as_tensor(list(domain) if not isinstance(domain, Tensor) else domain)
    if domain.dtype == torch.bool:
        if domain.shape != coverage.shape:
            raise ValueError(f"a domain mask must have shape {tuple(coverage.shape)}, got {tuple(domain.shape)}")
        return (inactive & domain).nonzero().flatten()
    bad = domain[(domain < 0) | (domain >= len(coverage))].tolist()
    if bad:
        raise ValueError(f"domain features {bad[:10]} are out of range for an SAE with d_sae={len(coverage)}")
    return domain[inactive[domain.long()]].unique().long()


@torch.no_grad()
def top_contexts(model, tokenizer, sae: SparseAutoencoder, texts: Sequence[str], max_acts: Tensor,
                 features: Sequence[int], *, n: int = 1, context_tokens: int | None = None, pool: int = 16,
                 max_length: int = 256, layer: int | None = None) -> dict[int, list[str]]:
    """For each feature, up to ``n`` prompts: the tokens just BEFORE a token where it fires (the whole text
    before it, or its last ``context_tokens``), after which the model may write such a token itself. The whole
    prefix is the default: the feature fired on that token given everything before it, and a cut context is a
    different input.

    Searched: every firing token of the ``pool`` texts where the feature fires hardest (``max_acts`` is
    ``encode_texts(texts, max_length=max_length).max_acts``). Ranked by the model's own probability of writing
    the firing token after its context, p(x_t | x_<t): the feature fired on exactly that token after exactly that
    context, so this is an attempt's chance of a hit, and a rare feature's top-activating token is often one the
    model seldom writes. A context ends at a character boundary (the model then writes the split character
    whole, and the chance covers all of its tokens) and is never empty.
    """
    layer = sae_layer(sae, layer)
    features = [int(f) for f in features]
    span = max_length if context_tokens is None else context_tokens
    wanted: dict[int, list[int]] = {}  # text row -> features to look for in it
    for f in features:
        values, rows = max_acts[:, f].topk(min(pool, len(texts)))
        for row in rows[values > 0].tolist():
            wanted.setdefault(row, []).append(f)
    found: dict[int, list[tuple[float, str]]] = {}
    device = next(model.parameters()).device
    with capture_residual(model, layer) as capture:
        for row, feats in wanted.items():
            ids = tokenizer(texts[row], return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
            ids = ids.to(device)
            capture.clear()
            logits = model(input_ids=ids, use_cache=False).logits[0].float()  # (T, vocab)
            acts = sae.encode_sparse(capture.last[0].to(sae.W_enc.device, sae.W_enc.dtype))
            acts = acts.features(torch.tensor(feats)).cpu()  # (T, f)
            ids = ids[0].cpu()
            logp = torch.zeros(len(ids))  # log p(x_t | x_<t); the first token has no context
            logp[1:] = logits[:-1].log_softmax(-1).gather(1, ids[1:, None].to(logits.device)).flatten().cpu()
            for j, f in enumerate(feats):
                for t in acts[:, j].nonzero().flatten().tolist():
                    cut = t  # back off over a split character's leading bytes: the model writes them too
                    while cut > 0 and tokenizer.decode(ids[max(cut - span, 0):cut]).endswith("\ufffd"):
                        cut -= 1
                    prefix = tokenizer.decode(ids[max(cut - span, 0):cut], skip_special_tokens=True)
                    prefix = prefix.lstrip("\ufffd")  # a character cut at the window's start
                    if prefix.strip():
                        found.setdefault(f, []).append((float(logp[cut:t + 1].sum()), prefix))
    contexts = {}
    for f, options in found.items():
        best: dict[str, float] = {}  # distinct prefixes, each with its likeliest firing continuation
        for logp_hit, prefix in options:
            best[prefix] = max(logp_hit, best.get(prefix, -math.inf))
        contexts[f] = sorted(best, key=best.get, reverse=True)[:n]
    return contexts


class _PerRow:
    """delta = vectors[row]: a different steering vector for each batch row, (B, 1, d_in)."""

    def __init__(self, vectors: Tensor):
        self.vectors = vectors.detach()

    def __call__(self, hidden: Tensor) -> Tensor:
        return self.vectors[: hidden.shape[0], None, :].to(hidden.device)


@dataclass
class SynthesisResult:
    """What ``synthesize`` / ``unguided`` produced; ``covered`` are target ids some kept text activates."""

    rows: list[dict]
    targets: list[int]
    covered: list[int]
    n_generated: int
    extra: dict = field(default_factory=dict)
    curve: list[int] = field(default_factory=list)  # targets covered after each generated sample, in order

    def samples_to(self, share: float) -> int | None:
        """Generated samples needed to cover ``share`` of the targets (None if this run never got there)."""
        need = math.ceil(share * len(self.targets) - 1e-9)
        return next((i + 1 for i, c in enumerate(self.curve) if c >= need), None)

    def coverage_at(self, budget: int) -> float:
        """Share of the targets covered after the first ``budget`` generated samples."""
        if not self.curve or budget < 1:
            return 0.0
        return self.curve[min(budget, len(self.curve)) - 1] / max(len(self.targets), 1)

    @property
    def coverage(self) -> float:
        return len(self.covered) / len(self.targets) if self.targets else 1.0

    @property
    def coverage_per_sample(self) -> float:
        return len(self.covered) / max(self.n_generated, 1)

    def dataset(self):
        """The kept texts as a ``datasets.Dataset``."""
        from datasets import Dataset

        columns = ("text", "completion", "target_feature", "target_activation", "strategy", "prompt", "round")
        return Dataset.from_dict({c: [r[c] for r in self.rows] for c in columns})

    def save_jsonl(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.dataset().to_json(str(path), lines=True, force_ascii=False)
        return path


def _check_targets(targets, sae: SparseAutoencoder) -> list[int]:
    targets = list(targets.tolist() if isinstance(targets, Tensor) else targets)
    odd = [t for t in targets if isinstance(t, bool) or int(t) != t]  # int() would quietly pick another feature
    if odd:
        raise ValueError(f"target features must be integer ids, got {odd[:10]}")
    targets = [int(t) for t in targets]
    if not targets:
        raise ValueError("no target features: the dataset already activates every feature of the domain")
    bad = [t for t in targets if not 0 <= t < sae.d_sae]
    if bad:
        raise ValueError(f"target features {bad[:10]} are out of range for an SAE with d_sae={sae.d_sae}")
    return targets


def _fires(model, tokenizer, sae, prompts: list[str], completions: list[str]) -> Tensor:
    """(n, d_sae) max activation over the COMPLETION tokens of prompt + completion, under the unsteered model:
    the prompt is context only, so a feature counts only if it fires on generated text. Zeros if empty."""
    out = torch.zeros(len(prompts), sae.d_sae)
    keep = [i for i, c in enumerate(completions) if c.strip()]
    if keep:
        skip = [len(tokenizer(prompts[i])["input_ids"]) for i in keep]
        out[keep] = encode_texts(model, tokenizer, sae, [prompts[i] + completions[i] for i in keep],
                                 skip_tokens=skip, progress=False).max_acts
    return out


def synthesize(model, tokenizer, sae: SparseAutoencoder, targets: Sequence[int] | Tensor, prompts: Sequence[str], *,
               strategy: str = "both", reference: Sequence[str] | None = None, per_target: int = 4,
               strength: float = 4.0, max_new_tokens: int = 48, temperature: float = 1.0, seed: int = 0,
               batch_size: int = 64) -> SynthesisResult:
    """Generate texts aimed at each target feature and keep those that activate it (module docstring).

    ``prompts``: openings to steer from (``"steer"``) and the fallback when a target has no context.
    ``reference``: texts of the domain, where contexts and typical activations come from (needed by
    ``"context"``; ``"steer"`` without it uses the median typical activation of the prompts' features).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    targets = _check_targets(targets, sae)
    prompts = check_texts(prompts, "prompts")
    if per_target < 1:
        raise ValueError(f"per_target must be >= 1, got {per_target}")
    if strategy != "context" and not (math.isfinite(strength) and strength > 0):
        raise ValueError(f"strength must be a finite number > 0 (the multiple of a target's typical activation "
                         f"to steer toward it), got {strength}")
    contexts, typical = {}, {}
    if reference is not None:
        reference = check_texts(reference, "reference texts")
        ref = encode_texts(model, tokenizer, sae, reference, desc="synthesize: reference").max_acts
        if strategy in ("context", "both"):
            contexts = top_contexts(model, tokenizer, sae, reference, ref, targets, n=per_target)
        fired = ref > 0
        typical = {t: float(ref[fired[:, t], t].mean()) for t in targets if fired[:, t].any()}
    elif strategy == "context":
        raise ValueError("strategy 'context' needs reference texts (where the targets' contexts come from)")
    if not typical or len(typical) < len(targets):  # fallback scale: the median typical activation seen at all
        base = encode_texts(model, tokenizer, sae, prompts[:256], progress=False).max_acts
        fallback = float(base[base > 0].median()) if (base > 0).any() else 1.0
        typical = {t: typical.get(t, fallback) for t in targets}

    rng = random.Random(seed)
    rows, covered, n_generated, curve = [], set(), 0, []
    for round_ in tqdm(range(per_target), desc="synthesize: rounds", leave=False):
        todo = [t for t in targets if t not in covered]
        if not todo:
            break
        # round r prompts with the target's r-th best context (cycling), or a random prompt if it has none
        aims = [(t, contexts[t][round_ % len(contexts[t])] if strategy != "steer" and t in contexts
                 else rng.choice(prompts)) for t in todo]
        texts = []
        for start in range(0, len(aims), batch_size):
            chunk = aims[start:start + batch_size]
            vectors = torch.stack([strength * typical[t] * sae.decoder_direction(t) for t, _ in chunk])
            # each row steers toward its own target: one edit adding a (B, 1, d_in) per-row vector
            edit = ResidualEdit(model, sae_layer(sae, None), _PerRow(vectors)) if strategy != "context" \
                else contextlib.nullcontext()
            with edit:
                texts += generate(model, tokenizer, [p for _, p in chunk], max_new_tokens=max_new_tokens,
                                  temperature=temperature, seed=seed + 1000 * round_ + start, batch_size=len(chunk),
                                  progress=False)
        n_generated += len(texts)
        acts = _fires(model, tokenizer, sae, [p for _, p in aims], texts)
        target_ids = torch.tensor(targets)
        for (t, prompt), text, a in zip(aims, texts, acts):
            hit = target_ids[a[target_ids] > 0].tolist()  # targets firing on a generated token, unsteered model
            new = [t] if t in hit else [h for h in hit if h not in covered][:1]
            if new:  # keep it for its own target, or else for another target it newly covers
                rows.append(dict(text=prompt + text, completion=text, target_feature=new[0],
                                 target_activation=float(a[new[0]]), strategy=strategy, prompt=prompt, round=round_))
                covered |= set(hit)
            curve.append(len(covered))
    return SynthesisResult(rows, targets, sorted(covered), n_generated, curve=curve)


def unguided(model, tokenizer, sae: SparseAutoencoder, targets: Sequence[int] | Tensor, prompts: Sequence[str],
             budget: int, *, max_new_tokens: int = 48, temperature: float = 1.0, seed: int = 0,
             batch_size: int = 64, stop_at: float | None = None) -> SynthesisResult:
    """The baseline: up to ``budget`` plain samples from random ``prompts``; every sample is kept. With
    ``stop_at``, sampling stops after the batch in which that share of the targets is covered."""
    targets = _check_targets(targets, sae)
    prompts = check_texts(prompts, "prompts")
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    if stop_at is not None and not 0 <= stop_at <= 1:
        raise ValueError(f"stop_at is a share of the targets, in [0, 1], got {stop_at}")
    rng = random.Random(seed)
    chosen = [rng.choice(prompts) for _ in range(budget)]
    target_ids = torch.tensor(targets)
    seen = torch.zeros(len(targets), dtype=torch.bool)
    rows, curve = [], []
    for start in tqdm(range(0, budget, batch_size), desc="unguided", leave=False):
        batch = chosen[start:start + batch_size]
        texts = generate(model, tokenizer, batch, max_new_tokens=max_new_tokens, temperature=temperature,
                         seed=seed + start, batch_size=batch_size, progress=False)
        hit = _fires(model, tokenizer, sae, batch, texts)[:, target_ids] > 0  # (batch, n_targets)
        for p, x, h in zip(batch, texts, hit):
            seen |= h
            curve.append(int(seen.sum()))
            rows.append(dict(text=p + x, completion=x, target_feature=-1, target_activation=0.0, strategy="unguided",
                             prompt=p, round=0))
        if stop_at is not None and curve[-1] >= stop_at * len(targets):
            break
    return SynthesisResult(rows, targets, sorted(target_ids[seen].tolist()), len(rows), curve=curve)


def random_contexts(tokenizer, texts: Sequence[str], n: int, *, seed: int = 0, min_tokens: int = 4) -> list[str]:
    """``n`` random prefixes of ``texts`` (each cut after a random token, at least ``min_tokens`` in, at a
    character boundary): the unguided baseline's prompts, drawn from the texts the targeted method reads."""
    texts = check_texts(texts, "texts")
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        ids = tokenizer(rng.choice(texts), add_special_tokens=False)["input_ids"]
        if len(ids) <= min_tokens:
            continue
        cut = rng.randint(min_tokens, len(ids) - 1)
        prefix = tokenizer.decode(ids[:cut], skip_special_tokens=True)
        while prefix.endswith("\ufffd") and cut > 1:  # a character split by byte-level tokens: back off
            cut -= 1
            prefix = tokenizer.decode(ids[:cut], skip_special_tokens=True)
        if prefix.strip() and "\ufffd" not in prefix:
            out.append(prefix)
    return out


def plot_synthesis(result: SynthesisResult, base: SynthesisResult | None, path: str) -> None:
    """Bar chart: share of target features covered, guided vs unguided, with the budget in the labels."""
    plt = pyplot()

    bars = {f"feature-targeted\n({result.n_generated} samples)": result.coverage}
    if base is not None:
        bars[f"unguided\n({base.n_generated} samples)"] = base.coverage
    fig, ax = plt.subplots(figsize=(4, 3.5))
    ax.bar(list(bars), list(bars.values()), color=["tab:green", "tab:gray"][: len(bars)])
    for i, v in enumerate(bars.values()):
        ax.text(i, v + 0.02, f"{v:.0%}", ha="center")
    ax.set(ylim=(0, 1.1), ylabel=f"share of {len(result.targets)} target features covered")
    save_figure(fig, path)


def plot_coverage_curves(results: dict[str, SynthesisResult], path: str | os.PathLike, goal: float = 0.9) -> Path:
    """Share of the targets covered against samples generated, one line per method (log x), the ``goal``
    share dashed: where each line crosses it is its ``samples_to(goal)``."""
    empty = [name for name, r in results.items() if not r.curve]
    if not results or empty:
        raise ValueError(f"coverage curves need results with a recorded curve; empty: {empty or list(results)}")
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, r in results.items():
        n = max(len(r.targets), 1)
        ax.plot(range(1, len(r.curve) + 1), [c / n for c in r.curve], label=f"{name} ({len(r.curve)} samples)")
    ax.axhline(goal, ls="--", color="gray", lw=1)
    targets = len(next(iter(results.values())).targets)
    ax.set(xscale="log", xlabel="samples generated", ylabel=f"share of {targets} targets covered", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
