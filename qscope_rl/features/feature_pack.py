"""A feature pack: SAE features found for one purpose, with the statistics and provenance to reuse them.

A pack names the SAE it was found on (source, layer, d_sae, d_in, and ``sae_digest``, the identity digest of its
weights: `qscope_rl.sae.identity`), the method ("language", "repetition",
"contrastive"), its features ranked best first, and what they were found on (``data``: counts, the
sha256 of the texts, the target, the parameters). Packs are JSON files so that a run can be audited
and a trainer can refuse a pack from another SAE (``check_compatible``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from qscope_rl.sae.identity import sae_digest

FORMAT = "qscope-rl/feature-pack"
FORMAT_VERSION = 1
METHODS = ("language", "repetition", "contrastive")


class FeaturePackError(ValueError):
    """A feature pack file is missing, corrupt, or does not fit the SAE it is used with."""


@dataclass
class Feature:
    """One SAE feature: its id, a readable name, its ranking score, and statistics from discovery.

    ``stats`` holds e.g. ``mean_pre`` (mean pre-activation on the positive texts: SASFT's alpha),
    ``mean_act_pos`` / ``mean_act_neg`` (mean activation per token) and ``p_fire_pos`` / ``p_fire_neg``
    (share of texts on which the feature fires on some token).
    """

    id: int
    name: str
    score: float
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class FeaturePack:
    """Features of one SAE found for one purpose, best first; see the module docstring."""

    name: str
    method: str
    model: str
    sae_source: str
    layer: int
    d_sae: int
    d_in: int
    features: list[Feature]
    data: dict = field(default_factory=dict)
    sae_digest: str | None = None  # identity of the SAE's weights; None in packs written before it was recorded

    def __post_init__(self):
        if self.method not in METHODS:
            raise FeaturePackError(f"feature pack method {self.method!r} is not one of {METHODS}")
        for f in self.features:
            if not 0 <= f.id < self.d_sae:
                raise FeaturePackError(f"feature pack {self.name!r}: feature id {f.id} out of range for "
                                       f"d_sae={self.d_sae}")
        ids = [f.id for f in self.features]
        if len(set(ids)) != len(ids):
            raise FeaturePackError(f"feature pack {self.name!r} lists a feature twice: {ids}")

    def __len__(self) -> int:
        return len(self.features)

    @property
    def ids(self) -> Tensor:
        """Feature ids, best first, (n,) int64."""
        return torch.tensor([f.id for f in self.features], dtype=torch.long)

    @property
    def alphas(self) -> Tensor:
        """Each feature's mean pre-activation on the texts it was found on (SASFT's alpha), (n,) float32."""
        missing = [f.id for f in self.features if "mean_pre" not in f.stats]
        if missing:
            raise FeaturePackError(f"feature pack {self.name!r} has no mean_pre for features {missing}")
        return torch.tensor([f.stats["mean_pre"] for f in self.features], dtype=torch.float32)

    def top(self, n: int) -> FeaturePack:
        """A copy holding only the first ``n`` features."""
        if n < 0:
            raise ValueError(f"top(n) needs n >= 0, got {n}")
        return FeaturePack(**{**self._fields(), "features": list(self.features[:n]), "data": dict(self.data)})

    def check_compatible(self, sae, layer: int | None = None) -> None:
        """Raise a ValueError naming every mismatch between this pack and ``sae`` (d_sae, d_in, layer, and the
        SAE's identity digest: another SAE of the same shape is refused too).

        ``layer`` defaults to ``sae.layer``; a pack's layer is checked only when one of them is known. A pack that
        records no digest (older qscope-rl) is checked on shapes and layer only, with a warning.
        """
        layer = sae.layer if layer is None else layer
        problems = []
        if sae.d_sae != self.d_sae:
            problems.append(f"d_sae {self.d_sae} != {sae.d_sae}")
        if sae.d_in != self.d_in:
            problems.append(f"d_in {self.d_in} != {sae.d_in}")
        if layer is not None and layer != self.layer:
            problems.append(f"layer {self.layer} != {layer}")
        if not problems and self.sae_digest is not None and self.sae_digest != sae_digest(sae):
            problems.append(f"SAE digest {self.sae_digest} != {sae_digest(sae)} (same shape, other weights)")
        if problems:
            raise FeaturePackError(
                f"feature pack {self.name!r} is from another SAE ({self.sae_source!r}, layer {self.layer}): "
                f"pack vs SAE {', '.join(problems)}; rediscover it on this SAE (`qscope-rl features discover`)"
            )
        if self.sae_digest is None:
            warnings.warn(f"feature pack {self.name!r} records no SAE digest (written by an older qscope-rl): only "
                          f"its shape and layer were checked against the SAE; rediscover it to record one",
                          UserWarning, stacklevel=2)

    # -- JSON -----------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": FORMAT_VERSION, **self._fields(),
                "features": [asdict(f) for f in self.features], "data": self.data}

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # temporary file + rename: a kill mid-write never leaves a truncated pack that is then trusted
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False, allow_nan=False) + "\n",
                           encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def from_dict(cls, d: dict, where: str = "feature pack") -> FeaturePack:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise FeaturePackError(f"{where} is not a feature pack (expected \"format\": \"{FORMAT}\")")
        if d.get("version") != FORMAT_VERSION:
            raise FeaturePackError(f"{where} has version {d.get('version')!r}; this qscope-rl reads "
                                   f"version {FORMAT_VERSION}")
        schema = {"name": str, "method": str, "model": str, "sae_source": str, "layer": int, "d_sae": int,
                  "d_in": int, "features": list, "data": dict}
        for key, kind in schema.items():
            if key not in d:
                raise FeaturePackError(f"{where} lacks the field {key!r}")
            if not isinstance(d[key], kind) or isinstance(d[key], bool):
                raise FeaturePackError(f"{where}: field {key!r} must be {kind.__name__}, "
                                       f"got {type(d[key]).__name__}")
        features = [_feature_from_dict(f, f"{where}: features[{i}]") for i, f in enumerate(d["features"])]
        digest = d.get("sae_digest")
        if digest is not None and not isinstance(digest, str):
            raise FeaturePackError(f"{where}: field 'sae_digest' must be a string, got {type(digest).__name__}")
        return cls(**{key: d[key] for key in schema if key != "features"}, features=features, sae_digest=digest)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeaturePack:
        path = Path(path)
        if not path.is_file():
            raise FeaturePackError(f"feature pack {path} does not exist")
        try:
            d = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as err:
            raise FeaturePackError(f"feature pack {path} is not UTF-8 text (a binary file?): {err}") from err
        except json.JSONDecodeError as err:
            raise FeaturePackError(f"feature pack {path} is not valid JSON ({err}): a truncated or corrupt "
                                   f"file; rediscover it") from err
        except OSError as err:
            raise FeaturePackError(f"could not read feature pack {path}: {err}") from err
        return cls.from_dict(d, where=f"feature pack {path}")

    def _fields(self) -> dict:
        return dict(name=self.name, method=self.method, model=self.model, sae_source=self.sae_source,
                    layer=self.layer, d_sae=self.d_sae, d_in=self.d_in, sae_digest=self.sae_digest)


def _feature_from_dict(d, where: str) -> Feature:
    if not isinstance(d, dict):
        raise FeaturePackError(f"{where} must be an object, got {type(d).__name__}")
    for key, kind in (("id", int), ("name", str), ("score", (int, float)), ("stats", dict)):
        if key not in d:
            raise FeaturePackError(f"{where} lacks the field {key!r}")
        if not isinstance(d[key], kind) or isinstance(d[key], bool):
            raise FeaturePackError(f"{where}: field {key!r} has the wrong type {type(d[key]).__name__}")
    stats = d["stats"]
    bad = [k for k, v in stats.items() if not isinstance(v, (int, float)) or isinstance(v, bool)
           or not math.isfinite(v)]
    if bad or not math.isfinite(d["score"]):
        raise FeaturePackError(f"{where}: score and stats must be finite numbers (bad: {bad or ['score']})")
    return Feature(d["id"], d["name"], float(d["score"]), {k: float(v) for k, v in stats.items()})


def texts_sha256(texts: Iterable[str]) -> str:
    """A digest of a text list (order matters), recorded in ``FeaturePack.data`` as provenance."""
    digest = hashlib.sha256()
    for text in texts:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()
