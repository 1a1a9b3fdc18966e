"""Checkpoint sidecar of the SAE trainers: the SAE, its identity, the packs, the probe and the method's settings.

The SAE is never saved into the model (it is an attribute of the trainer, not a submodule), so a checkpoint
alone does not say which SAE a run used. `SAECheckpointMixin` writes `qscope_sae.json` into every folder the
model is saved to (each checkpoint, the final `output_dir`, and so what `push_to_hub` uploads) and, on
`train(resume_from_checkpoint=...)` (a path, or True: the last checkpoint), refuses to continue with a
different SAE, other packs or other method settings, so a resumed run keeps the same SAE config and the same
`sae/*` metric stream.

Order of a save: the sidecar first, then the model, then transformers' own files, `trainer_state.json` last. So
a checkpoint without `trainer_state.json` was cut off mid-save (it is named incomplete, with the last complete
one), and one with weights but no sidecar had it deleted or was written without an SAE: resuming from it with
an SAE is refused (set QSCOPE_RL_RESUME_WITHOUT_SIDECAR=1 to go on with a loud warning).

A trainer using it has `self.sae` (None when no SAE is configured), `self.sae_layer`, `args.sae_source`, and
lists the config fields holding pack paths in `_sae_pack_fields`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import warnings

SAE_SIDECAR = "qscope_sae.json"
SIDECAR_FORMAT = "qscope-rl/sae-sidecar"
SIDECAR_VERSION = 2
TRAINER_STATE = "trainer_state.json"  # transformers writes it last: its presence marks a complete checkpoint
ALLOW_MISSING_ENV = "QSCOPE_RL_RESUME_WITHOUT_SIDECAR"
_METHOD_PREFIXES = ("sae_", "aux_loss_", "amplify_", "sasft_")
_NOT_METHOD = ("sae_source", "sae_layer", "sae_id", "sae_capture",  # recorded apart (sae_id: in sae_digest)
               "sae_log_top_features")  # no effect
_CHECKED = ("sae_source", "sae_layer", "sae_k", "sae_d_sae", "sae_digest", "packs", "repetition_probe_sha256",
            "method")
GUARD_STATE = "RewardHackingGuard"  # its key in trainer_state.json's stateful_callbacks
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class SAECheckpointMixin:
    _sae_pack_fields: tuple[str, ...] = ()

    def _sae_method_settings(self) -> dict:
        """The config fields that change what the SAE method does (thresholds, strengths, top-n, lambda, dtype)."""
        args = self.args
        names = [f.name for f in dataclasses.fields(args)] if dataclasses.is_dataclass(args) else []
        return {n: getattr(args, n) for n in sorted(names) if n.startswith(_METHOD_PREFIXES)
                and n not in _NOT_METHOD and n not in self._sae_pack_fields and not n.endswith(("_pack", "_probe"))}

    def _sae_sidecar(self) -> dict:
        from qscope_rl.sae.identity import sae_digest

        args = self.args
        packs = {name: getattr(args, name) for name in self._sae_pack_fields if getattr(args, name, None)}
        probe = getattr(args, "repetition_probe", None)  # a safetensors file: its digest stands for it
        return {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "sae_source": args.sae_source,
                "sae_layer": self.sae_layer, "sae_k": self.sae.k, "sae_d_sae": self.sae.d_sae,
                "sae_digest": sae_digest(self.sae), "packs": {n: _read_json(p) for n, p in packs.items()},
                "repetition_probe_sha256": _sha256(probe) if probe else None, "method": self._sae_method_settings()}

    def _write_sae_sidecar(self, folder: str) -> None:
        """Save the SAE's source, identity, packs and method settings beside a model (never its weights)."""
        if self.sae is None or not self.args.should_save:
            return
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, SAE_SIDECAR)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self._sae_sidecar(), f, indent=2, default=str)
        os.replace(tmp, path)  # atomic: a kill never leaves half a sidecar

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        # First, so that a checkpoint holding weights but no sidecar is recognisably not one of ours.
        self._write_sae_sidecar(output_dir if output_dir is not None else self.args.output_dir)
        return super().save_model(output_dir, _internal_call)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # transformers copies only the modeling files into output_dir before uploading it: add the sidecar
        sidecar = os.path.join(checkpoint_folder, SAE_SIDECAR)
        if os.path.isfile(sidecar) and self.args.should_save:
            shutil.copy(sidecar, os.path.join(self.args.output_dir, SAE_SIDECAR))
        return super()._push_from_checkpoint(checkpoint_folder)

    def _resume_target(self, resume_from_checkpoint):
        """The checkpoint folder a resume reads (True, or the text 'true' as a command line gives it: the last one)."""
        if isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.strip().lower() in ("true", "false") \
                and not os.path.isdir(resume_from_checkpoint):
            resume_from_checkpoint = resume_from_checkpoint.strip().lower() == "true"
        if resume_from_checkpoint is True:
            found = checkpoint_folders(self.args.output_dir)
            if not found:
                raise ValueError(f"resume_from_checkpoint=True: no checkpoint-<step> folder in output_dir "
                                 f"{self.args.output_dir}; give the checkpoint's path instead")
            return found[-1]
        return resume_from_checkpoint or None

    def _check_complete(self, checkpoint: str) -> None:
        if not os.path.isdir(checkpoint):
            raise ValueError(f"resume_from_checkpoint={checkpoint!r}: no such folder")
        if os.path.isfile(os.path.join(checkpoint, TRAINER_STATE)):
            return
        parent = os.path.dirname(os.path.abspath(checkpoint))
        complete = [c for c in checkpoint_folders(parent) if os.path.isfile(os.path.join(c, TRAINER_STATE))]
        hint = f"resume from {complete[-1]}, the last complete one" if complete else "no complete one is left"
        raise ValueError(f"checkpoint {checkpoint} is incomplete (no {TRAINER_STATE}: its save was cut off); "
                         f"{hint}, or delete it")

    def _check_sae_sidecar(self, checkpoint: str | None) -> None:
        """On resume, refuse to continue a run with a different SAE, other packs or other method settings."""
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, SAE_SIDECAR)
        if self.sae is None:
            if os.path.exists(path):
                raise ValueError(f"{checkpoint} was trained with an SAE ({path}), but this trainer has no "
                                 f"sae_source: set the run's SAE settings again to resume it")
            return
        if not os.path.exists(path):
            message = (f"{checkpoint} has no {SAE_SIDECAR}, so the SAE, packs and settings it was trained with are "
                       f"unknown (the file was deleted, or the checkpoint was written without an SAE)")
            if os.environ.get(ALLOW_MISSING_ENV, "0") not in ("", "0", "false"):
                warnings.warn(f"{message}; resuming anyway because {ALLOW_MISSING_ENV} is set", UserWarning,
                              stacklevel=3)
                return
            raise ValueError(f"{message}: resume from a checkpoint that has one, or set {ALLOW_MISSING_ENV}=1 to "
                             f"resume without the check")
        saved = _read_json(path, what="checkpoint sidecar")
        if not isinstance(saved, dict):
            raise ValueError(f"checkpoint sidecar {path} must hold a JSON object, got {type(saved).__name__}; "
                             f"the file is corrupt")
        current = json.loads(json.dumps(self._sae_sidecar(), default=str))  # as it would be saved (tuples: lists)
        unchecked = [key for key in _CHECKED if key not in saved]
        for key in _CHECKED:
            if key in saved and saved[key] != current[key]:
                raise ValueError(f"resuming from {checkpoint} with a different SAE setting: "
                                 f"{_difference(key, saved[key], current[key])}")
        if unchecked:
            warnings.warn(f"{path} was written by an older qscope-rl and does not record {unchecked}: those were "
                          f"not checked on resume", UserWarning, stacklevel=3)

    def _load_callback_state(self) -> None:
        # Reward-hacking guards are rewards too: back into the same objects, always (transformers would rebuild
        # callbacks, only when asked, by type(cb)(**args), which cannot rebuild a guard's penalty and judge).
        from qscope_rl.rewards.hacking_guard import restore_guards

        stored = self.state.stateful_callbacks
        saved = stored.pop(GUARD_STATE, None)
        if saved is not None:
            restore_guards(self.callback_handler.callbacks, saved)
        try:
            super()._load_callback_state()
        finally:
            if saved is not None:  # the next save updates this entry in place
                stored[GUARD_STATE] = saved

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        checkpoint = self._resume_target(resume_from_checkpoint)
        if checkpoint is not None:
            self._check_complete(checkpoint)
            self._check_sae_sidecar(checkpoint)
        return super().train(checkpoint, *args, **kwargs)


def _difference(key: str, was, now) -> str:
    if key == "method" and isinstance(was, dict):
        changed = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
        return "; ".join(f"method setting {k} was {was.get(k)!r}, now {now.get(k)!r}" for k in changed)
    return f"{key} was {str(was)[:200]!r}, now {str(now)[:200]!r}"


def checkpoint_folders(folder: str) -> list[str]:
    """checkpoint-<step> folders in ``folder``, by step."""
    if not os.path.isdir(folder):
        return []
    steps = [(int(m[1]), name) for name in os.listdir(folder) if (m := _CHECKPOINT.match(name))
             and os.path.isdir(os.path.join(folder, name))]
    return [os.path.join(folder, name) for _, name in sorted(steps)]


def _read_json(path: str, what: str = "feature pack"):
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {path} is not UTF-8 text (a binary file?)") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not valid JSON ({err}): the file is truncated or corrupt") from err


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
