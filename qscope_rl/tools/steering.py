"""Steering with SAE features: add ``alpha * d_j`` to the residual stream, or clamp a feature's activation.

Three modes, ``a_j(h)`` being the SAE's own (sparse) encoding of the current hidden state:

- ``"add"``, Qwen-Scope's controllable inference: ``h <- h + alpha * d_j`` at every position, where ``d_j`` is
  feature j's decoder column; alpha > 0 amplifies, alpha < 0 suppresses.
- ``"clamp"``: set the feature's activation to a value through the decoder, ``h <- h + (v - a_j(h)) * d_j``,
  at every position.
- ``"conditional"``: scale the feature's decoded contribution by a factor m only where it fires,
  ``h <- h + (m - 1) * a_j(h) * d_j`` (m = 0 removes it, m = 2 doubles it). Where the feature is silent the
  residual is untouched, and the SAE's error term ``h - decode(encode(h))`` is kept everywhere, since the edit
  is added to ``h`` rather than replacing it by the reconstruction. AxBench finds that additive steering at large
  alpha costs fluency; this mode never pushes a position the feature does not already describe.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from qscope_rl.hooks import ResidualEdit, hidden_size
from qscope_rl.sae.autoencoder import SparseAutoencoder

MODES = ("add", "clamp", "conditional", "pre_clamp")


def _as_items(features: Mapping[int, float] | Iterable[tuple[int, float]]) -> list[tuple[int, float]]:
    """(feature id, strength) pairs, refusing what ``int`` / ``float`` would silently misread: a fractional
    or boolean id, a text strength, a NaN or infinite one (it would turn every later logit into NaN)."""
    items = list(features.items() if isinstance(features, Mapping) else features)
    if not items:
        raise ValueError("steering needs at least one (feature, strength) pair")
    out = []
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"steering features are (feature, strength) pairs or a {{feature: strength}} map, "
                             f"got {item!r}")
        feature, strength = item
        if isinstance(feature, bool) or not isinstance(feature, numbers.Integral | torch.Tensor) \
                or (isinstance(feature, torch.Tensor) and (feature.numel() != 1 or feature.is_floating_point())):
            raise ValueError(f"feature ids must be integers, got {feature!r}")
        if isinstance(strength, bool) or not isinstance(strength, numbers.Real | torch.Tensor):
            raise ValueError(f"the strength of feature {int(feature)} must be a number, got {strength!r} "
                             "(relative presets such as '-medium' go through relative_strengths)")
        if not math.isfinite(float(strength)):
            raise ValueError(f"steering strengths must be finite, got {float(strength)} for feature {int(feature)}")
        out.append((int(feature), float(strength)))
    return out


class _AddFeatures:
    """delta = sum_j alpha_j * d_j, precomputed once."""

    def __init__(self, sae: SparseAutoencoder, items: list[tuple[int, float]]):
        ids = torch.tensor([f for f, _ in items])
        alphas = torch.tensor([s for _, s in items], dtype=sae.W_dec.dtype, device=sae.W_dec.device)
        self.vector = sae.W_dec[:, ids.to(sae.W_dec.device)] @ alphas  # (d_in,)

    def __call__(self, hidden: Tensor) -> Tensor:
        return self.vector.to(hidden.device)


class _ClampFeatures:
    """delta = sum_j (v_j - a_j(h)) * d_j, with a_j from a sparse encoding of the current hidden states."""

    def __init__(self, sae: SparseAutoencoder, items: list[tuple[int, float]]):
        self.sae = sae
        self.ids = torch.tensor([f for f, _ in items], device=sae.W_dec.device)
        self.values = torch.tensor([s for _, s in items], dtype=sae.W_dec.dtype, device=sae.W_dec.device)
        self.columns = sae.W_dec[:, self.ids].T  # (f, d_in)

    @torch.no_grad()
    def __call__(self, hidden: Tensor) -> Tensor:
        current = self.sae.encode_sparse(hidden.to(self.sae.W_dec.device)).features(self.ids)  # (B, T, f)
        return ((self.values - current) @ self.columns).to(hidden.device)  # (B, T, d_in)


class _ScaleWhereFiring(_ClampFeatures):
    """delta = sum_j (m_j - 1) * a_j(h) * d_j: zero wherever feature j is silent (a_j(h) = 0)."""

    @torch.no_grad()
    def __call__(self, hidden: Tensor) -> Tensor:
        current = self.sae.encode_sparse(hidden.to(self.sae.W_dec.device)).features(self.ids)  # (B, T, f)
        return (((self.values - 1) * current) @ self.columns).to(hidden.device)


class _CapPreActivation(_ClampFeatures):
    """delta = -sum_j ReLU(pre_j(h) - v_j) / (e_j . d_j) * d_j: zero wherever pre_j(h) <= v_j."""

    def __init__(self, sae: SparseAutoencoder, items: list[tuple[int, float]]):
        super().__init__(sae, items)
        self.rows = sae.W_enc[self.ids]  # (f, d_in)
        self.gain = (self.rows * self.columns).sum(1)  # e_j . d_j: how much a unit step along d_j moves pre_j
        bad = [int(f) for f, g in zip(self.ids.tolist(), self.gain.tolist()) if g <= 1e-6]
        if bad:
            raise ValueError(f"pre_clamp cannot lower features {bad}: their decoder column does not raise their "
                             "own pre-activation (e_j . d_j <= 0)")
        self.bias = sae.b_enc[self.ids] - (self.rows @ sae.b_dec if sae.apply_b_dec_to_input else 0)

    @torch.no_grad()
    def __call__(self, hidden: Tensor) -> Tensor:
        pre = hidden.to(self.rows.dtype).to(self.rows.device) @ self.rows.T + self.bias  # (B, T, f)
        excess = (pre - self.values).clamp(min=0) / self.gain
        return (-excess @ self.columns).to(hidden.device)


_DELTAS = {"add": _AddFeatures, "clamp": _ClampFeatures, "conditional": _ScaleWhereFiring,
           "pre_clamp": _CapPreActivation}


def steer(
    model: nn.Module,
    sae: SparseAutoencoder,
    features: Mapping[int, float] | Iterable[tuple[int, float]],
    *,
    mode: str = "add",
    layer: int | None = None,
    rows: Iterable[int] | Tensor | None = None,
    positions: Iterable[int] | slice | None = None,
) -> ResidualEdit:
    """Context manager steering ``model`` with SAE features at the SAE's layer.

    ``features`` maps feature id to strength: alpha for ``mode="add"``, the target activation for
    ``mode="clamp"``, the factor on the feature's decoded contribution where it fires for ``mode="conditional"``
    (0 ablates it; it must be >= 0), the ceiling on its pre-activation for ``mode="pre_clamp"``.
    ``rows`` / ``positions`` restrict the edit to some batch rows / token positions
    (see ``ResidualEdit``). Example::

        with steer(model, sae, {1234: -8.0}):  # suppress feature 1234
            out = model.generate(**inputs)
        with steer(model, sae, {1234: 0.0}, mode="conditional"):  # remove it only where it fires
            out = model.generate(**inputs)
    """
    if mode not in MODES:
        raise ValueError(f"unknown steering mode {mode!r}; expected one of {MODES}")
    layer = sae.layer if layer is None else layer
    if layer is None:
        raise ValueError("the SAE does not know its layer: pass layer=")
    if sae.d_in != hidden_size(model):
        raise ValueError(f"SAE d_in={sae.d_in} does not match the model's hidden size {hidden_size(model)}")
    items = _as_items(features)
    for feature, _ in items:
        if not 0 <= feature < sae.d_sae:
            raise ValueError(f"feature {feature} out of range for an SAE with d_sae={sae.d_sae}")
    if mode == "conditional" and any(s < 0 for _, s in items):
        raise ValueError("conditional steering scales a feature where it fires: factors must be >= 0 "
                         f"(0 removes it), got {[s for _, s in items if s < 0]}")
    delta = _DELTAS[mode](sae, items)
    return ResidualEdit(model, layer, delta, rows=rows, positions=positions)
