"""`load_sae`: one entry point for Qwen-Scope, SAELens and EleutherAI sparsify SAEs, local or on the Hub.

Formats, detected from the files present:
- Qwen-Scope native: ``layer{L}.sae.pt``, a plain dict ``W_enc`` (d_sae, d_in), ``W_dec`` (d_in, d_sae),
  ``b_enc``, ``b_dec``; TopK with k from the ``L0_<k>`` part of the folder / repo name.
- SAELens: ``cfg.json`` + ``sae_weights.safetensors`` with ``W_enc`` (d_in, d_sae), ``W_dec`` (d_sae, d_in).
- sparsify: ``cfg.json`` + ``sae.safetensors`` with ``encoder.weight`` (d_sae, d_in), ``W_dec`` (d_sae, d_in).

``.pt`` files are only ever read with ``torch.load(weights_only=True)``: a pickle that would run code
is refused.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from .autoencoder import SparseAutoencoder
from .hub import HubSAE, SAELoadError, check_k, hub_download, resolve_hub_sae, same_layer
from .identity import remember_digest
from .releases import parse_repo_name, parse_sae_id

__all__ = ["HubSAE", "SAELoadError", "load_sae", "resolve_hub_sae", "sae_source_kind"]

_LAYER_FILE = re.compile(r"layer(\d+)\.sae\.pt$")
_HOOK_LAYER = re.compile(r"(?:layers|blocks|h)\.(\d+)")


def load_sae(
    source: str | os.PathLike,
    layer: int | str | None = None,
    *,
    sae_id: str | None = None,
    k: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> SparseAutoencoder:
    """Load a frozen SAE for the residual stream at the output of decoder layer ``layer``.

    ``source`` is a local folder or file, a Hub repo id (``Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50``),
    a model name with a Qwen-Scope release (``Qwen/Qwen3-1.7B``; the k=50 release unless ``k`` is
    given), or a SAELens release name of a Qwen-Scope release (``qwen-scope-3-1.7b-base-w32k-l50``).
    ``sae_id`` follows SAELens' ``SAE.from_pretrained(release, sae_id)``: ``"layer14"`` for Qwen-Scope, or
    the subfolder holding ``cfg.json`` + ``sae_weights.safetensors`` in any SAELens-format Hub repo (or local
    folder); a string in place of ``layer`` is read as the sae_id. ``k`` overrides the format's k (for TopK)
    or caps the width of ``encode_sparse`` (others).
    """
    check_k(k)
    if isinstance(layer, str):  # load_sae(release, "layer14"), as SAE.from_pretrained(release, sae_id)
        if sae_id is not None:
            raise SAELoadError(f"got layer={layer!r} and sae_id={sae_id!r}: give the SAE id once")
        layer, sae_id = None, layer
    path = Path(os.fspath(source)).expanduser()
    if path.exists():
        path, layer = _local_sae_id(path, layer, sae_id)
        sae = _load_local(path, layer, k)
    elif _looks_like_path(str(source)):
        raise SAELoadError(f"SAE path {str(source)!r} does not exist")
    else:
        sae = _load_hub(str(source), layer, k, sae_id)
    remember_digest(sae)  # before any dtype cast: the identity packs and checkpoints record
    if dtype is not None or device is not None:
        sae = sae.to(device=device, dtype=dtype)
    return sae.requires_grad_(False).eval()


def _local_sae_id(path: Path, layer: int | None, sae_id: str | None) -> tuple[Path, int | None]:
    """A local folder and a SAELens sae_id: its subfolder (a downloaded SAELens repo) or a Qwen-Scope layer."""
    if sae_id is None:
        return path, layer
    if (path / sae_id).is_dir():
        return path / sae_id, layer
    try:
        id_layer = parse_sae_id(sae_id)
    except ValueError as err:
        raise SAELoadError(f"{path} has no subfolder {sae_id!r} (sae_id), and it is not a Qwen-Scope layer id "
                           f"(layer<L>)") from err
    return path, same_layer(f"sae_id={sae_id!r}", id_layer, layer)


def _looks_like_path(source: str) -> bool:
    # A Hub id is "org/name" (or a bare model name); anything else that does not exist is a bad path.
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or \
        source.endswith((".pt", ".safetensors", ".json"))


# -- local ------------------------------------------------------------------------------------------


def _load_local(path: Path, layer: int | None, k: int | None) -> SparseAutoencoder:
    if path.is_file():
        match = _LAYER_FILE.search(path.name)
        if not match:
            raise SAELoadError(f"{path} is not an SAE file: expected layer<L>.sae.pt or a folder")
        file_layer = int(match[1])
        if layer is not None and layer != file_layer:
            raise SAELoadError(f"{path} holds layer {file_layer}, but layer {layer} was asked for")
        return _load_qwen_scope_file(path, file_layer, _given(k, _k_from_name(path.parent.name)), str(path))
    layer_files = {int(m[1]): p for p in path.iterdir() if (m := _LAYER_FILE.search(p.name))}
    if layer_files:
        return _load_qwen_scope_folder(path, layer_files, layer, k)
    if (path / "cfg.json").exists():
        return _load_cfg_folder(path, layer, k)
    # A folder of per-hookpoint subfolders, as sparsify and SAELens releases save them.
    subfolders = {int(m[1]): p for p in sorted(path.iterdir()) if p.is_dir()
                  and (p / "cfg.json").exists() and (m := _HOOK_LAYER.search(p.name))}
    if subfolders:
        if layer is None:
            raise SAELoadError(f"{path} holds SAEs for layers {sorted(subfolders)}: pass layer=")
        if layer not in subfolders:
            raise SAELoadError(f"{path} has no SAE for layer {layer}; it has layers {sorted(subfolders)}")
        return _load_cfg_folder(subfolders[layer], layer, k)
    raise SAELoadError(
        f"no SAE found in {path}: expected layer<L>.sae.pt files (Qwen-Scope), cfg.json + "
        f"sae_weights.safetensors (SAELens) or cfg.json + sae.safetensors (sparsify)"
    )


def _given(value, default):
    """``value`` unless it is None: 0 is a value (and refused where it is not legal), not "not given"."""
    return default if value is None else value


def _k_from_name(name: str) -> int | None:
    parsed = parse_repo_name(name)
    return parsed[2] if parsed else None


def _load_qwen_scope_folder(path: Path, files: dict[int, Path], layer: int | None, k: int | None):
    if layer is None:
        if len(files) > 1:
            raise SAELoadError(f"{path} holds SAEs for layers {sorted(files)}: pass layer=")
        layer = next(iter(files))
    if layer not in files:
        raise SAELoadError(f"{path} has no layer{layer}.sae.pt; it has layers {sorted(files)}")
    k = _given(k, _k_from_name(path.name))
    return _load_qwen_scope_file(files[layer], layer, k, str(path))


def _load_qwen_scope_file(file: Path, layer: int, k: int | None, source: str) -> SparseAutoencoder:
    if k is None:
        raise SAELoadError(
            f"cannot tell k for {file}: Qwen-Scope files carry no config, k comes from the folder name "
            f"(...-L0_<k>); rename the folder or pass k="
        )
    weights = _torch_load_tensors(file)
    return _from_weights(weights, source, architecture="topk", k=k, layer=layer)


def _torch_load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        weights = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise SAELoadError(
            f"refusing to load {file}: it is not a plain dict of tensors, and unpickling it could run code "
            f"(torch.load(weights_only=True) rejected it: {str(err).splitlines()[0]})"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise SAELoadError(f"could not read {file}: corrupt or not a torch file ({err})") from err
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise SAELoadError(f"{file} does not hold a dict of tensors (got {type(weights).__name__})")
    return weights


def _from_weights(weights, source, **kwargs) -> SparseAutoencoder:
    # Integer or bool tensors would make an SAE whose activations round to 0: refuse them.
    for name, tensor in weights.items():
        if not tensor.is_floating_point():
            raise SAELoadError(f"bad SAE weights in {source}: {name} has dtype {tensor.dtype}; SAE weights must be "
                               f"floating-point (float32 / bfloat16 / float16)")
    if kwargs.get("k") is not None:
        _check_int(source, "k", kwargs["k"])
    try:
        return SparseAutoencoder.from_weights(weights, source=source, **kwargs)
    except ValueError as err:
        raise SAELoadError(f"bad SAE weights in {source}: {err}") from err


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file, device="cpu")
    except Exception as err:  # safetensors raises its own error types for truncated / invalid files
        raise SAELoadError(f"could not read {file}: corrupt or not a safetensors file ({err})") from err


def _load_cfg_folder(path: Path, layer: int | None, k: int | None) -> SparseAutoencoder:
    cfg = _read_cfg(path / "cfg.json")
    if (path / "sae_weights.safetensors").exists():
        return _from_saelens(path, cfg, layer, k)
    if (path / "sae.safetensors").exists():
        return _from_sparsify(path, cfg, layer, k)
    raise SAELoadError(f"{path} has cfg.json but neither sae_weights.safetensors (SAELens) nor sae.safetensors")


_CFG_INTS = ("d_in", "d_sae", "k")


def _read_cfg(file: Path) -> dict:
    """cfg.json as a dict, its size fields checked to be integers; errors name the file and the field."""
    try:
        cfg = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise SAELoadError(f"{file} is not UTF-8 text (a binary or mis-encoded file?): {err}") from err
    except json.JSONDecodeError as err:
        raise SAELoadError(f"{file} is not valid JSON: {err}") from err
    except OSError as err:
        raise SAELoadError(f"could not read {file}: {err}") from err
    if not isinstance(cfg, dict):
        raise SAELoadError(f"{file} must hold a JSON object, got {type(cfg).__name__}")
    for name in _CFG_INTS:
        if cfg.get(name) is not None:
            _check_int(file, name, cfg[name])
    kwargs = cfg.get("activation_fn_kwargs")
    if isinstance(kwargs, dict) and kwargs.get("k") is not None:
        _check_int(file, "activation_fn_kwargs.k", kwargs["k"])
    return cfg


def _check_int(where, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        got = f"the string {value!r}" if isinstance(value, str) else f"{value!r} ({type(value).__name__})"
        raise SAELoadError(f"{where}: field {name!r} must be an integer, got {got}")
    if name.endswith("k") and value < 1:
        raise SAELoadError(f"{where}: k={value}: k must be a positive integer")


def _check_layer(path: Path, hook_layer: int | None, layer: int | None) -> int | None:
    if layer is not None and hook_layer is not None and layer != hook_layer:
        raise SAELoadError(f"{path} was trained on layer {hook_layer}, but layer {layer} was asked for")
    return layer if layer is not None else hook_layer


def _from_saelens(path: Path, cfg: dict, layer: int | None, k: int | None) -> SparseAutoencoder:
    metadata = cfg.get("metadata") or {}
    hook_name = cfg.get("hook_name") or metadata.get("hook_name") or ""
    hook_layer = _saelens_layer(path, hook_name)
    architecture = cfg.get("architecture", "standard")
    # SAELens < 6 wrote topk SAEs as "standard" with activation_fn_str="topk".
    if architecture == "standard" and cfg.get("activation_fn_str") == "topk":
        architecture = "topk"
        k = _given(k, (cfg.get("activation_fn_kwargs") or {}).get("k"))
    names = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}
    if architecture not in names:
        raise SAELoadError(f"{path}: SAELens architecture {architecture!r} is not supported; "
                           f"supported: {sorted(names)}")
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise SAELoadError(f"{path}: normalize_activations={norm!r} is not supported (only 'none')")
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise SAELoadError(f"{path}: rescale_acts_by_decoder_norm=True is not supported")
    k = _given(k, cfg.get("k"))
    raw = _read_safetensors(path / "sae_weights.safetensors")
    if "W_enc" not in raw or "W_dec" not in raw:
        raise SAELoadError(f"{path}: sae_weights.safetensors lacks W_enc/W_dec; found {sorted(raw)}")
    weights = {"W_enc": raw["W_enc"].T, "W_dec": raw["W_dec"].T, "b_enc": raw.get("b_enc"),
               "b_dec": raw.get("b_dec"), "threshold": raw.get("threshold")}
    weights = {n: t.contiguous() for n, t in weights.items() if t is not None}
    _check_cfg_sizes(path, cfg, weights)
    return _from_weights(weights, str(path), architecture=names[architecture], k=k,
                         layer=_check_layer(path, hook_layer, layer),
                         apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", False)))


def _saelens_layer(path: Path, hook_name: str) -> int | None:
    match = _HOOK_LAYER.search(hook_name)
    if not match:
        return None
    layer = int(match[1])
    # hook_resid_pre of block L is the output of decoder layer L - 1.
    if hook_name.endswith("hook_resid_pre"):
        if layer == 0:
            raise SAELoadError(f"{path}: {hook_name} reads the embeddings, not a decoder layer output")
        layer -= 1
    elif hook_name.startswith("blocks.") and not hook_name.endswith("hook_resid_post"):
        raise SAELoadError(f"{path}: hook {hook_name!r} is not a residual-stream hook "
                           f"(hook_resid_post / hook_resid_pre)")
    return layer


def _from_sparsify(path: Path, cfg: dict, layer: int | None, k: int | None) -> SparseAutoencoder:
    if cfg.get("activation", "topk") != "topk":
        raise SAELoadError(f"{path}: sparsify activation {cfg['activation']!r} is not supported (only topk)")
    if cfg.get("skip_connection") or cfg.get("transcode"):
        raise SAELoadError(f"{path}: sparsify transcoders / skip connections are not residual SAEs")
    raw = _read_safetensors(path / "sae.safetensors")
    if "encoder.weight" not in raw:
        raise SAELoadError(f"{path}: sae.safetensors lacks encoder.weight; found {sorted(raw)}")
    weights = {"W_enc": raw["encoder.weight"], "b_enc": raw.get("encoder.bias"),
               "W_dec": raw["W_dec"].T.contiguous() if "W_dec" in raw else None, "b_dec": raw.get("b_dec")}
    weights = {n: t for n, t in weights.items() if t is not None}
    _check_cfg_sizes(path, cfg, weights)
    # sparsify names SAEs after the hookpoint ("layers.10"): read the layer from the folder name.
    match = _HOOK_LAYER.search(path.name)
    hook_layer = int(match[1]) if match else None
    return _from_weights(weights, str(path), architecture="topk", k=_given(k, cfg.get("k")),
                         layer=_check_layer(path, hook_layer, layer), apply_b_dec_to_input=True)


def _check_cfg_sizes(path: Path, cfg: dict, weights: dict) -> None:
    d_sae, d_in = weights["W_enc"].shape
    if cfg.get("d_in") not in (None, d_in):
        raise SAELoadError(f"{path}: cfg.json says d_in={cfg['d_in']} but the weights have d_in={d_in}")
    if cfg.get("d_sae") not in (None, d_sae):
        raise SAELoadError(f"{path}: cfg.json says d_sae={cfg['d_sae']} but the weights have d_sae={d_sae}")


# -- Hub --------------------------------------------------------------------------------------------


def sae_source_kind(source: str | os.PathLike) -> str:
    """How `load_sae` reads a source: "local" (it exists), "missing" (a path that does not) or "hub"."""
    if Path(os.fspath(source)).expanduser().exists():
        return "local"
    return "missing" if _looks_like_path(str(source)) else "hub"


def _load_hub(source: str, layer: int | None, k: int | None, sae_id: str | None = None) -> SparseAutoencoder:
    hub = resolve_hub_sae(source, layer, k, sae_id)
    if hub.subfolder is not None:
        folder = [hub_download(hub.repo_id, name, hub.subfolder) for name in hub.files][0].parent
        return _load_cfg_folder(folder, hub.layer, k)
    file = hub_download(hub.repo_id, hub.filename)
    sae = _load_qwen_scope_file(file, hub.layer, hub.k, hub.repo_id)
    release = hub.release
    if release is not None and (sae.d_in, sae.d_sae) != (release.d_model, release.d_sae):
        raise SAELoadError(f"{hub.repo_id}/{hub.filename} has d_in={sae.d_in}, d_sae={sae.d_sae}; the release "
                           f"table says d_model={release.d_model}, d_sae={release.d_sae}")
    return sae
