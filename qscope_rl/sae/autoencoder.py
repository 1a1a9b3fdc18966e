"""One frozen sparse autoencoder module for the residual-stream SAEs in use.

Architectures:
- ``topk``: keep the k largest pre-activations, ReLU them (Qwen-Scope, EleutherAI sparsify, SAELens topk).
- ``jumprelu``: ``pre * (pre > threshold)`` (Gemma Scope, SAELens jumprelu and BatchTopK exports).
- ``relu``: ``relu(pre)`` (SAELens "standard").

Weights are stored in the Qwen-Scope / ``nn.Linear`` layout: ``W_enc`` (d_sae, d_in), ``W_dec`` (d_in, d_sae),
so that ``pre = x @ W_enc.T + b_enc`` and ``x_hat = acts @ W_dec.T + b_dec``. Formats that subtract
``b_dec`` before encoding (sparsify, SAELens with ``apply_b_dec_to_input``) set ``apply_b_dec_to_input``.

The module is frozen: its parameters never require grad, and it lives outside any policy model, so it
is never saved with the model, trained with it, or partitioned by ZeRO.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ARCHITECTURES = ("topk", "jumprelu", "relu")

# Rows encoded at once by `encode_sparse`: bounds the dense (chunk, d_sae) pre-activation buffer.
DEFAULT_CHUNK_TOKENS = 1024


# Block width of the CPU top-k (see `topk_codes`); None everywhere falls back to torch.topk.
TOPK_BLOCK = 64


def topk_codes(pre: Tensor, k: int, block: int | None = TOPK_BLOCK) -> tuple[Tensor, Tensor]:
    """``pre.topk(k, dim=-1, sorted=False)`` of a 2-D CPU tensor, faster at Qwen-Scope's widths.

    CPU top-k copies every row into a (value, index) heap of d_sae entries; instead, take each block of
    ``block`` features' maximum, keep the k blocks with the largest maxima and top-k only their k * block
    entries. Exact: a feature outside those blocks is at most its block's maximum, which is at most each of the
    k kept maxima, so it can only tie with the k-th value (tied values may then come from other features, as
    torch.topk's own choice among ties is unspecified; a NaN makes its block's maximum NaN, which ranks first
    as in torch.topk). Used where it measured faster (benchmarks/encode.py): CPU tensors whose width has at
    least 4k blocks; elsewhere (CUDA, small SAEs) this is torch.topk.
    """
    rows, width = pre.shape
    if block is None or pre.is_cuda or width % block or width // block < 4 * k:
        return pre.topk(k, dim=-1, sorted=False)
    blocks = pre.view(rows, width // block, block)
    kept = blocks.amax(-1).topk(k, dim=-1, sorted=False).indices  # (rows, k)
    candidates = blocks.gather(1, kept.unsqueeze(-1).expand(rows, k, block)).view(rows, k * block)
    values, where = candidates.topk(k, dim=-1, sorted=False)
    return values, kept.gather(1, where // block) * block + where % block


class SparseActs(NamedTuple):
    """Sparse SAE activations: the active features of each token, padded with zeros to a fixed width."""

    values: Tensor  # (..., k) activation values, >= 0
    indices: Tensor  # (..., k) feature ids, int64

    def to_dense(self, d_sae: int) -> Tensor:
        """Scatter into a dense (..., d_sae) tensor (for small inputs and tests)."""
        dense = self.values.new_zeros(*self.values.shape[:-1], d_sae)
        return dense.scatter_add_(-1, self.indices, self.values)

    def feature(self, feature_id: int) -> Tensor:
        """Activation of one feature for every token, shape (...)."""
        return (self.values * (self.indices == feature_id)).sum(-1)

    def features(self, feature_ids: Tensor) -> Tensor:
        """Activations of several features for every token, shape (..., len(feature_ids))."""
        match = self.indices.unsqueeze(-1) == feature_ids.to(self.indices.device)  # (..., k, f)
        return (self.values.unsqueeze(-1) * match).sum(-2)


class SparseAutoencoder(nn.Module):
    """A frozen residual-stream SAE: ``encode``, ``encode_sparse``, ``pre_acts``, ``decode``."""

    topk_block: int | None = TOPK_BLOCK  # `topk_codes`'s block in encode_sparse; None: plain torch.topk

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        architecture: str = "topk",
        k: int | None = None,
        layer: int | None = None,
        apply_b_dec_to_input: bool = False,
        source: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown SAE architecture {architecture!r}; expected one of {ARCHITECTURES}")
        if d_in <= 0 or d_sae <= 0:
            raise ValueError(f"SAE sizes must be positive, got d_in={d_in}, d_sae={d_sae}")
        if architecture == "topk" and k is None:
            raise ValueError("a topk SAE needs k (the number of active features per token)")
        if k is not None and not 0 < k <= d_sae:
            raise ValueError(f"k={k} must be in 1..d_sae={d_sae}")
        self.d_in, self.d_sae, self.k = d_in, d_sae, k
        self.architecture, self.layer, self.source = architecture, layer, source
        self.apply_b_dec_to_input = apply_b_dec_to_input
        factory = {"device": device, "dtype": dtype}
        self.W_enc = nn.Parameter(torch.zeros(d_sae, d_in, **factory), requires_grad=False)
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **factory), requires_grad=False)
        self.W_dec = nn.Parameter(torch.zeros(d_in, d_sae, **factory), requires_grad=False)
        self.b_dec = nn.Parameter(torch.zeros(d_in, **factory), requires_grad=False)
        if architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(d_sae, **factory), requires_grad=False)

    @classmethod
    def from_weights(cls, weights: dict[str, Tensor], **kwargs) -> SparseAutoencoder:
        """Build from Qwen-Scope-layout tensors, checking names, shapes and values."""
        required = ["W_enc", "b_enc", "W_dec", "b_dec"]
        if kwargs.get("architecture") == "jumprelu":
            required.append("threshold")
        missing = [name for name in required if name not in weights]
        if missing:
            raise ValueError(f"SAE weights are missing {missing}; found {sorted(weights)}")
        W_enc = weights["W_enc"]
        if W_enc.ndim != 2:
            raise ValueError(f"W_enc must be 2-D (d_sae, d_in), got shape {tuple(W_enc.shape)}")
        d_sae, d_in = W_enc.shape
        expected = {"b_enc": (d_sae,), "W_dec": (d_in, d_sae), "b_dec": (d_in,), "threshold": (d_sae,)}
        for name in required[1:]:
            if tuple(weights[name].shape) != expected[name]:
                raise ValueError(
                    f"SAE tensor {name} has shape {tuple(weights[name].shape)}, expected {expected[name]} "
                    f"for W_enc of shape (d_sae={d_sae}, d_in={d_in})"
                )
        for name in required:
            # checked in slices of about 64K elements (rows of a 2-D tensor, no copy): isfinite allocates an abs()
            # copy and two masks of its input, 1.75x a whole float32 W_dec; split by 4096 rows, W_dec's (d_in, d_sae)
            # was one slice, and that transient was the trainers' largest memory cost (benchmarks/real_shape.py)
            tensor = weights[name]
            rows = max(1, 2**16 // max(tensor[0].numel() if tensor.ndim > 1 else 1, 1))
            if not all(bool(torch.isfinite(part).all()) for part in tensor.split(rows)):
                raise ValueError(f"SAE tensor {name} contains NaN or inf values")
        dtype = kwargs.pop("dtype", None) or W_enc.dtype
        # Built on the meta device, then the loaded tensors are adopted (a copy only where the dtype changes):
        # a fresh module plus copy_ would hold the SAE twice while loading.
        sae = cls(d_in, d_sae, dtype=dtype, device="meta", **kwargs)
        state = {name: weights[name].detach().to(dtype).contiguous() for name in required}
        sae.load_state_dict(state, assign=True)
        for param in sae.parameters():
            param.requires_grad_(False)  # assign=True takes the loaded tensors' flags: keep the SAE frozen
        return sae

    # -- encoding -------------------------------------------------------------------------------------

    def pre_acts(self, x: Tensor) -> Tensor:
        """Pre-activations ``x @ W_enc.T + b_enc`` (dense, (..., d_sae)); the SASFT loss reads these."""
        self._check_input(x)
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return F.linear(x, self.W_enc, self.b_enc)

    def activate(self, pre: Tensor) -> Tensor:
        """Apply the architecture's sparsifying nonlinearity to dense pre-activations."""
        if self.architecture == "topk":
            values, indices = pre.topk(self.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter_(-1, indices, values.relu())
        if self.architecture == "jumprelu":
            return pre * (pre > self.threshold)
        return pre.relu()

    def encode(self, x: Tensor) -> Tensor:
        """Dense feature activations (..., d_sae), numerically those of the source format."""
        return self.activate(self.pre_acts(x))

    def memory_bounded_chunk(self, budget: float = 0.05, floor_bytes: int = 8 * 2**20) -> int:
        """Tokens per `encode_sparse` chunk whose dense buffers stay within ``budget`` of the SAE's weights,
        or within ``floor_bytes`` where that is larger (tiny SAEs would otherwise encode a few tokens a call).

        A chunk holds about two (chunk, d_sae) buffers (pre-activations and top-k's workspace) and the
        weights are about 2 * d_in * d_sae numbers, so the budget allows ``budget * d_in`` tokens (102 for
        Qwen3-1.7B). Trainers encode rollouts with it, so encoding never costs more than 5% of the SAE again.
        """
        per_token = 2 * self.d_sae * self.W_enc.element_size()
        return max(1, int(budget * self.d_in), floor_bytes // per_token)

    def encode_sparse(self, x: Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> SparseActs:
        """Active features of each token without building the dense (N, d_sae) activation tensor.

        Tokens are encoded ``chunk_tokens`` at a time, so memory is bounded by one (chunk, d_sae) buffer.
        TopK SAEs return exactly k entries per token; JumpReLU/ReLU SAEs return ``self.k`` entries if set,
        else as many as the busiest token has, zero-padded.
        """
        return self._encode_sparse(x, chunk_tokens, None)[0]

    def encode_sparse_tracked(self, x: Tensor, tracked_ids, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
                              ) -> tuple[SparseActs, Tensor]:
        """``encode_sparse`` and the pre-activations of features ``tracked_ids``, (..., len(tracked_ids)).

        The tracked columns are read out of each chunk's pre-activations (no second matmul), and keep autograd
        when ``x`` has it (for SASFT-style losses).
        """
        ids = torch.as_tensor(tracked_ids, dtype=torch.long, device=self.W_enc.device).flatten()
        if len(ids) and not bool(((ids >= 0) & (ids < self.d_sae)).all()):
            raise ValueError(f"tracked_ids out of range for an SAE with d_sae={self.d_sae}: {ids.tolist()}")
        return self._encode_sparse(x, chunk_tokens, ids)

    def _encode_sparse(self, x: Tensor, chunk_tokens: int, tracked_ids: Tensor | None):
        self._check_input(x)
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.d_in)
        values, indices, tracked = [], [], []
        for chunk in flat.split(chunk_tokens) if len(flat) else ():  # an empty input splits into one empty chunk
            pre = self.pre_acts(chunk)  # (chunk, d_sae)
            if tracked_ids is not None:
                tracked.append(pre.index_select(-1, tracked_ids))
            if self.architecture == "topk":
                v, i = topk_codes(pre, self.k, self.topk_block)
                v = v.relu()
            else:
                pre = self.activate(pre)  # reuse the name so that `del pre` frees the activations too
                width = self.k or max(int((pre > 0).sum(-1).max()), 1)
                v, i = pre.topk(min(width, self.d_sae), dim=-1, sorted=False)
            values.append(v)
            indices.append(i)
            del pre  # free this chunk's (chunk, d_sae) buffer before the next one is allocated
        width = max((v.shape[-1] for v in values), default=self.k or 1)
        values = [F.pad(v, (0, width - v.shape[-1])) for v in values]
        indices = [F.pad(i, (0, width - i.shape[-1])) for i in indices]
        pre_tracked = None  # (..., f) for encode_sparse_tracked
        if tracked_ids is not None:
            pre_tracked = torch.cat(tracked).reshape(*lead, len(tracked_ids)) if tracked else \
                flat.new_zeros(*lead, len(tracked_ids), dtype=self.W_enc.dtype)
        if not values:
            empty = flat.new_zeros(0, width, dtype=self.W_enc.dtype)
            return SparseActs(empty.reshape(*lead, width), empty.long().reshape(*lead, width)), pre_tracked
        acts = SparseActs(torch.cat(values).reshape(*lead, width), torch.cat(indices).reshape(*lead, width))
        return acts, pre_tracked

    # -- decoding -------------------------------------------------------------------------------------

    def decode(self, acts: Tensor) -> Tensor:
        """Reconstruct the residual stream from dense activations: ``acts @ W_dec.T + b_dec``."""
        return F.linear(acts.to(self.W_dec.dtype), self.W_dec, self.b_dec)

    def decode_sparse(self, acts: SparseActs) -> Tensor:
        """Reconstruct from sparse activations without a dense (N, d_sae) tensor."""
        columns = self.W_dec.T[acts.indices]  # (..., k, d_in)
        return (acts.values.unsqueeze(-1).to(columns.dtype) * columns).sum(-2) + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode_sparse(self.encode_sparse(x))

    def decoder_direction(self, feature: int, normalize: bool = False) -> Tensor:
        """The decoder column of a feature, (d_in,): what adding one unit of that feature writes."""
        if not 0 <= feature < self.d_sae:
            raise IndexError(f"feature {feature} out of range for an SAE with d_sae={self.d_sae}")
        direction = self.W_dec[:, feature]
        return direction / direction.norm() if normalize else direction

    @torch.no_grad()
    def fvu(self, x: Tensor) -> float:
        """Fraction of variance unexplained by the reconstruction of x (N, d_in)."""
        x = x.reshape(-1, self.d_in).to(self.W_dec.dtype)
        residual = (x - self(x)).pow(2).sum()
        return float(residual / (x - x.mean(0)).pow(2).sum())

    def _check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise ValueError(
                f"SAE expects inputs with last dimension d_in={self.d_in}, got shape {tuple(x.shape)}"
            )

    def extra_repr(self) -> str:
        return (
            f"architecture={self.architecture}, d_in={self.d_in}, d_sae={self.d_sae}, k={self.k}, "
            f"layer={self.layer}, source={self.source!r}"
        )

    def train(self, mode: bool = True) -> SparseAutoencoder:
        # Frozen by design: keep it in eval mode whatever the caller asks.
        return super().train(False)
