"""A linear probe over a completion's SAE features: a detector for failures that a few features miss.

Feature packs score a failure by summing a handful of features (Qwen-Scope's recipe). That works for
code-switching, but loops are spread thin over many features: on the demo world the repetition pack
separates looping completions from clean ones with AUROC 0.70, a logistic regression over all of the SAE's
features 0.97 (``benchmarks/detection.py``). The probe reads each completion's last ``last`` tokens,
where a loop sits, as the mean activation of every feature: one dense (d_sae,) vector per completion,
never one per token.

    probe = fit_completion_probe(model, tokenizer, sae, looping_texts, clean_texts, last=24)
    scores = probe_scores(acts, probe)        # (B,) logits, from `encode_completions` of a rollout batch
    scores = score_texts(model, tokenizer, sae, texts, probe)   # (n,) logits of whole texts
    probe.save("loop_probe.safetensors")      # a FeatureClassifier: tied to its SAE, no pickle

Fitting texts are whole documents (``prompt_length=0``); rollouts are scored on their completion tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from qscope_rl.hooks import ForwardToLayer
from qscope_rl.sae.autoencoder import SparseAutoencoder

from .classifier import FeatureClassifier
from .detection import CompletionActivations, encode_completions
from .text_features import check_texts, sae_layer

POSITIVE, NEGATIVE = "positive", "negative"


def tail_mean_activations(acts: CompletionActivations, last: int) -> Tensor:
    """(B, d_sae): each feature's mean activation over each completion's last ``last`` real tokens (0 if empty)."""
    if last < 1:
        raise ValueError(f"last must be >= 1 token, got {last}")
    if acts.d_sae is None:
        raise ValueError("these activations do not record their SAE's width (d_sae)")
    batch, length = acts.mask.shape
    lengths = acts.mask.sum(1, keepdim=True)  # (B, 1); right padding: real tokens come first
    position = torch.arange(length, device=acts.mask.device)[None]
    tail = acts.mask & (position >= lengths - last)  # (B, T)
    row, col = tail.nonzero(as_tuple=True)  # the tail tokens only, (M,)
    flat = (row[:, None] * acts.d_sae + acts.indices[row, col]).flatten()  # (M * k,) into a (B * d_sae) table
    pooled = acts.values.new_zeros(batch * acts.d_sae).index_add_(0, flat, acts.values[row, col].flatten())
    pooled = pooled.view(batch, acts.d_sae)
    return pooled / tail.sum(1, keepdim=True).clamp(min=1)


def _text_activations(model: nn.Module, tokenizer, sae: SparseAutoencoder, texts: Sequence[str],
                      batch_size: int, max_length: int) -> Iterator[CompletionActivations]:
    """Sparse activations of every token of ``texts``, a right-padded batch at a time (the forward stops at L)."""
    layer = sae_layer(sae, None)
    device = next(model.parameters()).device
    with torch.no_grad(), ForwardToLayer(model, layer) as forward:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True,
                            padding_side="right", truncation=True, max_length=max_length)
            residual = forward.run(input_ids=enc["input_ids"].to(device),
                                   attention_mask=enc["attention_mask"].to(device), use_cache=False)
            yield encode_completions(sae, residual, enc["attention_mask"].bool(), prompt_length=0)


def fit_completion_probe(model: nn.Module, tokenizer, sae: SparseAutoencoder, positive: Sequence[str],
                         negative: Sequence[str], *, last: int = 24, C: float = 1.0, batch_size: int = 32,
                         max_length: int = 256) -> FeatureClassifier:
    """A logistic probe for "positive" (e.g. looping) vs "negative" (clean) texts, on their tails' SAE features.

    Returns a ``FeatureClassifier`` (classes ``negative`` / ``positive``) whose ``features`` say how its input
    is pooled, so that ``probe_scores`` can refuse activations pooled another way.
    """
    positive, negative = check_texts(positive, "positive texts"), check_texts(negative, "negative texts")
    if last < 1:  # before encoding anything
        raise ValueError(f"last must be >= 1 token, got {last}")
    texts = positive + negative
    pooled = torch.cat([tail_mean_activations(acts, last).cpu()
                        for acts in _text_activations(model, tokenizer, sae, texts, batch_size, max_length)])
    labels = [POSITIVE] * len(positive) + [NEGATIVE] * len(negative)
    probe = FeatureClassifier.fit(pooled, labels, sae, kind="logistic", C=C)
    probe.features = f"tail_mean:{last}"
    return probe


def score_texts(model: nn.Module, tokenizer, sae: SparseAutoencoder, texts: Sequence[str], probe: FeatureClassifier,
                *, batch_size: int = 32, max_length: int = 256) -> Tensor:
    """(n,) the probe's logits for whole texts (e.g. to check it on held-out data, or to filter a dataset)."""
    probe.check_sae(sae)
    texts = check_texts(texts)
    return torch.cat([probe_scores(acts, probe).cpu()
                      for acts in _text_activations(model, tokenizer, sae, texts, batch_size, max_length)])


def completion_probe_tail(probe: FeatureClassifier) -> int:
    """How many tokens at a completion's end the probe reads; a ValueError for any other classifier."""
    kind, _, last = probe.features.partition(":")
    if kind != "tail_mean" or not last.isdigit() or POSITIVE not in probe.classes:
        raise ValueError(f"not a completion probe (features {probe.features!r}, classes {probe.classes}): "
                         "fit one with fit_completion_probe or `qscope-rl features probe`")
    return int(last)


def probe_scores(acts: CompletionActivations, probe: FeatureClassifier) -> Tensor:
    """(B,) the probe's logit for ``positive`` on each completion (higher: more likely the failure)."""
    last = completion_probe_tail(probe)
    if acts.d_sae is not None and acts.d_sae != probe.sae["d_sae"]:
        raise ValueError(f"the probe was fitted on an SAE with d_sae={probe.sae['d_sae']}, these activations "
                         f"come from one with d_sae={acts.d_sae}")
    decision = probe.decision(tail_mean_activations(acts, last))
    return decision[:, probe.classes.index(POSITIVE)].to(acts.values.device)
