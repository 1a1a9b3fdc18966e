"""Where an SAE lives on the Hub: the repo and file(s) `load_sae` downloads for a source, found without network.

Sources: a Qwen-Scope repo id (``Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50``), a model name with a Qwen-Scope
release (``Qwen/Qwen3-1.7B``), a SAELens release name of a Qwen-Scope release (``qwen-scope-3-1.7b-base-w32k-l50``,
sae_id ``layer14``), or any SAELens-format repo with a ``sae_id``: the subfolder holding ``cfg.json`` and
``sae_weights.safetensors``, as SAELens' pretrained_saes.yaml lists them. Downloads go through huggingface_hub's
cache (`hub_download`), with ``HF_HUB_OFFLINE`` read at call time.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from .releases import (
    QWEN_SCOPE_RELEASES,
    Release,
    find_release,
    looks_like_saelens_qwen_scope,
    parse_repo_name,
    parse_sae_id,
    release_for_repo,
    release_for_saelens_name,
)


class SAELoadError(ValueError):
    """An SAE could not be loaded; the message says what was looked for and how to fix it."""


def check_k(k) -> None:
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise SAELoadError(f"k={k!r}: k must be a positive integer (or None for the format's own k)")


def same_layer(what: str, id_layer: int, layer: int | None) -> int:
    if layer is not None and layer != id_layer:
        raise SAELoadError(f"{what} is layer {id_layer}, but layer={layer} was asked for")
    return id_layer


@dataclass(frozen=True)
class HubSAE:
    """The Hub file(s) `load_sae` would download for a source and layer, found without any network access."""

    repo_id: str
    filename: str  # the weights file: layer{L}.sae.pt (Qwen-Scope) or <subfolder>/sae_weights.safetensors
    k: int | None
    release: Release | None  # None for a repo outside the Qwen-Scope table (layer range not checked)
    layer: int | None = None
    subfolder: str | None = None  # a SAELens-format repo: the folder of cfg.json + sae_weights.safetensors

    @property
    def files(self) -> tuple[str, ...]:
        """Every file to download (SAELens: the config first, so a bad sae_id fails before the weights)."""
        if self.subfolder is None:
            return (self.filename,)
        return (_in_subfolder(self.subfolder, "cfg.json"), self.filename)

    def is_cached(self) -> bool:
        """Whether the file(s) are already in the local huggingface_hub cache."""
        from huggingface_hub import try_to_load_from_cache

        return all(isinstance(try_to_load_from_cache(self.repo_id, f), str) for f in self.files)


def _in_subfolder(subfolder: str, name: str) -> str:
    return f"{subfolder}/{name}" if subfolder else name


def resolve_hub_sae(source: str, layer: int | None, k: int | None = None, sae_id: str | None = None) -> HubSAE:
    """Map a Hub repo id, model name or SAELens release name (+ layer or sae_id) to the file(s) to download,
    checking the layer against the releases table; no download. Raises `SAELoadError` / ValueError on an
    unknown model or release, or a bad layer."""
    check_k(k)
    repo_id = source
    release = release_for_saelens_name(source) or release_for_repo(source)
    if release is None and looks_like_saelens_qwen_scope(source):
        close = difflib.get_close_matches(source.lower(), [r.saelens_release for r in QWEN_SCOPE_RELEASES], n=3)
        raise SAELoadError(f"{source!r} is not one of SAELens' 14 Qwen-Scope releases"
                           + (f"; did you mean {close}?" if close else "") + " (`qscope-rl releases` lists them)")
    if release is None and sae_id is not None and parse_repo_name(source) is None and not _model_layer(source, sae_id):
        subfolder = sae_id.strip("/")  # any SAELens-format repo: <repo>/<sae_id>/{cfg.json, sae_weights.safetensors}
        return HubSAE(source, _in_subfolder(subfolder, "sae_weights.safetensors"), k, None, layer, subfolder)
    if sae_id is not None:
        layer = same_layer(f"sae_id={sae_id!r}", _qwen_scope_sae_id(source, sae_id), layer)
    if release is None and parse_repo_name(source) is None:
        # A model name: map it to its Qwen-Scope release (this also rejects unknown models early).
        try:
            release = find_release(source, k=k)
        except ValueError as err:
            raise SAELoadError(f"{err}. For a SAELens-format Hub repo pass sae_id=<the folder of cfg.json and "
                               f"sae_weights.safetensors>") from err
    repo_id = release.repo_id if release is not None else source
    if layer is None:
        raise SAELoadError(f"{repo_id} holds one SAE per decoder layer: pass layer= (or sae_id='layer<L>')")
    filename = release.filename(layer) if release is not None else f"layer{layer}.sae.pt"  # range-checked
    return HubSAE(repo_id, filename, k if k is not None else (release.k if release else _k_from_name(repo_id)),
                  release, layer)


def _model_layer(source: str, sae_id: str) -> bool:
    """Whether ``source`` is a model with a Qwen-Scope release and ``sae_id`` one of its layer ids."""
    try:
        find_release(source), parse_sae_id(sae_id)
    except ValueError:
        return False
    return True


def _k_from_name(repo_id: str) -> int | None:
    parsed = parse_repo_name(repo_id)
    return parsed[2] if parsed else None


def _qwen_scope_sae_id(source: str, sae_id: str) -> int:
    try:
        return parse_sae_id(sae_id)
    except ValueError as err:
        raise SAELoadError(f"{source}: {err}") from err



def hub_download(repo_id: str, filename: str, subfolder: str | None = None) -> Path:
    """Download one file through huggingface_hub's cache, with an actionable error when offline."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as err:  # pragma: no cover - a core dependency
        raise SAELoadError("loading SAEs from the Hub needs `pip install huggingface_hub`") from err
    # Read the variable now, not at huggingface_hub's import: offline means "only the local cache".
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")
    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=offline))
    except Exception as err:  # offline mode, no network, missing repo or file, gated repo
        why = "HF_HUB_OFFLINE is set" if offline else f"{type(err).__name__}: {str(err).splitlines()[0]}"
        if subfolder is not None:
            raise SAELoadError(
                f"could not get {filename} from the Hub repo {repo_id} ({why}). On a machine with network, run "
                f"`hf download {repo_id} --include '{_in_subfolder(subfolder, '*')}' --local-dir <DIR>`, copy <DIR> "
                f"here and call load_sae('<DIR>', sae_id={subfolder!r})."
            ) from err
        raise SAELoadError(
            f"could not get {filename} from the Hub repo {repo_id} ({why}). On a machine with network, run "
            f"`hf download {repo_id} {filename} --local-dir <DIR>`, copy <DIR> here and call "
            f"load_sae('<DIR>', layer=...) (the folder name must keep the ...-L0_<k> suffix or pass k=)."
        ) from err
