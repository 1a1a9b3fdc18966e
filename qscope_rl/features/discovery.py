"""Feature discovery: which SAE features mean "language L", "this token repeats", or "positive vs negative".

Every method runs texts through the model in batches, captures the residual at the SAE's layer, encodes
it sparsely (``encode_sparse``) and accumulates per-feature sums with ``index_add_``: nothing of shape
(tokens, d_sae) is ever built beyond one encode chunk. Forward passes stop at the SAE's layer.

- ``discover_language_features``: SASFT's monolinguality score, mean activation on language-L text
  minus the mean over the other languages (each language weighted equally).
- ``discover_repetition_features``: Qwen-Scope's RL recipe (point 5), the same tokens at their last
  occurrence in a loop minus at their first occurrence. Loops are built from ordinary texts.
- ``discover_contrastive_features``: Qwen-Scope's data classification, P(fire | positive) -
  P(fire | negative) with fire = max over the text's tokens > 0, or the mean-activation difference.

Mean pre-activations (SASFT's alpha) come for free: ``pre`` is affine in the residual, so the mean
pre-activation over a token set is ``pre_acts(mean residual)``, accumulated as one (d_in,) sum.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qscope_rl.sae.autoencoder import SparseActs, SparseAutoencoder
from qscope_rl.sae.identity import sae_digest

from .feature_pack import Feature, FeaturePack, texts_sha256
from .text_features import layer_batches, pad_id, text_list

RANK_BY = ("p_fire", "mean_diff")


# -- running the model ------------------------------------------------------------------------------


@dataclass
class _TokenBatch:
    """Sparse activations of the real tokens of one batch, flattened to (N, ...)."""

    acts: SparseActs  # (N, k)
    hidden: Tensor  # (N, d_in) residual at the SAE's layer
    row: Tensor  # (N,) index of the token's sequence in the whole input list
    pos: Tensor  # (N,) position of the token in its sequence


@torch.no_grad()
def _encode_sequences(model: nn.Module, sae: SparseAutoencoder, layer: int, sequences: Sequence[Sequence[int]],
                      batch_size: int, pad: int, desc: str) -> Iterator[_TokenBatch]:
    """Forward right-padded batches of token ids up to ``layer`` and sparse-encode every real token."""
    for start, mask, residual in layer_batches(model, layer, sequences, batch_size, pad, desc=desc, progress=True):
        hidden = residual[mask.to(residual.device)].to(sae.W_enc.device)  # (N, d_in)
        row, pos = mask.nonzero(as_tuple=True)
        yield _TokenBatch(sae.encode_sparse(hidden), hidden, row + start, pos)


def _tokenize(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    return [list(x) for x in ids]


def _layer(sae: SparseAutoencoder, layer: int | None) -> int:
    layer = sae.layer if layer is None else layer
    if layer is None:
        raise ValueError("the SAE does not record its layer: pass layer=")
    return layer


def _model_name(model: nn.Module, model_name: str | None) -> str:
    if model_name:
        return model_name
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", "") or getattr(config, "model_type", "") or type(model).__name__


# -- per-feature statistics -------------------------------------------------------------------------


class _FeatureStats:
    """Running per-feature sums over a set of tokens (and the texts they belong to)."""

    def __init__(self, sae: SparseAutoencoder):
        self.d_sae = sae.d_sae
        self.act_sum = torch.zeros(sae.d_sae, dtype=torch.float64)  # sum of activations over tokens
        self.token_fires = torch.zeros(sae.d_sae, dtype=torch.float64)  # tokens on which each feature fires
        self.text_fires = torch.zeros(sae.d_sae, dtype=torch.float64)  # texts with a firing token
        self.hidden_sum = torch.zeros(sae.d_in, dtype=torch.float64)
        self.n_tokens = 0
        self.n_texts = 0

    def add(self, acts: SparseActs, hidden: Tensor, text: Tensor) -> None:
        """Add N tokens: acts (N, k), hidden (N, d_in), text (N,) an id of each token's text."""
        values, indices = acts.values.detach().cpu().double(), acts.indices.cpu()
        fires = values > 0
        self.act_sum.index_add_(0, indices.flatten(), values.flatten())
        self.token_fires.index_add_(0, indices[fires], torch.ones(int(fires.sum()), dtype=torch.float64))
        # fire on a text = max over its tokens > 0: count each (text, feature) pair once
        text = text.cpu()
        pairs = torch.unique(text[:, None].expand_as(indices)[fires] * self.d_sae + indices[fires])
        self.text_fires.index_add_(0, pairs % self.d_sae, torch.ones(len(pairs), dtype=torch.float64))
        self.hidden_sum += hidden.detach().double().sum(0).cpu()
        self.n_tokens += len(values)
        self.n_texts += len(torch.unique(text))

    @property
    def mean_act(self) -> Tensor:
        return self.act_sum / max(self.n_tokens, 1)

    @property
    def token_fire_rate(self) -> Tensor:
        return self.token_fires / max(self.n_tokens, 1)

    @property
    def p_fire(self) -> Tensor:
        return self.text_fires / max(self.n_texts, 1)

    def mean_pre(self, sae: SparseAutoencoder) -> Tensor:
        """Mean pre-activation of every feature over the tokens seen, (d_sae,): pre is affine in x."""
        mean_x = (self.hidden_sum / max(self.n_tokens, 1)).to(sae.W_enc.device, sae.W_enc.dtype)
        return sae.pre_acts(mean_x[None])[0].double().cpu()

    def summary(self) -> dict:
        return {"n_texts": self.n_texts, "n_tokens": self.n_tokens}


def _stats_of(ids: Tensor, sae: SparseAutoencoder, pos: _FeatureStats, neg: _FeatureStats,
              neg_mean_act: Tensor | None = None) -> list[dict[str, float]]:
    """The per-feature statistics stored in a pack: positive vs negative texts."""
    pre_pos, pre_neg = pos.mean_pre(sae), neg.mean_pre(sae)
    neg_mean = neg.mean_act if neg_mean_act is None else neg_mean_act
    return [dict(mean_pre=float(pre_pos[i]), mean_pre_neg=float(pre_neg[i]),
                 mean_act_pos=float(pos.mean_act[i]), mean_act_neg=float(neg_mean[i]),
                 p_fire_pos=float(pos.p_fire[i]), p_fire_neg=float(neg.p_fire[i]),
                 token_fire_pos=float(pos.token_fire_rate[i]), token_fire_neg=float(neg.token_fire_rate[i]))
            for i in ids.tolist()]


def _top_positive(score: Tensor, top_k: int, tiebreak: Tensor | None = None) -> Tensor:
    """Ids of the top_k features with a positive score, best first (ties broken by ``tiebreak``)."""
    order = torch.arange(len(score))
    if tiebreak is not None:
        order = torch.sort(tiebreak, descending=True, stable=True).indices
    order = order[torch.sort(score[order], descending=True, stable=True).indices]
    return order[score[order] > 0][:top_k]


def _pack(name, method, model, sae, layer, ids, scores, stats, label, data, model_name) -> FeaturePack:
    features = [Feature(int(i), f"{label}-{int(i)}", float(scores[i]), s) for i, s in zip(ids, stats)]
    return FeaturePack(name=name, method=method, model=_model_name(model, model_name),
                       sae_source=str(sae.source or ""), layer=layer, d_sae=sae.d_sae, d_in=sae.d_in,
                       features=features, data=data, sae_digest=sae_digest(sae))


def _check_texts(texts, what: str) -> list[str]:
    """The non-empty strings of ``texts`` (blank lines of a corpus are dropped, not refused)."""
    texts = [t for t in text_list(texts, what) if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError(f"{what} has no (non-empty) texts")
    return texts


def _collect(model, tokenizer, sae, layer, texts, batch_size, max_length, desc) -> _FeatureStats:
    stats = _FeatureStats(sae)
    sequences = [s for s in _tokenize(tokenizer, texts, max_length) if s]
    for batch in _encode_sequences(model, sae, layer, sequences, batch_size, pad_id(tokenizer), desc):
        stats.add(batch.acts, batch.hidden, batch.row)
    if stats.n_tokens == 0:
        raise ValueError(f"{desc}: the texts tokenize to nothing")
    return stats


# -- the three methods ------------------------------------------------------------------------------


def discover_language_features(model: nn.Module, tokenizer, sae: SparseAutoencoder,
                               texts_by_lang: Mapping[str, Sequence[str]], top_k: int = 16,
                               batch_size: int = 16, *, layer: int | None = None, max_length: int = 512,
                               model_name: str | None = None) -> dict[str, FeaturePack]:
    """One pack per language: features ranked by the monolinguality score (SASFT).

    score_L(j) = mean activation of j over language-L tokens - mean over the other languages' tokens
    (the average of each other language's mean). Only features with a positive score are kept.
    ``stats["mean_pre"]`` is j's mean pre-activation on language-L tokens (SASFT's alpha) and
    ``stats["mean_pre_neg"]`` the same on the other languages' tokens.
    """
    layer = _layer(sae, layer)
    if not isinstance(texts_by_lang, Mapping) or len(texts_by_lang) < 2:
        raise ValueError(f"language discovery needs texts in at least two languages, got "
                         f"{list(texts_by_lang) if isinstance(texts_by_lang, Mapping) else type(texts_by_lang)}")
    texts = {lang: _check_texts(t, f"language {lang!r}") for lang, t in texts_by_lang.items()}
    stats = {lang: _collect(model, tokenizer, sae, layer, t, batch_size, max_length, f"features: {lang} texts")
             for lang, t in texts.items()}
    packs = {}
    for lang in texts:
        others = [o for o in texts if o != lang]
        neg_mean = torch.stack([stats[o].mean_act for o in others]).mean(0)
        score = stats[lang].mean_act - neg_mean  # monolinguality score, SASFT
        ids = _top_positive(score, top_k)
        neg = _merge([stats[o] for o in others], sae)
        data = dict(language=lang, other_languages=others,
                    n_texts={x: stats[x].n_texts for x in texts}, n_tokens={x: stats[x].n_tokens for x in texts},
                    sha256={x: texts_sha256(texts[x]) for x in texts},
                    score="mean_act(L) - mean over other languages of mean_act (SASFT monolinguality)",
                    params=dict(top_k=top_k, batch_size=batch_size, max_length=max_length))
        packs[lang] = _pack(f"language-{lang}", "language", model, sae, layer, ids, score,
                            _stats_of(ids, sae, stats[lang], neg, neg_mean), lang, data, model_name)
    return packs


def _merge(parts: list[_FeatureStats], sae: SparseAutoencoder) -> _FeatureStats:
    merged = _FeatureStats(sae)
    for part in parts:
        for name in ("act_sum", "token_fires", "text_fires", "hidden_sum"):
            getattr(merged, name).add_(getattr(part, name))
        merged.n_tokens += part.n_tokens
        merged.n_texts += part.n_texts
    return merged


def make_loops(sequences: Sequence[Sequence[int]], repeats: int = 4, span_tokens: tuple[int, int] = (3, 8),
               seed: int = 0) -> list[tuple[list[int], int, int]]:
    """Turn token sequences into repetition loops, as a looping LM writes them.

    For each sequence: draw a span length L in ``span_tokens`` (cut to len - 1 for short sequences) and a
    cut point c (L < c <= len), keep the tokens up to c, then repeat the last L of them ``repeats - 1`` more
    times: ``ids[:c] + ids[c-L:c] * (repeats - 1)``. Returns (loop ids, start of the first occurrence,
    start of the last occurrence); sequences of at most ``span_tokens[0]`` tokens are skipped. Working on
    token ids (not text) keeps the copies token-identical: first and last occurrence hold the same tokens.
    """
    if repeats < 2:
        raise ValueError(f"a loop needs repeats >= 2, got {repeats}")
    lo, hi = span_tokens
    if not 1 <= lo <= hi:
        raise ValueError(f"span_tokens must be (lo, hi) with 1 <= lo <= hi, got {span_tokens}")
    rng = random.Random(seed)
    loops = []
    for ids in sequences:
        span = min(rng.randint(lo, hi), len(ids) - 1)  # shorter spans for short sequences
        if span < lo:
            continue
        cut = rng.randint(span + 1, len(ids))  # at least one token before the first occurrence
        loop = list(ids[:cut]) + list(ids[cut - span:cut]) * (repeats - 1)
        loops.append((loop, cut - span, len(loop) - span))
    return loops


def find_repeats(ids: Sequence[int], n: int = 3, min_count: int = 3) -> tuple[list[bool], list[bool]] | None:
    """Masks of the first and the last occurrence of every token n-gram that occurs ``min_count``+ times.

    A text that loops repeats its phrase's n-grams many times; positions in both masks are dropped.
    Returns None when no n-gram repeats often enough.
    """
    where: dict[tuple, list[int]] = {}
    for i in range(len(ids) - n + 1):
        where.setdefault(tuple(ids[i:i + n]), []).append(i)
    first, last = [False] * len(ids), [False] * len(ids)
    for starts in where.values():
        if len(starts) >= min_count:
            first[starts[0]:starts[0] + n] = [True] * n
            last[starts[-1]:starts[-1] + n] = [True] * n
    both = [a and b for a, b in zip(first, last)]
    first = [a and not c for a, c in zip(first, both)]
    last = [b and not c for b, c in zip(last, both)]
    return (first, last) if any(first) and any(last) else None


SOURCES = ("auto", "natural", "synthetic")


def discover_repetition_features(model: nn.Module, tokenizer, sae: SparseAutoencoder, texts: Sequence[str],
                                 top_k: int = 16, batch_size: int = 16, *, source: str = "auto", repeats: int = 4,
                                 span_tokens: tuple[int, int] = (3, 8), ngram: int = 3, min_count: int = 3,
                                 seed: int = 0, layer: int | None = None, max_length: int = 256,
                                 model_name: str | None = None) -> FeaturePack:
    """Features of "this token repeats": a repeated token's last minus first occurrence (Qwen-Scope, RL).

    Repetitions come from the texts themselves (``source="natural"``: every token ``ngram``-gram that
    occurs ``min_count``+ times, see ``find_repeats``) or are built from them (``"synthetic"``: a span
    of 3-8 tokens repeated to ``repeats`` copies, see ``make_loops``); ``"auto"`` uses the texts' own
    repeats when any text has some, and builds loops only when none has. score(j) = mean activation of j over
    last-occurrence tokens - mean over first-occurrence tokens: the tokens are the same, so token
    identity cancels and what is left is "seen before". ``stats["mean_pre"]``: over last occurrences.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    layer = _layer(sae, layer)
    texts = _check_texts(texts, "repetition texts")
    tokenized = [s for s in _tokenize(tokenizer, texts, max_length) if s]
    found = [find_repeats(ids, ngram, min_count) if source != "synthetic" else None for ids in tokenized]
    n_natural = sum(f is not None for f in found)
    sequences, first_masks, last_masks = [], [], []
    if n_natural:  # the texts' own repetitions (and only those: "auto" builds loops only when there are none)
        for ids, masks in zip(tokenized, found):
            if masks is not None:
                sequences.append(list(ids))
                first_masks.append(masks[0])
                last_masks.append(masks[1])
    elif source != "natural":
        for loop, start, end in make_loops(tokenized, repeats, span_tokens, seed):
            span = len(loop) - end
            sequences.append(loop)
            first_masks.append([start <= i < start + span for i in range(len(loop))])
            last_masks.append([i >= end for i in range(len(loop))])
    if not sequences:
        raise ValueError(f"repetition texts: no {ngram}-gram repeats {min_count}+ times" if source == "natural"
                         else f"repetition texts: none has more than {span_tokens[0]} tokens to loop")
    width = max(map(len, sequences))
    first_mask = torch.tensor([m + [False] * (width - len(m)) for m in first_masks])  # (n, width)
    last_mask = torch.tensor([m + [False] * (width - len(m)) for m in last_masks])
    first, last = _FeatureStats(sae), _FeatureStats(sae)
    for batch in _encode_sequences(model, sae, layer, sequences, batch_size, pad_id(tokenizer),
                                   "features: repetitions"):
        for stats, mask in ((first, first_mask), (last, last_mask)):
            where = mask[batch.row, batch.pos]
            stats.add(SparseActs(batch.acts.values[where], batch.acts.indices[where]), batch.hidden[where],
                      batch.row[where])
    score = last.mean_act - first.mean_act
    ids = _top_positive(score, top_k)
    data = dict(target="repetition", source=source, n_texts=len(texts), n_sequences=len(sequences),
                n_natural=n_natural, first=first.summary(), last=last.summary(), sha256=texts_sha256(texts),
                score="mean_act(last occurrence) - mean_act(first occurrence) of the same repeated tokens",
                natural=f"first/last occurrence of every {ngram}-gram of token ids occurring >= {min_count} times",
                synthetic="ids[:c] + ids[c-L:c] * (repeats - 1), L ~ U(span_tokens) cut to len - 1, c ~ U(L + 1, len)",
                params=dict(top_k=top_k, batch_size=batch_size, source=source, repeats=repeats,
                            span_tokens=list(span_tokens), ngram=ngram, min_count=min_count, seed=seed,
                            max_length=max_length))
    return _pack("repetition", "repetition", model, sae, layer, ids, score,
                 _stats_of(ids, sae, last, first), "rep", data, model_name)


def discover_contrastive_features(model: nn.Module, tokenizer, sae: SparseAutoencoder, positive: Sequence[str],
                                  negative: Sequence[str], top_k: int = 16, rank_by: str = "p_fire",
                                  batch_size: int = 16, *, name: str = "contrastive", layer: int | None = None,
                                  max_length: int = 512, model_name: str | None = None) -> FeaturePack:
    """Features that tell positive texts from negative ones (Qwen-Scope data classification, steering).

    ``rank_by="p_fire"``: P(fire | positive) - P(fire | negative), fire = max over a text's tokens > 0,
    ties broken by the mean difference; ``rank_by="mean_diff"``: mean activation per token on positive
    minus negative texts. Only features with a positive score are kept.
    """
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {RANK_BY}, got {rank_by!r}")
    layer = _layer(sae, layer)
    positive, negative = _check_texts(positive, "positive texts"), _check_texts(negative, "negative texts")
    pos = _collect(model, tokenizer, sae, layer, positive, batch_size, max_length, "features: positive texts")
    neg = _collect(model, tokenizer, sae, layer, negative, batch_size, max_length, "features: negative texts")
    mean_diff, p_fire_diff = pos.mean_act - neg.mean_act, pos.p_fire - neg.p_fire
    score, tiebreak = (p_fire_diff, mean_diff) if rank_by == "p_fire" else (mean_diff, None)
    ids = _top_positive(score, top_k, tiebreak)
    data = dict(target=name, rank_by=rank_by, positive=pos.summary(), negative=neg.summary(),
                sha256=dict(positive=texts_sha256(positive), negative=texts_sha256(negative)),
                params=dict(top_k=top_k, batch_size=batch_size, max_length=max_length))
    return _pack(name, "contrastive", model, sae, layer, ids, score, _stats_of(ids, sae, pos, neg),
                 name, data, model_name)
