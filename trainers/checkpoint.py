"""Checkpoint sidecar of the SAE trainers: the SAE's source, layer, feature packs and probe beside each checkpoint.

The SAE is never saved into the model (it is an attribute of the trainer, not a submodule), so a checkpoint
alone does not say which SAE a run used. `SAECheckpointMixin` writes `qscope_sae.json` into every
checkpoint folder and, on `train(resume_from_checkpoint=...)`, refuses to continue with a different SAE or
different packs, so a resumed run keeps the same SAE config and the same `sae/*` metric stream.

A trainer using it has `self.sae` (None when no SAE is configured), `self.sae_layer`, `args.sae_source`, and
lists the config fields holding pack paths in `_sae_pack_fields`.
"""

from __future__ import annotations

import hashlib
import json
import os

SAE_SIDECAR = "qscope_sae.json"


class SAECheckpointMixin:
    _sae_pack_fields: tuple[str, ...] = ()

    def _sae_sidecar(self) -> dict:
        args = self.args
        packs = {name: getattr(args, name) for name in self._sae_pack_fields if getattr(args, name, None)}
        probe = getattr(args, "repetition_probe", None)  # a safetensors file: its digest stands for it
        return {"sae_source": args.sae_source, "sae_layer": self.sae_layer, "sae_k": self.sae.k,
                "sae_d_sae": self.sae.d_sae, "packs": {n: json.loads(open(p).read()) for n, p in packs.items()},
                "repetition_probe_sha256": hashlib.sha256(open(probe, "rb").read()).hexdigest() if probe else None}

    def _write_sae_sidecar(self, folder: str) -> None:
        """Save the SAE's source, layer and feature packs beside a checkpoint (never its weights)."""
        if self.sae is None or not self.args.should_save:
            return
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, SAE_SIDECAR), "w") as f:
            json.dump(self._sae_sidecar(), f, indent=2)

    def _check_sae_sidecar(self, checkpoint: str | None) -> None:
        """On resume, refuse to continue a run with a different SAE or different feature packs."""
        if self.sae is None or checkpoint is None or not os.path.isdir(checkpoint):
            return
        path = os.path.join(checkpoint, SAE_SIDECAR)
        if not os.path.exists(path):
            return
        with open(path) as f:
            saved = json.load(f)
        current = self._sae_sidecar()
        for key in ("sae_source", "sae_layer", "sae_k", "sae_d_sae", "packs", "repetition_probe_sha256"):
            if saved.get(key) != current.get(key):
                raise ValueError(f"resuming from {checkpoint} with a different SAE setting: {key} was "
                                 f"{str(saved.get(key))[:200]!r}, now {str(current.get(key))[:200]!r}")

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        self._write_sae_sidecar(os.path.join(self._get_output_dir(trial), f"checkpoint-{self.state.global_step}"))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if isinstance(resume_from_checkpoint, str):
            self._check_sae_sidecar(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)
