"""The Qwen-Scope releases: which SAE exists for which model, so mismatches are caught before a download.

Facts from the Qwen-Scope model cards (see shared/context/qwen-scope.md): fourteen Hub repos named
``Qwen/SAE-Res-<model>-W<width>-L0_<k>``, one ``layer{L}.sae.pt`` file per decoder layer.

SAELens (>= 6.43) registers the same fourteen repos under its own release names, ``qwen-scope-<model>-w<width>-l<k>``
in lower case without the leading "Qwen" (``qwen-scope-3-1.7b-base-w32k-l50``), with one ``sae_id`` per layer
(``layer14``); `Release.saelens_release` and `release_for_saelens_name` map between the two.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_REPO_NAME = re.compile(r"SAE-Res-(?P<model>.+)-W(?P<width>\d+[KkMm]?)-L0_(?P<k>\d+)$")


@dataclass(frozen=True)
class Release:
    model: str  # model name without organisation, e.g. "Qwen3-1.7B-Base"
    width: str  # "32K"
    k: int
    num_layers: int
    d_model: int
    d_sae: int

    @property
    def repo_id(self) -> str:
        return f"Qwen/SAE-Res-{self.model}-W{self.width}-L0_{self.k}"

    @property
    def saelens_release(self) -> str:
        """SAELens' name for this release, as in its pretrained_saes.yaml: ``qwen-scope-3-1.7b-base-w32k-l50``."""
        return f"qwen-scope-{self.model.lower().removeprefix('qwen')}-w{self.width.lower()}-l{self.k}"

    def filename(self, layer: int) -> str:
        if not 0 <= layer < self.num_layers:
            raise ValueError(
                f"layer {layer} does not exist in {self.repo_id}: {self.model} has {self.num_layers} "
                f"decoder layers (0..{self.num_layers - 1})"
            )
        return f"layer{layer}.sae.pt"


def _pair(model, width, layers, d_model, d_sae, ks=(50, 100), widths=None, d_saes=None):
    widths = widths or (width, width)
    d_saes = d_saes or (d_sae, d_sae)
    return [Release(model, w, k, layers, d_model, d) for w, k, d in zip(widths, ks, d_saes)]


QWEN_SCOPE_RELEASES: tuple[Release, ...] = tuple(
    _pair("Qwen3-1.7B-Base", "32K", 28, 2048, 32768)
    + _pair("Qwen3-8B-Base", "64K", 36, 4096, 65536)
    + _pair("Qwen3.5-2B-Base", "32K", 24, 2048, 32768)
    + _pair("Qwen3.5-9B-Base", "64K", 32, 4096, 65536)
    + _pair("Qwen3.5-27B", "80K", 64, 5120, 81920)
    + _pair("Qwen3-30B-A3B-Base", None, 48, 2048, None, widths=("32K", "128K"), d_saes=(32768, 131072))
    + _pair("Qwen3.5-35B-A3B-Base", None, 40, 2048, None, widths=("32K", "128K"), d_saes=(32768, 131072))
)


def release_for_repo(repo_id: str) -> Release | None:
    """The known release behind a Hub repo id, or None for a repo outside the table."""
    for release in QWEN_SCOPE_RELEASES:
        if release.repo_id.lower() == repo_id.lower():
            return release
    return None


_SAE_ID = re.compile(r"layer_?(\d+)$")


def release_for_saelens_name(name: str) -> Release | None:
    """The release SAELens calls ``name`` (``qwen-scope-3-1.7b-base-w32k-l50``), or None."""
    for release in QWEN_SCOPE_RELEASES:
        if release.saelens_release == name.strip().lower():
            return release
    return None


def looks_like_saelens_qwen_scope(name: str) -> bool:
    """Whether ``name`` is spelled like a SAELens Qwen-Scope release (known or not: a typo gets a clear error)."""
    return name.strip().lower().startswith("qwen-scope-")


def parse_sae_id(sae_id: str) -> int:
    """The layer of a SAELens Qwen-Scope ``sae_id`` (``"layer14"`` -> 14)."""
    match = _SAE_ID.fullmatch(sae_id.strip().lower())
    if match is None:
        raise ValueError(f"sae_id {sae_id!r} is not a Qwen-Scope SAE id: SAELens names them layer<L> (e.g. 'layer14')")
    return int(match[1])


def parse_repo_name(name: str) -> tuple[str, str, int] | None:
    """(model, width, k) from a name like ``SAE-Res-Qwen3-1.7B-Base-W32K-L0_50`` (a repo id or folder)."""
    match = _REPO_NAME.search(name.rstrip("/").split("/")[-1])
    return (match["model"], match["width"], int(match["k"])) if match else None


def _model_key(model: str) -> str:
    # "Qwen/Qwen3-1.7B" and "Qwen3-1.7B-Base" both mean the Qwen3-1.7B family: base SAEs transfer
    # reasonably to post-trained checkpoints (Qwen-Scope report).
    name = model.rstrip("/").split("/")[-1]
    return re.sub(r"-(Base|Instruct|Thinking.*|FP8)$", "", name, flags=re.IGNORECASE).lower()


def find_release(model: str, k: int | None = None, width: str | None = None) -> Release:
    """The Qwen-Scope release for a model name, e.g. ``find_release("Qwen/Qwen3-8B", k=50)``."""
    matches = [r for r in QWEN_SCOPE_RELEASES if _model_key(r.model) == _model_key(model)]
    if not matches:
        known = sorted({r.model for r in QWEN_SCOPE_RELEASES})
        raise ValueError(f"no Qwen-Scope SAE release for model {model!r}; releases exist for {known}")
    if k is not None:
        matches = [r for r in matches if r.k == k]
    if width is not None:
        matches = [r for r in matches if r.width.lower() == width.lower()]
    if not matches:
        options = [f"k={r.k} width={r.width}" for r in QWEN_SCOPE_RELEASES if _model_key(r.model) == _model_key(model)]
        raise ValueError(f"no Qwen-Scope release for {model!r} with k={k}, width={width}; available: {options}")
    return min(matches, key=lambda r: r.k)  # the sparser release when k is not given
