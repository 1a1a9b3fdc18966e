"""Per-rollout detection: sparse SAE activations of sampled completions, and code-switch / repetition scores.

A trainer hands over the residual at the SAE's layer for prompt + completion, laid out as TRL lays
them out (prompt left-padded to P, completion right-padded to T, ``completion_mask`` True up to and
including EOS). ``encode_completions`` encodes only the real completion tokens (sparse, chunked) and
puts them back in the (B, T) grid; the scorers then read features through a (d_sae,) lookup table,
so scoring costs O(B T k) on top of the encode.

Per-token scores are sums of the pack's feature activations; a token is flagged when its score exceeds
``threshold``. ``use_pre=True`` scores ``sum ReLU(pre)`` over the pack's features instead: what the
activations would be without the TopK competition. It is never below the activation score, so its
onset is never later; SASFT observes that the unwanted language's pre-activations rise before the switch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from qscope_rl.sae.autoencoder import DEFAULT_CHUNK_TOKENS, SparseActs, SparseAutoencoder

from .feature_pack import FeaturePack, FeaturePackError

REDUCTIONS = ("max", "share", "mean")


@dataclass
class CompletionActivations:
    """Sparse SAE activations of completion tokens, aligned to ``completion_ids`` (right-padded).

    Padding positions hold zero values (index 0) and zero pre-activations; ``mask`` tells them apart.
    """

    values: Tensor  # (B, T, k) activation values, 0 off the mask
    indices: Tensor  # (B, T, k) feature ids, int64
    mask: Tensor  # (B, T) bool, True on real completion tokens (EOS included, padding after it excluded)
    pre: Tensor | None = None  # (B, T, f) pre-activations of `tracked_ids`; keeps autograd if hidden had it
    tracked_ids: Tensor | None = None  # (f,) int64
    d_sae: int | None = None  # the SAE's width, to refuse packs from another SAE

    def __len__(self) -> int:
        return self.values.shape[0]

    def completion(self, i: int) -> SparseActs:
        """The sparse activations of completion i's real tokens only, (n_i, k)."""
        keep = self.mask[i]
        return SparseActs(self.values[i][keep], self.indices[i][keep])

    def select(self, rows) -> CompletionActivations:
        """The activations of some completions only (a sub-batch), e.g. ``acts.select([i])``."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.values.device)
        pick = lambda t: None if t is None else t[rows.to(t.device)]  # noqa: E731
        return CompletionActivations(self.values[rows], self.indices[rows], self.mask[rows.to(self.mask.device)],
                                     pick(self.pre), self.tracked_ids, self.d_sae)

    def feature_sum(self, ids: Tensor) -> Tensor:
        """Sum of the activations of features ``ids`` on every token, (B, T); 0 off the mask."""
        if self.d_sae is None:
            d_sae = int(max(self.indices.max(), ids.max())) + 1 if self.indices.numel() and len(ids) else 1
        else:
            d_sae = self.d_sae
        lookup = torch.zeros(d_sae, dtype=self.values.dtype, device=self.values.device)
        lookup[ids.to(self.values.device)] = 1.0
        return (self.values * lookup[self.indices]).sum(-1)

    def tracked_columns(self, ids: Tensor) -> Tensor:
        """Where features ``ids`` sit in ``tracked_ids`` (the last axis of ``pre``), (len(ids),)."""
        if self.pre is None or self.tracked_ids is None:
            raise ValueError("these activations track no pre-activations: pass tracked_ids= to encode_completions")
        tracked = self.tracked_ids.to(ids.device)
        match = ids[:, None] == tracked[None, :]  # (f, f_tracked)
        missing = ids[~match.any(1)].tolist()
        if missing:
            raise ValueError(f"features {missing} are not tracked; tracked_ids are {tracked.tolist()}")
        return match.to(torch.uint8).argmax(1).to(self.pre.device)

    def tracked_pre(self, ids: Tensor) -> Tensor:
        """Pre-activations of features ``ids`` (a subset of ``tracked_ids``), (B, T, len(ids))."""
        return self.pre[..., self.tracked_columns(ids)] if len(ids) else self.pre[..., :0]


def encode_completions(sae: SparseAutoencoder, hidden: Tensor, completion_mask: Tensor, *,
                       prompt_length: int | None = None, tracked_ids: Tensor | Sequence[int] | None = None,
                       chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> CompletionActivations:
    """Sparse-encode the completion tokens of a batch of rollouts.

    hidden: (B, P + T, d_in) residual at the SAE's layer for prompt + completion, or (B, T, d_in) already
    restricted to completions; completion_mask: (B, T). ``prompt_length`` defaults to
    ``hidden.shape[1] - T`` (0 for completion-only hidden states) and is checked when given.
    ``tracked_ids``: features whose pre-activations to keep (for SASFT-style losses and early detection).
    """
    if hidden.ndim != 3:
        raise ValueError(f"hidden must be (B, P + T, d_in), got shape {tuple(hidden.shape)}")
    if completion_mask.ndim != 2 or completion_mask.shape[0] != hidden.shape[0]:
        raise ValueError(f"completion_mask must be (B, T) with B={hidden.shape[0]}, "
                         f"got shape {tuple(completion_mask.shape)}")
    batch, length = completion_mask.shape
    if prompt_length is None:
        prompt_length = hidden.shape[1] - length
    if prompt_length < 0 or prompt_length + length != hidden.shape[1]:
        raise ValueError(f"hidden has {hidden.shape[1]} positions but prompt_length={prompt_length} + "
                         f"completion length T={length} = {prompt_length + length}")
    mask = completion_mask.to(device=hidden.device, dtype=torch.bool)
    # flat positions of the real completion tokens in the (B * (P + T)) rows of hidden: no copy of the grid
    where = mask.flatten().nonzero().squeeze(1)  # (N,) positions in the (B * T) completion grid
    rows = where // length * hidden.shape[1] + prompt_length + where % length
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows).to(sae.W_enc.device)  # (N, d_in)
    ids = flat_pre = None
    if tracked_ids is None:
        with torch.no_grad():
            acts = sae.encode_sparse(flat, chunk_tokens=chunk_tokens)
    else:  # the tracked pre-activations come out of the encode's own matmul, with autograd if hidden had it
        ids = torch.as_tensor(tracked_ids, dtype=torch.long, device=sae.W_enc.device).flatten()
        acts, flat_pre = sae.encode_sparse_tracked(flat, ids, chunk_tokens=chunk_tokens)
        acts = SparseActs(acts.values.detach(), acts.indices)
    where, mask = where.to(sae.W_enc.device), mask.to(sae.W_enc.device)
    width = acts.values.shape[-1]
    values = acts.values.new_zeros(batch * length, width).index_copy_(0, where, acts.values)
    indices = acts.indices.new_zeros(batch * length, width).index_copy_(0, where, acts.indices)
    values, indices = values.view(batch, length, width), indices.view(batch, length, width)
    pre = None
    if ids is not None:
        pre = flat_pre.new_zeros(batch * length, len(ids)).index_copy(0, where, flat_pre)
        pre = pre.view(batch, length, len(ids))
    return CompletionActivations(values, indices, mask, pre, ids, sae.d_sae)


# -- scores -----------------------------------------------------------------------------------------


class SwitchScores(NamedTuple):
    """Code-switch evidence per token and per completion, and the first flagged token (-1 when none)."""

    per_token: Tensor  # (B, T) float, 0 off the mask
    per_completion: Tensor  # (B,) float
    onset: Tensor  # (B,) long, index into the completion, -1 when no token is flagged


class RepetitionScores(NamedTuple):
    """Repetition evidence per token and per completion."""

    per_token: Tensor  # (B, T) float, 0 off the mask
    per_completion: Tensor  # (B,) float


def _check_pack(acts: CompletionActivations, pack: FeaturePack) -> None:
    if acts.d_sae is not None and acts.d_sae != pack.d_sae:
        raise FeaturePackError(f"feature pack {pack.name!r} is from another SAE: pack d_sae {pack.d_sae} != "
                               f"activations' d_sae {acts.d_sae}")
    if len(pack) == 0:
        raise FeaturePackError(f"feature pack {pack.name!r} has no features")


def _reduce(per_token: Tensor, flagged: Tensor, mask: Tensor, reduce: str) -> Tensor:
    if reduce == "max":
        return per_token.masked_fill(~mask, float("-inf")).amax(1).clamp(min=0) if mask.shape[1] else \
            per_token.new_zeros(mask.shape[0])
    n = mask.sum(1).clamp(min=1)
    if reduce == "share":
        return flagged.sum(1) / n
    return per_token.sum(1) / n


def _row_packs(acts: CompletionActivations, pack) -> tuple[list[FeaturePack], Tensor]:
    """The distinct packs and, per completion, the index of its pack, (B,)."""
    if isinstance(pack, FeaturePack):
        packs, row = [pack], torch.zeros(len(acts), dtype=torch.long)
    else:
        given = list(pack)
        if len(given) != len(acts):
            raise ValueError(f"got {len(given)} packs for {len(acts)} completions: pass one pack or one each")
        slot = {}
        row = torch.tensor([slot.setdefault(id(p), len(slot)) for p in given], dtype=torch.long)
        packs = list({id(p): p for p in given}.values())
    for p in packs:
        _check_pack(acts, p)
    return packs, row.to(acts.values.device)


def _pack_score(acts: CompletionActivations, pack, use_pre: bool) -> Tensor:
    """Per-token sum of each completion's pack features, (B, T): activations, or ReLU(pre) if use_pre."""
    packs, row = _row_packs(acts, pack)
    device = acts.values.device
    if use_pre:
        if acts.pre is None:
            raise ValueError("these activations track no pre-activations: pass tracked_ids= to encode_completions")
        weight = acts.pre.new_zeros(len(packs), acts.pre.shape[-1])  # (n_packs, f): which tracked columns count
        for n, p in enumerate(packs):
            weight[n, acts.tracked_columns(p.ids.to(device))] = 1.0
        return (acts.pre.relu() * weight[row][:, None, :]).sum(-1).masked_fill(~acts.mask, 0.0)
    d_sae = acts.d_sae or max(p.d_sae for p in packs)
    lookup = torch.zeros(len(packs), d_sae, dtype=acts.values.dtype, device=device)  # (n_packs, d_sae)
    for n, p in enumerate(packs):
        lookup[n, p.ids.to(device)] = 1.0
    flat_index = acts.indices if len(packs) == 1 else acts.indices + (row * d_sae)[:, None, None]
    return (acts.values * lookup.view(-1).take(flat_index)).sum(-1)


def code_switch_scores(acts: CompletionActivations, pack: FeaturePack | Sequence[FeaturePack], *,
                       use_pre: bool = False, threshold: float = 0.0, reduce: str = "max") -> SwitchScores:
    """Evidence of the UNWANTED language's features in each completion.

    ``pack``: features of the unwanted language, or one pack per completion (mixed-language batches).
    per_token = sum of the pack's activations (``use_pre``: sum of ReLU(pre-activation) over the
    pack, from ``tracked_ids``); a token is flagged when per_token > threshold; ``onset`` is the first
    flagged token. ``reduce``: per-completion score = the max over tokens, the share of flagged tokens,
    or the mean per-token score.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    per_token = _pack_score(acts, pack, use_pre)
    flagged = (per_token > threshold) & acts.mask
    first = flagged.to(torch.uint8).argmax(1)  # the first maximum: the first flagged token
    onset = torch.where(flagged.any(1), first, torch.full_like(first, -1))
    return SwitchScores(per_token, _reduce(per_token, flagged, acts.mask, reduce), onset)


def calibrate_threshold(acts: CompletionActivations, pack: FeaturePack | Sequence[FeaturePack], *,
                        quantile: float = 0.999, use_pre: bool = False) -> float:
    """A per-token threshold from text WITHOUT the failure: the ``quantile`` of its per-token pack scores.

    Pass activations of clean text in the wanted language (e.g. training documents) and the unwanted
    language's pack; with the result as ``threshold``, about ``1 - quantile`` of clean tokens are flagged.
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    scores = _pack_score(acts, pack, use_pre)[acts.mask]
    if scores.numel() == 0:
        raise ValueError("calibrate_threshold needs at least one real token")
    return float(torch.quantile(scores.detach().double().cpu(), quantile))


def repetition_scores(acts: CompletionActivations, pack: FeaturePack, *, threshold: float = 0.0,
                      reduce: str = "mean") -> RepetitionScores:
    """Evidence of "this token repeats" in each completion: the sum of the pack's activations per token.

    ``reduce`` as in ``code_switch_scores``; the default, the mean over the completion's tokens,
    grows with the share of the completion spent in a loop.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    per_token = _pack_score(acts, pack, use_pre=False)
    flagged = (per_token > threshold) & acts.mask
    return RepetitionScores(per_token, _reduce(per_token, flagged, acts.mask, reduce))
