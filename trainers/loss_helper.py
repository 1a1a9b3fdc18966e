"""`SAELossHelper`: the SAE auxiliary loss (SASFT / feature suppression) for a hand-written PyTorch loop.

The trainers add this term themselves; this helper is for loops that are not a TRL trainer (accelerate,
a custom PPO, ...). It wraps `FeatureAuxLoss` and the residual capture of `residual_for_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from qscope_rl.features.aux_loss import FeatureAuxLoss
from qscope_rl.features.feature_pack import FeaturePack
from qscope_rl.hooks import capture_residual, decoder_layer, hidden_size
from qscope_rl.sae.autoencoder import SparseAutoencoder


class SAELossHelper:
    """``weight * mean over masked tokens of sum_s ReLU(pre_s(h) - alpha_s)`` for one forward of ``model``.

    ``pack``: a `FeaturePack` (or its path; alphas = its ``mean_pre`` when ``use_alpha``, the SASFT term) or
    plain feature ids (alpha = 0: generic suppression). The hook resolves the layer through DDP, DeepSpeed
    and PEFT wrappers; the SAE stays outside the model (never trained, never partitioned by ZeRO).

    Example::

        helper = SAELossHelper(model, sae, "zh.json", weight=0.1)
        with helper.capture():
            out = model(**batch)
        loss = out.loss + helper.loss(batch["attention_mask"])
        accelerator.backward(loss)

    ``loss(mask)`` reads the last forward of the capture; a (B, T) mask shorter than the sequence applies
    to its last T positions (completion tokens after the prompt). Scale it for gradient accumulation as you
    scale the rest of your loss.
    """

    def __init__(self, model: nn.Module, sae: SparseAutoencoder, pack: FeaturePack | str | Sequence[int] | Tensor,
                 weight: float = 1.0, *, layer: int | None = None, use_alpha: bool = True):
        self.layer = sae.layer if layer is None else layer
        if self.layer is None:
            raise ValueError("the SAE does not say which layer it reads: pass layer=")
        decoder_layer(model, self.layer)  # a clear error when the model has no such layer
        if sae.d_in != hidden_size(model):
            raise ValueError(f"the SAE has d_in={sae.d_in}, but the model's hidden size is {hidden_size(model)}")
        if isinstance(pack, str) or hasattr(pack, "__fspath__"):
            pack = FeaturePack.load(pack)
        if isinstance(pack, FeaturePack):
            pack.check_compatible(sae, layer=self.layer)
            ids, alphas = pack.ids, pack.alphas if use_alpha else None
        else:
            ids, alphas = torch.as_tensor(pack, dtype=torch.long), None
        self.model, self.aux = model, FeatureAuxLoss(sae, ids, alphas, weight=weight)
        self._capture = None
        self.last_value: Tensor | None = None

    @contextmanager
    def capture(self):
        """Capture the residual (with its graph) of the forwards run inside the block."""
        with capture_residual(self.model, self.layer, detach=False) as cap:
            self._capture = cap
            yield self

    def loss(self, mask: Tensor | None = None) -> Tensor:
        """The auxiliary term of the last captured forward; ``mask`` (B, T) selects tokens (e.g. completions)."""
        if self._capture is None or not self._capture.chunks:
            raise RuntimeError("no forward was captured: run the model inside `with helper.capture():`")
        hidden = self._capture.last  # (B, T_all, d)
        if mask is not None:
            if mask.ndim != 2 or mask.shape[0] != hidden.shape[0] or mask.shape[1] > hidden.shape[1]:
                raise ValueError(f"mask must be (B, T) with T <= {hidden.shape[1]} and B = {hidden.shape[0]}, "
                                 f"got {tuple(mask.shape)}")
            hidden = hidden[:, hidden.shape[1] - mask.shape[1]:]
        value = self.aux(hidden, mask)
        self.last_value = value.detach()
        return value
