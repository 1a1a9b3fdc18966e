"""What the dry run checks beyond names and paths, so that a plan that passes is a run that starts.

- the model's shape (its config.json, local or in the Hub cache; else the Qwen-Scope releases table): the SAE
  layer must be one of its decoder layers, and the SAE's d_in its hidden size;
- a local SAE is loaded (a truncated or corrupt file fails here, not at step 0), and every pack is checked
  against it as the trainer will (shapes, layer, the SAE's identity digest);
- packs the method reads must have features, and ``mean_pre`` where the method subtracts it (SASFT alpha);
- batch sizes are positive; a checkpoint to resume from exists and is complete;
- with HF_HUB_OFFLINE set, what is not in the Hub cache is listed with the command that pre-downloads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from qscope_rl.features.feature_pack import FeaturePack, FeaturePackError
from qscope_rl.sae.loaders import SAELoadError, load_sae

from ..checkpoint import TRAINER_STATE, checkpoint_folders
from .recipe import Recipe, RecipeError


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")


def model_shape(name: str | None) -> dict | None:
    """{"num_layers", "hidden_size", "from"} of the model, read from its config.json without downloading."""
    if name is None:
        return None
    config_file = Path(name).expanduser() / "config.json"
    if not config_file.is_file():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
        config_file = Path(cached) if isinstance(cached, str) else None
    if config_file is None:
        return None
    try:
        config = json.loads(config_file.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecipeError(f"model_name_or_path={name!r}: {config_file} is unreadable or not JSON ({err})") from err
    if not isinstance(config, dict):
        raise RecipeError(f"model_name_or_path={name!r}: {config_file} must hold a JSON object")
    config = config.get("text_config") or config  # multimodal configs nest the language model's
    layers, hidden = config.get("num_hidden_layers"), config.get("hidden_size")
    if not isinstance(layers, int) or not isinstance(hidden, int):
        return None
    return {"num_layers": layers, "hidden_size": hidden, "from": str(config_file)}


def load_local_sae(recipe: Recipe):
    """The local SAE, loaded as the trainer will load it; a load error is a `RecipeError` naming sae_source."""
    config = recipe.config
    try:
        return load_sae(config.sae_source, layer=config.sae_layer, sae_id=config.sae_id, k=config.sae_k)
    except SAELoadError as err:
        raise RecipeError(f"sae_source={config.sae_source!r}, sae_layer={config.sae_layer}: {err}") from err


def check_model_fits_sae(recipe: Recipe, shape: dict | None, sae: dict | None) -> None:
    """The SAE layer must exist in the model and the SAE must read vectors of the model's hidden size."""
    if sae is None:
        return
    layer, d_in = sae.get("layer"), sae.get("d_in", sae.get("d_model"))
    if shape is None:
        recipe.notes.append("the model's config.json is not on this machine: sae_layer and the SAE's d_in are "
                            "checked against it only when the run starts")
        return
    model = recipe.run.model_name_or_path
    if layer is not None and not 0 <= layer < shape["num_layers"]:
        raise RecipeError(f"sae_layer={layer}: the model {model} has {shape['num_layers']} decoder layers "
                          f"(0..{shape['num_layers'] - 1})")
    if d_in is not None and d_in != shape["hidden_size"]:
        raise RecipeError(f"sae_source={recipe.config.sae_source!r} reads vectors of d_in={d_in}, but the model "
                          f"{model} has hidden_size={shape['hidden_size']}: the SAE was trained on another model")


def check_pack_content(recipe: Recipe, where: str, path: str, pack: FeaturePack, sae_module) -> None:
    """A pack the method reads must have features (and mean_pre where it is subtracted) and fit the SAE."""
    if len(pack) == 0:
        raise RecipeError(f"{where}={path!r}: the pack has no features; rediscover it (more texts, or another "
                          f"--rank-by)")
    config = recipe.config
    needs_alpha = (where == "sasft_pack" and getattr(config, "sasft_alpha", None) == "pack") or (
        getattr(config, "aux_loss_weight", 0) > 0 and getattr(config, "aux_loss_use_alpha", False)
        and where == ("aux_loss_pack" if getattr(config, "aux_loss_pack", None) else "code_switch_pack"))
    if needs_alpha:
        top_n = getattr(config, "sasft_top_n", None) if where == "sasft_pack" else None
        try:
            _ = (pack.top(top_n) if top_n else pack).alphas  # raises without mean_pre
        except FeaturePackError as err:
            raise RecipeError(f"{where}={path!r}: {err}; the loss subtracts each feature's mean_pre (set "
                              f"{'sasft_alpha: zero' if where == 'sasft_pack' else 'aux_loss_use_alpha: false'} "
                              f"to suppress any positive pre-activation instead)") from err
    if sae_module is not None:
        try:
            pack.check_compatible(sae_module, layer=config.sae_layer)
        except FeaturePackError as err:
            raise RecipeError(f"{where}={path!r}: {err}") from err


def check_batch_sizes(recipe: Recipe) -> None:
    config = recipe.config
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "num_generations"):
        value = getattr(config, name, None)
        if value is not None and value < 1:
            raise RecipeError(f"{name}={value}: must be >= 1")


def offline_downloads(plan: dict) -> list[dict]:
    """With HF_HUB_OFFLINE set: what the run would download, each with the command that pre-downloads it."""
    if not hub_offline():
        return []
    out = []
    if plan["model"]["status"] == "download at start":
        repo = plan["model"]["source"]
        out.append({"what": "model", "repo": repo, "command": f"hf download {repo}"})
    sae = plan["sae"] or {}
    if sae.get("status") == "download at start":
        out.append({"what": "sae", "repo": sae["repo_id"], "command": f"hf download {sae['repo_id']} {sae['file']}"})
    if plan["dataset"].get("status") == "download at start":
        repo = plan["dataset"]["source"]
        out.append({"what": "dataset", "repo": repo, "command": f"hf download {repo} --repo-type dataset"})
    return out


def check_resume(recipe: Recipe) -> str | None:
    """The checkpoint a run resumes from (``true``: the last one in output_dir), checked to exist and be complete."""
    value = recipe.config.resume_from_checkpoint
    if value is None or str(value).strip().lower() in ("", "false"):
        return None
    if str(value).strip().lower() == "true" and not Path(value).is_dir():
        found = checkpoint_folders(recipe.config.output_dir)
        if not found:
            raise RecipeError(f"resume_from_checkpoint=True: no checkpoint-<step> folder in output_dir "
                              f"{recipe.config.output_dir}")
        value = found[-1]
    if not Path(value).is_dir():
        raise RecipeError(f"resume_from_checkpoint={value!r}: no such folder")
    if not (Path(value) / TRAINER_STATE).is_file():
        complete = [c for c in checkpoint_folders(str(Path(value).parent)) if (Path(c) / TRAINER_STATE).is_file()]
        hint = f"resume from {complete[-1]}, the last complete one" if complete else "no complete one is left"
        raise RecipeError(f"resume_from_checkpoint: checkpoint {value} is incomplete (no {TRAINER_STATE}: its save "
                          f"was cut off); {hint}")
    return str(value)
