"""`SparseCodeStore`: the top-k SAE codes of rollout positions, held compactly while rollouts are generated.

One store for every capture path: `SparseCapture` (HF generate: slot = batch row, offset = position after the
prompt) and `VLLMResidualTap` (vLLM: slot = a request's order of first appearance, offset = completion token).
Per position it holds k values in the SAE's dtype (the same numbers the dense path computes, so rewards match
it exactly), k feature ids in the narrowest integer type the SAE's width allows (int16 for Qwen-Scope's 32K
SAEs), the tracked features' pre-activations, and one "written" flag: k x (4 + 2) + 4 f + 1 bytes per token
with a float32 SAE, against 2 d bytes of a bf16 residual (4,096 for Qwen3-1.7B).

The grid is preallocated (``slots`` x ``capacity``, when the caller knows them: the trainers pass the batch and
``max_completion_length``) and grown by doubling otherwise, so a decode step writes into it in place: no
per-step list of tensors, no join at the end.
"""

from __future__ import annotations

import torch
from torch import Tensor

READ_BLOCK_ELEMENTS = 2**16  # codes copied per block by `grid` (0.25 MiB of float32 values)


def index_dtype(d_sae: int) -> torch.dtype:
    """The narrowest integer type holding every feature id (int16 for Qwen-Scope's 32K SAEs)."""
    return torch.int16 if d_sae <= 2**15 else torch.int32


class SparseCodeStore:
    """A (slots, capacity) grid of top-k codes; `write` puts codes at (slot, offset) cells, `grid` reads them.

    ``width``: codes per position (the SAE's k; JumpReLU / ReLU SAEs without k may write wider chunks later:
    the grid then widens, zero-padded). ``tracked``: number of tracked pre-activations (0: none).
    """

    def __init__(self, *, d_sae: int, width: int, value_dtype: torch.dtype, device, tracked: int = 0,
                 slots: int = 0, capacity: int = 0):
        if width < 1 or tracked < 0 or slots < 0 or capacity < 0:
            raise ValueError(f"SparseCodeStore needs width >= 1 and non-negative tracked / slots / capacity, got "
                             f"width={width}, tracked={tracked}, slots={slots}, capacity={capacity}")
        self.d_sae, self.tracked, self.device = d_sae, tracked, device
        self.index_dtype = index_dtype(d_sae)
        self.values = torch.zeros(slots, capacity, width, dtype=value_dtype, device=device)
        self.indices = torch.zeros(slots, capacity, width, dtype=self.index_dtype, device=device)
        self.pre = torch.zeros(slots, capacity, tracked, dtype=value_dtype, device=device) if tracked else None
        self.written = torch.zeros(slots, capacity, dtype=torch.bool, device=device)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slots, capacity, width) of the grid as allocated now."""
        return tuple(self.values.shape)

    def _grow(self, slots: int, capacity: int, width: int) -> None:
        """Enlarge the grid to at least these sizes (doubling, so that appends cost O(1) amortised)."""
        have = self.shape
        if slots <= have[0] and capacity <= have[1] and width <= have[2]:
            return
        new = (max(slots, 2 * have[0] if slots > have[0] else have[0]),
               max(capacity, 2 * have[1] if capacity > have[1] else have[1]), max(width, have[2]))

        def enlarge(t: Tensor, last: int | None) -> Tensor:
            out = t.new_zeros(new[0], new[1], *(() if last is None else (last,)))
            out[tuple(slice(0, size) for size in t.shape)] = t
            return out

        self.values, self.indices = enlarge(self.values, new[2]), enlarge(self.indices, new[2])
        self.pre = enlarge(self.pre, self.tracked) if self.pre is not None else None
        self.written = enlarge(self.written, None)

    def write(self, slots: Tensor, offsets: Tensor, values: Tensor, indices: Tensor, pre: Tensor | None = None
              ) -> None:
        """Codes of N positions: ``slots``/``offsets`` (N,), ``values``/``indices`` (N, w), ``pre`` (N, f).
        A cell written twice keeps the later codes (vLLM recomputes a preempted request's tokens)."""
        if len(slots) == 0:
            return
        if int(slots.min()) < 0 or int(offsets.min()) < 0:
            raise ValueError("SparseCodeStore.write: slots and offsets must be >= 0")
        if (pre is None) != (self.pre is None) or (pre is not None and pre.shape[-1] != self.tracked):
            raise ValueError(f"SparseCodeStore tracks {self.tracked} pre-activations; got "
                             f"{None if pre is None else pre.shape[-1]}")
        self._grow(int(slots.max()) + 1, int(offsets.max()) + 1, values.shape[-1])
        slots, offsets = slots.to(self.device, torch.long), offsets.to(self.device, torch.long)
        cells = slots * self.shape[1] + offsets  # flat cell ids in the (slots * capacity) grid
        width = values.shape[-1]
        flat_values = self.values.view(-1, self.shape[2])
        flat_indices = self.indices.view(-1, self.shape[2])
        flat_values[cells, :width] = values.to(self.values.dtype)
        flat_indices[cells, :width] = indices.to(self.index_dtype)
        if width < self.shape[2]:  # a narrower chunk: zero the padding a wider earlier write may have left
            flat_values[cells, width:] = 0
            flat_indices[cells, width:] = 0
        if pre is not None:
            self.pre.view(-1, self.tracked)[cells] = pre.to(self.pre.dtype)
        self.written.view(-1)[cells] = True

    def grid(self, slots: Tensor, offset: int, length: int, mask: Tensor | None = None
             ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """(values, indices int64, pre, written) of cells ``offset .. offset + length - 1`` of ``slots`` (R,),
        shaped (R, length, ...); slot -1 and cells never written read as zeros (written False). ``mask`` (R,
        length): cells off it are zeroed too."""
        slots = slots.to(self.device, torch.long)
        have, width = self.shape[:2], self.shape[2]
        rows = len(slots)
        values = self.values.new_zeros(rows, length, width)
        indices = torch.zeros(rows, length, width, dtype=torch.long, device=self.device)
        pre = self.pre.new_zeros(rows, length, self.tracked) if self.pre is not None else None
        written = torch.zeros(rows, length, dtype=torch.bool, device=self.device)
        known = (slots >= 0) & (slots < have[0])
        span = max(min(have[1] - offset, length), 0)
        if span and bool(known.any()):
            take, src = known.nonzero().squeeze(1), slots[known]
            cells = slice(offset, offset + span)
            # a block of rows at a time: indexing copies what it reads, so one read of everything would hold a
            # second copy of every code (and an int64 one of the int16 ids) beside the outputs
            step = max(1, READ_BLOCK_ELEMENTS // (span * width))
            for lo in range(0, len(take), step):
                rows_out, rows_in = take[lo:lo + step], src[lo:lo + step]
                values[rows_out, :span] = self.values[rows_in, cells]
                indices[rows_out, :span] = self.indices[rows_in, cells].long()
                if pre is not None:
                    pre[rows_out, :span] = self.pre[rows_in, cells]
                written[rows_out, :span] = self.written[rows_in, cells]
        keep = written if mask is None else written & mask.to(self.device, torch.bool)
        values.masked_fill_(~keep.unsqueeze(-1), 0)
        indices.masked_fill_(~keep.unsqueeze(-1), 0)
        if pre is not None:
            pre.masked_fill_(~keep.unsqueeze(-1), 0)
        return values, indices, pre, written

    def nbytes(self) -> int:
        """Bytes the grid holds now."""
        tensors = [self.values, self.indices, self.written] + ([self.pre] if self.pre is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)
