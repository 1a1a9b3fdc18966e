"""`SASFTTrainer`: `trl.SFTTrainer` with the SASFT loss (Qwen-Scope point 4).

    loss = CE + lambda * mean over label tokens of sum_s ReLU(pre_s(h) - alpha_s)

with h the residual after decoder layer L, s the unwanted language's features (a feature pack) and alpha_s
each feature's mean pre-activation (the pack's ``mean_pre``, or 0 with ``sasft_alpha="zero"``).

What differs from the parent: `compute_loss` runs the parent's loss with a forward hook capturing the
layer-L residual (with its graph) and adds the term from `qscope_rl.features.aux_loss.FeatureAuxLoss`; `sae/aux_loss`
is logged; the SAE's source, layer and pack are saved beside every checkpoint and checked on resume
(`SAECheckpointMixin`). The SAE is an attribute of the trainer, not a submodule of the model: never saved,
never trained, never partitioned by ZeRO. With `sae_source=None` it is `SFTTrainer`.

Departures from the paper: the term is averaged over the tokens that carry a label (completion tokens with
`completion_only_loss`, every token otherwise) instead of summed, so lambda does not scale with length; the
features come from a pack found by monolinguality score on your own data.

Gradient accumulation: the SAE term is a per-micro-batch mean. transformers' `Trainer.training_step` divides
the loss by the accumulation steps unless it considers it already scaled (`num_items_in_batch` given to a
model that accepts loss kwargs, as SFT's token-normalised CE is); in that case the term is divided here, so
its gradient is the same for any `gradient_accumulation_steps`.
"""

from __future__ import annotations

import torch
from trl import SFTTrainer

from qscope_rl.features.aux_loss import FeatureAuxLoss
from qscope_rl.features.feature_pack import FeaturePack
from qscope_rl.hooks import capture_residual, decoder_layer, hidden_size
from qscope_rl.sae.loaders import load_sae

from .checkpoint import SAECheckpointMixin
from .config import SASFTConfig, sae_trainer_config


class SASFTTrainer(SAECheckpointMixin, SFTTrainer):
    _tag_names = ["trl", "sft", "qscope-rl", "sae", "sasft"]
    _sae_pack_fields = ("sasft_pack",)
    sae = None
    sae_layer = None
    aux_loss = None

    def __init__(self, model=None, args=None, *rest, **kwargs):
        # a plain SFTConfig runs as SFTTrainer; None gets SFTTrainer's default, as an SASFTConfig
        args = sae_trainer_config(SASFTConfig, args, model, "SFT", "SASFTTrainer")
        super().__init__(model, args, *rest, **kwargs)
        self._init_sae()

    def _init_sae(self) -> None:
        args = self.args
        if args.sae_source is None:
            return
        if args.sae_layer is not None:
            decoder_layer(self.model, args.sae_layer)  # a clear error before loading a large SAE
        dtype = getattr(torch, args.sae_dtype) if args.sae_dtype else None
        sae = load_sae(args.sae_source, args.sae_layer, sae_id=args.sae_id, k=args.sae_k,
                       device=self.accelerator.device,
                       dtype=dtype)
        layer = sae.layer if args.sae_layer is None else args.sae_layer
        if layer is None:
            raise ValueError(f"the SAE {args.sae_source} does not say which layer it reads: set sae_layer")
        decoder_layer(self.model, layer)
        if sae.d_in != hidden_size(self.model):
            raise ValueError(f"the SAE {args.sae_source} has d_in={sae.d_in}, but the model's hidden size is "
                             f"{hidden_size(self.model)}: it was trained on another model")
        pack = FeaturePack.load(args.sasft_pack)
        pack.check_compatible(sae, layer=layer)
        if args.sasft_top_n is not None:
            pack = pack.top(args.sasft_top_n)
        alphas = pack.alphas if args.sasft_alpha == "pack" else None
        self.sae, self.sae_layer = sae, layer
        self.aux_loss = FeatureAuxLoss(sae, pack.ids, alphas, weight=args.sasft_lambda)

    def _aux_is_divided_by_trainer(self, num_items_in_batch) -> bool:
        """Whether `Trainer.training_step` will divide the loss by the accumulation steps (its own rule)."""
        if self.loss_is_scaled_for_ga is not None:
            return not self.loss_is_scaled_for_ga
        scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
            self.compute_loss_func is not None
        return not scaled

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.aux_loss is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with capture_residual(model, self.sae_layer, detach=False) as capture:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        # The first forward is the training one (return_outputs adds a no-grad forward after it).
        hidden = capture.chunks[0]  # (B, T, d)
        labels = inputs.get("labels")
        mask = labels != -100 if labels is not None else inputs.get("attention_mask")
        aux = self.aux_loss(hidden, mask)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["sae/aux_loss"].append(self.accelerator.gather(aux.detach()).mean().item())
        if mode == "train" and not self._aux_is_divided_by_trainer(num_items_in_batch):
            aux = aux / self.current_gradient_accumulation_steps
        loss = loss + aux.to(loss.dtype)
        return (loss, result[1]) if return_outputs else loss
