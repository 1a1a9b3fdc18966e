"""Auxiliary losses on SAE pre-activations, computed from the residual stream of a training forward.

SASFT (Qwen-Scope point 4): ``lambda * sum_s ReLU(pre_s(h) - alpha_s)`` over unwanted-language features s,
with ``alpha_s`` the feature's pre-estimated mean pre-activation. With ``alpha = 0`` the same term is a
generic "suppress these features" penalty. Only the f tracked rows of ``W_enc`` are used, so the term
costs ``f * d_in`` per token and never builds a (tokens, d_sae) tensor.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qscope_rl.hooks import capture_residual
from qscope_rl.sae.autoencoder import SparseAutoencoder


class FeatureAuxLoss:
    """Mean over masked tokens of ``sum_s ReLU(pre_s(h) - alpha_s)``, times ``weight``.

    Example::

        aux = FeatureAuxLoss(sae, pack.ids, pack.alphas, weight=0.1)
        loss = ce + aux(hidden, completion_mask)
    """

    def __init__(self, sae: SparseAutoencoder, feature_ids: Tensor, alphas: Tensor | None = None,
                 weight: float = 1.0):
        feature_ids = torch.as_tensor(feature_ids, dtype=torch.long)
        if feature_ids.numel() == 0:
            raise ValueError("FeatureAuxLoss needs at least one feature id")
        if int(feature_ids.min()) < 0 or int(feature_ids.max()) >= sae.d_sae:
            raise ValueError(f"feature ids must be in 0..{sae.d_sae - 1}, got {feature_ids.tolist()}")
        if alphas is not None and torch.as_tensor(alphas).shape != feature_ids.shape:
            raise ValueError(f"alphas must have one value per feature ({feature_ids.numel()}), "
                             f"got shape {tuple(torch.as_tensor(alphas).shape)}")
        device, dtype = sae.W_enc.device, sae.W_enc.dtype
        self.sae, self.weight = sae, float(weight)
        self.feature_ids = feature_ids.to(device)
        # Copies of the few encoder rows: frozen constants of the loss, not parameters of anything.
        self.W = sae.W_enc[self.feature_ids].detach().clone()  # (f, d_in)
        self.b = sae.b_enc[self.feature_ids].detach().clone()  # (f,)
        self.alphas = (torch.zeros(len(self.feature_ids)) if alphas is None else torch.as_tensor(alphas)).to(
            device=device, dtype=dtype)

    def pre_acts(self, hidden: Tensor) -> Tensor:
        """Differentiable pre-activations of the tracked features, (..., f)."""
        x = hidden.to(device=self.W.device, dtype=self.W.dtype)
        if self.sae.apply_b_dec_to_input:
            x = x - self.sae.b_dec
        return F.linear(x, self.W, self.b)

    def __call__(self, hidden: Tensor, mask: Tensor | None = None) -> Tensor:
        per_token = (self.pre_acts(hidden) - self.alphas).relu().sum(-1)  # (B, T)
        if mask is None:
            return self.weight * per_token.mean()
        mask = mask.to(per_token.device, per_token.dtype)
        return self.weight * (per_token * mask).sum() / mask.sum().clamp(min=1.0)


@contextmanager
def residual_for_loss(model: nn.Module, layer: int):
    """Capture the residual after ``layer`` WITH its graph during a training forward, for an aux loss.

    Example (any PyTorch / accelerate loop)::

        with residual_for_loss(model, sae.layer) as cap:
            out = model(**batch)
        loss = out.loss + aux(cap.last[:, -completion_len:], completion_mask)
    """
    with capture_residual(model, layer, detach=False) as cap:
        yield cap
