"""Sparse capture: SAE-encode the residual stream while the model generates, keeping only the top-k codes.

Dense capture keeps every forward's (B, t, d) residual, then joins them and encodes: generation memory grows
with B x T x d (1 GiB for 128 rollouts x 2,048 tokens x 2,048 dims in bf16, about 3x that while joining).
`SparseCapture` encodes each forward's residual (a few decode steps at a time) as it arrives and keeps the k
active features per token (float values, indices in the narrowest integer type the SAE's width allows) and the
pre-activations of the tracked features (for detection onset and SASFT-style metrics), so memory grows with
B x T x (k + f); dense rows wait only until ``chunk_tokens`` of them are pending (one forward's chunk at most
beyond that).

``completion_activations(completion_mask, prompt_length)`` then gives exactly what `encode_completions` gives
from the joined dense residual (the same encoder math on the same rows; tested against it).

Two ways in::

    with capture_sparse(model, layer, sae, tracked_ids=ids) as cap:   # a forward hook on decoder layer `layer`
        model.generate(**inputs)
    acts = cap.completion_activations(completion_mask)                # prompt_length defaults to the prefill

    cap = SparseCapture(sae, tracked_ids=ids, prompt_length=P)        # no hook: feed (B, t, d) chunks yourself
    for hidden in chunks: cap.feed(hidden)                             # (an inference engine's own hook)
    codes = cap.result()                                               # SparseCodes of positions P.. (B, L, k)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from qscope_rl.hooks import ResidualCapture
from qscope_rl.sae.autoencoder import SparseAutoencoder

from .code_store import SparseCodeStore
from .detection import CompletionActivations


class SparseCodes(NamedTuple):
    """The codes of every captured position from ``start`` on, in sequence order."""

    values: Tensor  # (B, L, k) activation values, the SAE's dtype
    indices: Tensor  # (B, L, k) feature ids, int64
    pre: Tensor | None  # (B, L, f) pre-activations of the tracked features, or None
    start: int  # absolute position (in the joined residual) of the first captured code


class SparseCapture:
    """Encodes (B, t, d) residual chunks fed in sequence order; keeps top-k codes and tracked pre-activations.

    ``prompt_length``: positions before it are never encoded (the trainers only read completions). ``None``
    takes the first chunk as the prompt: in HF ``generate`` that is the prefill. ``chunk_tokens``: rows
    buffered densely before encoding (default `SparseAutoencoder.memory_bounded_chunk`, 5% of the SAE's
    weights): decode steps are encoded a few at a time, never one matmul per token on a large batch.
    ``capacity``: positions from ``start`` on to preallocate the code grid for (the trainers pass
    ``max_completion_length``); it grows by doubling past that.
    """

    def __init__(self, sae: SparseAutoencoder, *, tracked_ids: Tensor | Sequence[int] | None = None,
                 prompt_length: int | None = None, chunk_tokens: int | None = None, capacity: int = 0):
        if prompt_length is not None and prompt_length < 0:
            raise ValueError(f"prompt_length must be >= 0, got {prompt_length}")
        self.sae, self._given_prompt_length, self.capacity = sae, prompt_length, max(int(capacity), 0)
        self.chunk_tokens = chunk_tokens or sae.memory_bounded_chunk()
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        self.tracked_ids = None
        if tracked_ids is not None:
            ids = torch.as_tensor(tracked_ids, dtype=torch.long).flatten().to(sae.W_enc.device)
            if len(ids) and not bool(((ids >= 0) & (ids < sae.d_sae)).all()):
                raise ValueError(f"tracked_ids out of range for an SAE with d_sae={sae.d_sae}: {ids.tolist()}")
            self.tracked_ids = ids
        self.reset()

    def reset(self) -> None:
        """Forget everything fed so far (a new generation call)."""
        self.seen = 0  # positions fed so far, prompt included
        self.batch: int | None = None
        self._pending: list[Tensor] = []  # dense (B, t, d) chunks not encoded yet
        self._pending_positions = 0
        self._encoded = 0  # positions from `start` on that are in the store
        self.store: SparseCodeStore | None = None  # allocated at the first chunk (it knows the batch)
        self.prompt_length = self._given_prompt_length  # None again: the next first chunk is the prompt

    @property
    def start(self) -> int:
        """Absolute position of the first encoded code (the prompt length once known)."""
        return self.prompt_length if self.prompt_length is not None else 0

    @property
    def captured_length(self) -> int:
        """Positions from ``start`` on that have been fed (encoded or pending)."""
        return max(self.seen - self.start, 0)

    # -- feeding --------------------------------------------------------------------------------------

    def feed(self, hidden: Tensor) -> None:
        """One forward's residual, (B, t, d), the positions right after those fed before."""
        if hidden.ndim != 3 or hidden.shape[-1] != self.sae.d_in:
            raise ValueError(f"SparseCapture.feed expects (B, t, d_in={self.sae.d_in}) residuals, "
                             f"got shape {tuple(hidden.shape)}")
        if self.batch is None:
            self.batch = hidden.shape[0]
        elif hidden.shape[0] != self.batch:
            raise ValueError(f"SparseCapture got a chunk of batch {hidden.shape[0]} after chunks of batch "
                             f"{self.batch}: rows must stay the same across one generation (beam search and "
                             f"dropped rows are not supported)")
        if self.prompt_length is None:
            self.prompt_length = hidden.shape[1]
        first, self.seen = self.seen, self.seen + hidden.shape[1]
        skip = min(max(self.start - first, 0), hidden.shape[1])  # prompt positions in this chunk
        hidden = hidden[:, skip:].detach()
        if hidden.shape[1] == 0:
            return
        self._pending.append(hidden)
        self._pending_positions += hidden.shape[1]
        if self._pending_positions * self.batch >= self.chunk_tokens:
            self._encode_pending()

    def _new_store(self, width: int) -> SparseCodeStore:
        sae, tracked = self.sae, 0 if self.tracked_ids is None else len(self.tracked_ids)
        return SparseCodeStore(d_sae=sae.d_sae, width=width, value_dtype=sae.W_enc.dtype, device=sae.W_enc.device,
                               tracked=tracked, slots=self.batch or 0, capacity=self.capacity)

    def _encode_pending(self) -> None:
        if not self._pending:
            return
        hidden = torch.cat(self._pending, dim=1) if len(self._pending) > 1 else self._pending[0]
        self._pending, self._pending_positions = [], 0
        sae = self.sae
        with torch.no_grad():
            if self.tracked_ids is None:
                acts, pre = sae.encode_sparse(hidden, chunk_tokens=self.chunk_tokens), None
            else:
                acts, pre = sae.encode_sparse_tracked(hidden, self.tracked_ids, chunk_tokens=self.chunk_tokens)
        del hidden  # the dense rows go before the codes are written
        batch, length, width = acts.values.shape
        if self.store is None:
            self.store = self._new_store(width)
        device = self.store.device
        slots = torch.arange(batch, device=device).repeat_interleave(length)
        offsets = torch.arange(self._encoded, self._encoded + length, device=device).repeat(batch)
        self.store.write(slots, offsets, acts.values.reshape(batch * length, width),
                         acts.indices.reshape(batch * length, width),
                         None if pre is None else pre.reshape(batch * length, -1))
        self._encoded += length

    # -- results --------------------------------------------------------------------------------------

    def result(self) -> SparseCodes:
        """Codes of every position fed from ``start`` on, (B, L, k) (and (B, L, f) tracked pre-activations)."""
        self._encode_pending()
        if self.store is None:
            self.store = self._new_store(self.sae.k or 1)
        slots = torch.arange(self.batch or 0)
        values, indices, pre, _ = self.store.grid(slots, 0, self._encoded)
        return SparseCodes(values, indices, pre, self.start)

    def completion_activations(self, completion_mask: Tensor, prompt_length: int | None = None
                               ) -> CompletionActivations:
        """What `encode_completions(sae, joined_residual, completion_mask, prompt_length=...)` returns.

        completion_mask: (B, T), True on real completion tokens; completion token j sits at absolute position
        ``prompt_length + j`` (default: ``start``). Every masked position must have been fed.
        """
        self._encode_pending()
        batch = self.batch or 0
        prompt_length = self.start if prompt_length is None else prompt_length
        if completion_mask.ndim != 2 or completion_mask.shape[0] != batch:
            raise ValueError(f"completion_mask must be (B, T) with B={batch}, "
                             f"got shape {tuple(completion_mask.shape)}")
        if prompt_length < self.start:
            raise ValueError(f"prompt_length={prompt_length} is before the first encoded position "
                             f"{self.start}: those positions were never encoded")
        device = self.sae.W_enc.device
        mask = completion_mask.to(device=device, dtype=torch.bool)
        length, offset = mask.shape[1], prompt_length - self.start
        available = max(min(self._encoded - offset, length), 0)
        if bool(mask[:, available:].any()):
            raise ValueError(f"completion_mask covers completion positions {available}.. that were never fed "
                             f"(captured {self._encoded} positions from {self.start}, prompt_length="
                             f"{prompt_length}); clip the mask to the captured length")
        if self.store is None:
            self.store = self._new_store(self.sae.k or 1)
        values, indices, pre, _ = self.store.grid(torch.arange(batch), offset, length, mask)
        return CompletionActivations(values, indices, mask, pre, self.tracked_ids, self.sae.d_sae)

    def nbytes(self) -> int:
        """Bytes held by the code grid and the pending dense rows."""
        pending = sum(t.numel() * t.element_size() for t in self._pending)
        return pending + (self.store.nbytes() if self.store is not None else 0)


class SparseResidualCapture(ResidualCapture):
    """A forward hook on decoder layer ``layer`` feeding a `SparseCapture`; removed when the block exits."""

    def __init__(self, model: nn.Module, layer: int, sae: SparseAutoencoder, **kwargs):
        self.sparse = SparseCapture(sae, **kwargs)
        super().__init__(model, layer, on_forward=self.sparse.feed)

    def result(self) -> SparseCodes:
        return self.sparse.result()

    def completion_activations(self, completion_mask: Tensor, prompt_length: int | None = None
                               ) -> CompletionActivations:
        return self.sparse.completion_activations(completion_mask, prompt_length)

    @property
    def captured_length(self) -> int:
        return self.sparse.captured_length


def capture_sparse(model: nn.Module, layer: int, sae: SparseAutoencoder, **kwargs) -> SparseResidualCapture:
    """Context manager: SAE-encode the residual after ``layer`` on every forward; see SparseCapture."""
    return SparseResidualCapture(model, layer, sae, **kwargs)
