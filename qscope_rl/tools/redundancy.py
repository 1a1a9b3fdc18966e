"""Evaluation redundancy: how much of a benchmark its own subsets already cover, and how benchmarks overlap.

Qwen-Scope (point 6): a sample's footprint is the set of SAE features active (> 0) at its LAST token; a
benchmark's footprint F(D) is the union over its samples.

- coverage curve: c_n = expected share of F(D) covered by a random subset of n samples, n = 1..N. It is
  computed exactly, not by drawing subsets: a feature present in m of the N samples is missed by a random
  n-subset with probability C(N - m, n) / C(N, n).
- redundancy R = mean over n of c_n, the area under the normalised coverage curve, in (0, 1]: high when a
  few samples already cover what the whole benchmark does. Departure from the report's
  ``R = sum_n c_n / |F(D)|`` (c_n counted in features): we divide by N as well, so that benchmarks of
  different sizes compare.
- overlap(A -> B) = |F(A) & F(B)| / |F(A)|, the share of A's footprint inside B's (asymmetric).
- performance-based redundancy (what R is checked against): given per-sample scores of several models, how
  well a random n-subset's mean scores already reproduce the whole benchmark's, as the expected Pearson
  correlation across models of the two score vectors, averaged over n = 1..N (``performance_redundancy``).
- footprints at any token (``footprints(..., where="any")``, ours): the features active anywhere in a sample,
  for samples (whole documents) whose last token says little about the rest.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from qscope_rl.features.text_features import encode_texts
from qscope_rl.plots import pyplot, save_figure
from qscope_rl.sae.autoencoder import SparseAutoencoder

FOOTPRINTS = ("last", "any")


def footprints(model, tokenizer, sae: SparseAutoencoder, texts: Sequence[str], *, where: str = "last",
               **kwargs) -> list[frozenset[int]]:
    """Per text, the features active at its last token (``where="last"``, its Qwen-Scope footprint), or at any
    of its tokens (``where="any"``, ours: a document's content, not only how it ends)."""
    if where not in FOOTPRINTS:
        raise ValueError(f"unknown footprint where={where!r}; expected one of {FOOTPRINTS}")
    return footprints_of(encode_texts(model, tokenizer, sae, texts, desc="redundancy: encode", **kwargs), where)


def footprints_of(feats, where: str = "last") -> list[frozenset[int]]:
    """``footprints`` from already encoded ``TextFeatures``."""
    if where not in FOOTPRINTS:
        raise ValueError(f"unknown footprint where={where!r}; expected one of {FOOTPRINTS}")
    if where == "any":
        return [frozenset(torch.nonzero(row > 0).flatten().tolist()) for row in feats.max_acts]
    return [frozenset(s) for s in feats.last_footprints()]


def _union(samples: Sequence[frozenset[int]]) -> frozenset[int]:
    return frozenset().union(*samples)


def coverage_curve(samples: Sequence[frozenset[int]]) -> Tensor:
    """(N,) c_n for n = 1..N: expected share of the footprint covered by a random n-subset of the samples."""
    if not samples:
        raise ValueError("coverage of an empty benchmark is undefined: it has no samples")
    features = sorted(_union(samples))
    if not features:
        return torch.ones(len(samples), dtype=torch.float64)
    index = {f: i for i, f in enumerate(features)}
    m = torch.zeros(len(features), dtype=torch.float64)  # samples each feature appears in
    for s in samples:
        m[[index[f] for f in s]] += 1
    N = torch.tensor(float(len(samples)), dtype=torch.float64)
    n = torch.arange(1, len(samples) + 1, dtype=torch.float64)[:, None]  # (N, 1)
    # log C(N - m, n) - log C(N, n), with C(a, b) = 0 when b > a (masked below; clamped to stay finite)
    missed = (torch.lgamma(N - m + 1) - torch.lgamma((N - m - n + 1).clamp(min=1))
              - torch.lgamma(N + 1) + torch.lgamma(N - n + 1))
    p_missed = torch.where(n <= N - m, missed.exp(), torch.zeros(()))
    return (1 - p_missed).mean(1)


def redundancy_score(samples: Sequence[frozenset[int]]) -> float:
    """R in (0, 1]: mean of the coverage curve (see the module docstring)."""
    return float(coverage_curve(samples).mean())


def performance_redundancy(scores: Tensor, *, draws: int = 32, seed: int = 0) -> float:
    """Mean over n = 1..N of E[corr(mean score of a random n-subset, mean score of all N)], the correlation
    taken across models; ``scores`` is (N samples, M models), M >= 3. High when a few samples already rank and
    space the models as the whole benchmark does. Expectations are over ``draws`` seeded subsets per n (exact
    at n = N, where it is 1)."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if scores.ndim != 2 or scores.shape[0] < 1 or scores.shape[1] < 3:
        raise ValueError(f"scores must be (samples, models) with at least 3 models, got {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError("scores must be finite: a NaN or infinite score makes every correlation NaN")
    n_samples = scores.shape[0]
    full = scores.mean(0)
    full = full - full.mean()
    if float(full.norm()) == 0:
        raise ValueError("every model has the same mean score on this benchmark: their agreement is undefined")
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for n in range(1, n_samples + 1):
        if n == n_samples:
            total += 1.0
            continue
        idx = torch.argsort(torch.rand(draws, n_samples, generator=g), 1)[:, :n]  # (draws, n) without replacement
        sub = scores[idx].mean(1)  # (draws, M)
        sub = sub - sub.mean(1, keepdim=True)
        corr = (sub @ full) / (sub.norm(dim=1) * full.norm()).clamp(min=1e-300)
        total += float(corr.mean())
    return total / n_samples


def overlap(a: frozenset[int], b: frozenset[int]) -> float:
    """Share of footprint ``a`` inside footprint ``b`` (0 for an empty ``a``)."""
    return len(a & b) / len(a) if a else 0.0


@dataclass
class RedundancyReport:
    """Footprint statistics of several benchmarks; ``overlap[i, j]`` = overlap(names[i] -> names[j])."""

    names: list[str]
    n_samples: list[int]
    footprint_size: list[int]
    redundancy: list[float]
    overlap: Tensor  # (B, B)

    def to_dict(self) -> dict:
        return {"benchmarks": {n: {"n_samples": s, "footprint_size": f, "redundancy": r}
                               for n, s, f, r in zip(self.names, self.n_samples, self.footprint_size,
                                                     self.redundancy)},
                "overlap": {a: {b: float(self.overlap[i, j]) for j, b in enumerate(self.names)}
                            for i, a in enumerate(self.names)}}

    def table(self) -> str:
        width = max(8, *(len(n) for n in self.names))
        lines = [f"{'benchmark':<{width}} {'samples':>7} {'|F|':>5} {'R':>6}   overlap(row -> column)",
                 f"{'':<{width}} {'':>7} {'':>5} {'':>6}   " + " ".join(f"{n[:7]:>7}" for n in self.names)]
        for i, name in enumerate(self.names):
            row = " ".join(f"{float(v):>7.3f}" for v in self.overlap[i])
            lines.append(f"{name:<{width}} {self.n_samples[i]:>7} {self.footprint_size[i]:>5} "
                         f"{self.redundancy[i]:>6.3f}   {row}")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike, title: str = "overlap(row -> column)") -> Path:
        """Heatmap PNG of the overlap matrix, values written in the cells."""
        plt = pyplot()

        size = 1.2 + 0.6 * len(self.names)
        fig, ax = plt.subplots(figsize=(size + 1.2, size))
        image = ax.imshow(self.overlap.numpy(), vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(self.names)), labels=self.names, rotation=45, ha="right")
        ax.set_yticks(range(len(self.names)), labels=[f"{n} (R={r:.2f})" for n, r in zip(self.names, self.redundancy)])
        for i in range(len(self.names)):
            for j in range(len(self.names)):
                v = float(self.overlap[i, j])
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
        fig.colorbar(image, ax=ax, fraction=0.046)
        ax.set_title(title)
        return save_figure(fig, path)


def compare_footprints(benchmarks: Mapping[str, Sequence[frozenset[int]]]) -> RedundancyReport:
    """Redundancy of each benchmark and their overlap matrix, from per-sample footprints."""
    if not benchmarks:
        raise ValueError("no benchmarks to compare")
    empty = [name for name, samples in benchmarks.items() if not samples]
    if empty:
        raise ValueError(f"benchmarks {empty} have no samples")
    names = list(benchmarks)
    unions = [_union(benchmarks[n]) for n in names]
    matrix = torch.tensor([[overlap(a, b) for b in unions] for a in unions], dtype=torch.float64)
    return RedundancyReport(names, [len(benchmarks[n]) for n in names], [len(u) for u in unions],
                            [redundancy_score(benchmarks[n]) for n in names], matrix)


def compare_benchmarks(model, tokenizer, sae: SparseAutoencoder, benchmarks: Mapping[str, Sequence[str]],
                       **kwargs) -> RedundancyReport:
    """``compare_footprints`` on the texts of each benchmark (encoded once, all benchmarks in one pass)."""
    if not benchmarks:
        raise ValueError("no benchmarks to compare")
    empty = [name for name, texts in benchmarks.items() if len(texts) == 0]
    if empty:
        raise ValueError(f"benchmarks {empty} have no samples")
    names = list(benchmarks)
    texts = [t for n in names for t in benchmarks[n]]
    prints = footprints(model, tokenizer, sae, texts, **kwargs)
    out, start = {}, 0
    for n in names:
        out[n] = prints[start:start + len(benchmarks[n])]
        start += len(benchmarks[n])
    return compare_footprints(out)
