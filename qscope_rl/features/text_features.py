"""Per-text SAE features: what classify, synthesize and redundancy read from a list of texts.

``encode_texts`` runs texts through the model in right-padded batches, stops the forward at the SAE's
layer, sparse-encodes every real token and pools per text:

- ``max_acts``: max activation over the text's tokens, (n, d_sae). Qwen-Scope's "fires" is ``> 0`` here.
- ``last``: the sparse activations at the text's last token (Qwen-Scope's evaluation footprint).
- ``mean_hidden``: the mean residual over the text's tokens, (n, d_in): the dense-probe baseline's input.

``max_acts`` is dense: n * d_sae floats (10k texts on a 32K SAE = 1.3 GB); encode in slices beyond that.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qscope_rl.hooks import ForwardToLayer
from qscope_rl.sae.autoencoder import SparseActs, SparseAutoencoder
from qscope_rl.sae.identity import sae_digest


class TextFeatures(NamedTuple):
    """SAE features of n texts, pooled per text (see the module docstring)."""

    max_acts: Tensor  # (n, d_sae) max over tokens, >= 0
    last: SparseActs  # (n, k) features of the last token
    mean_hidden: Tensor  # (n, d_in) mean residual over tokens
    n_tokens: Tensor  # (n,) tokens per text

    @property
    def fires(self) -> Tensor:
        """(n, d_sae) bool: the feature fires somewhere in the text (max over tokens > 0)."""
        return self.max_acts > 0

    def last_footprints(self) -> list[set[int]]:
        """Per text, the set of features active (> 0) at its last token."""
        return [set(i[v > 0].tolist()) for v, i in zip(self.last.values, self.last.indices)]


def sae_layer(sae: SparseAutoencoder, layer: int | None) -> int:
    layer = sae.layer if layer is None else layer
    if layer is None:
        raise ValueError("the SAE does not record its layer: pass layer=")
    return layer


def text_list(texts, what: str = "texts") -> list:
    """``texts`` as a list, refusing a single string or a mapping (iterating either would read its characters or
    keys as the texts); its entries are the caller's to check."""
    if isinstance(texts, str):
        raise ValueError(f"{what} must be a list of texts, got a single string")
    if isinstance(texts, Mapping):
        raise ValueError(f"{what} must be a list of texts, got a mapping (keys {list(texts)[:3]})")
    return list(texts)


def check_texts(texts, what: str = "texts") -> list[str]:
    """A non-empty list of strings, or a ValueError that says what is wrong."""
    texts = text_list(texts, what)
    if not texts:
        raise ValueError(f"{what} is empty")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise ValueError(f"{what}: entries {bad[:10]} are empty or not strings")
    return texts


def pad_id(tokenizer) -> int:
    """The id padding fills batches with: the pad token, else end-of-text, else 0 (masked out either way)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else int(pad)


def token_ids(tokenizer, texts: Sequence[str], max_length: int, what: str = "texts") -> list[list[int]]:
    """Each text's token ids, truncated to ``max_length``; a ValueError naming the texts that tokenize to nothing."""
    ids = [list(x) for x in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]
    empty = [i for i, x in enumerate(ids) if not x]
    if empty:
        raise ValueError(f"{what} {empty[:10]} tokenize to nothing")
    return ids


@torch.no_grad()
def layer_batches(model: nn.Module, layer: int, ids: Sequence[Sequence[int]], batch_size: int, pad: int, *,
                  desc: str = "forward", progress: bool = False) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(start, mask (B, T), residual (B, T, d)) for right-padded batches of token ids, the forward stopped after
    ``layer``; its hooks go when the loop ends or is left (the generator closes the ``with``)."""
    device = next(model.parameters()).device
    with ForwardToLayer(model, layer) as forward:
        for start in tqdm(range(0, len(ids), batch_size), desc=desc, leave=False, disable=not progress):
            batch = ids[start:start + batch_size]
            lengths = torch.tensor([len(s) for s in batch])
            mask = torch.arange(int(lengths.max())) < lengths[:, None]  # (B, T), right padding
            input_ids = torch.full(mask.shape, pad, dtype=torch.long)
            input_ids[mask] = torch.tensor([t for s in batch for t in s], dtype=torch.long)
            yield start, mask, forward.run(input_ids=input_ids.to(device), attention_mask=mask.long().to(device),
                                           use_cache=False)


@torch.no_grad()
def encode_texts(model: nn.Module, tokenizer, sae: SparseAutoencoder, texts: Sequence[str], *,
                 layer: int | None = None, batch_size: int = 32, max_length: int = 256,
                 desc: str = "encode texts", progress: bool = True,
                 skip_tokens: Sequence[int] | None = None) -> TextFeatures:
    """Pooled SAE features of every text; see ``TextFeatures``. Texts are truncated to ``max_length`` tokens.

    ``skip_tokens``: per text, leading tokens that are context only: they condition the rest but are left out
    of ``max_acts`` and ``mean_hidden`` (e.g. a prompt, when only the generated part should count).
    """
    texts = check_texts(texts)
    if skip_tokens is not None and len(skip_tokens) != len(texts):
        raise ValueError(f"skip_tokens has {len(skip_tokens)} entries for {len(texts)} texts")
    layer = sae_layer(sae, layer)
    ids = token_ids(tokenizer, texts, max_length)
    max_acts, last_v, last_i, means = [], [], [], []
    for start, mask, residual in layer_batches(model, layer, ids, batch_size, pad_id(tokenizer), desc=desc,
                                               progress=progress):
        n, lengths = mask.shape[0], mask.sum(1)
        hidden = residual.to(sae.W_enc.device, sae.W_enc.dtype)  # (B, T, d_in)
        acts = sae.encode_sparse(hidden[mask.to(hidden.device)])  # (N, k) real tokens only
        row, pos = (x.to(hidden.device) for x in mask.nonzero(as_tuple=True))  # (N,) text and position
        skip = torch.zeros(n, dtype=torch.long) if skip_tokens is None else \
            torch.tensor(list(skip_tokens[start:start + n])).clamp(max=lengths - 1)
        pooled_mask = mask & (torch.arange(mask.shape[1]) >= skip[:, None])  # (B, T) tokens that count
        keep = (pos >= skip.to(hidden.device)[row]).unsqueeze(-1)
        pooled = torch.zeros(n, sae.d_sae, device=hidden.device, dtype=acts.values.dtype)
        flat = (row[:, None] * sae.d_sae + acts.indices).flatten()
        pooled.view(-1).scatter_reduce_(0, flat, (acts.values * keep).flatten(), reduce="amax")
        max_acts.append(pooled.cpu())
        end = (torch.cumsum(lengths, 0) - 1).to(hidden.device)  # last real token of each text
        last_v.append(acts.values[end].cpu())
        last_i.append(acts.indices[end].cpu())
        m = pooled_mask.to(hidden.device).unsqueeze(-1)
        means.append(((hidden * m).sum(1) / m.sum(1)).cpu())
    return TextFeatures(torch.cat(max_acts), SparseActs(torch.cat(last_v), torch.cat(last_i)),
                        torch.cat(means), torch.tensor([len(x) for x in ids]))


def sae_fingerprint(sae: SparseAutoencoder) -> str:
    """A short digest identifying an SAE's weights (see `qscope_rl.sae.identity`): tells SAEs apart cheaply."""
    return sae_digest(sae)
