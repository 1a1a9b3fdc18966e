"""Evaluation benchmarks built from the demo world, with known overlap, and their performance-based redundancy.

The report (Qwen-Scope, point 6) checks its footprint redundancy R against a performance-based redundancy over
17 real benchmarks (Spearman 0.85) and shows an asymmetric overlap (GSM8K -> MATH 0.63, MATH -> GSM8K 0.10).
The world's version, fixed up front:

- cells: (topic, language) pairs of held-out documents. A benchmark is a set of cells, ``per_benchmark``
  documents drawn evenly from them; one is built from only 8 distinct documents, each repeated (a duplicated
  benchmark). True overlap(A -> B) = share of A's cells that are B's cells (asymmetric when sizes differ).
- performance, measured by the model itself: a family of models made from the world's LM by ablating a random
  eighth of one layer's MLP neurons (``n_models``, seeded); a sample's score under a model is its mean token
  loss minus the intact model's. Performance-based redundancy = ``performance_redundancy`` of those scores.
- the asymmetric pair: a narrow benchmark (2 English topics) against the broadest (every cell).
- two checks of the reference itself (added after R missed it; neither is tuned on R): its reliability, the
  Spearman between the performance-based redundancies that two halves of the model family give
  (``reference_reliability``: no measure can agree with a reference better than the reference agrees with
  itself), and its validity, the Spearman with the redundancy the benchmarks were built with
  (``designed_redundancy``: fewer distinct cells = more redundant, the duplicated benchmark above all).
"""

from __future__ import annotations

import random

import torch

ASYMMETRIC_PAIR = ("T01-en", "all")  # narrow (2 topics, 1 language) -> the broadest (every cell)


def benchmark_cells(world) -> dict[str, list[tuple[str, str]]]:
    """{name: cells}: 14 benchmarks of 1 to all cells (8 topics x the world's languages on today's world); the
    names say which topics (T0123: the first half) and languages ("all": every language)."""
    t = world.topics
    langs = sorted({d.lang for d in world.documents("heldout")})
    first, second = langs[0], langs[1]

    def cells(topics, ls):
        return [(t[i], lang) for i in topics for lang in ls]

    n = len(t)
    half, quarter = list(range(n // 2)), list(range(n // 4))
    return {
        f"T0-{first}": cells([0], [first]), "T0-dup": cells([0], [first]), "T0-all": cells([0], langs),
        f"T01-{first}": cells(quarter, [first]), f"T01-{second}": cells(quarter, [second]),
        f"T0123-{first}": cells(half, [first]), f"T0123-{second}": cells(half, [second]),
        "T0123-all": cells(half, langs), f"T4567-{first}": cells(range(n // 2, n), [first]),
        "T4567-all": cells(range(n // 2, n), langs), f"T2345-{first}": cells(range(n // 4, n // 4 + n // 2), [first]),
        f"all-{first}": cells(range(n), [first]), f"all-{second}": cells(range(n), [second]),
        "all": cells(range(n), langs),
    }


def designed_redundancy(world) -> dict[str, float]:
    """{name: how redundant the benchmark was built to be}, for ranking only: minus its number of distinct
    (topic, language) cells, and half a cell more for the duplicated benchmark (8 documents of one cell)."""
    return {name: -len(cells) + 0.5 * name.endswith("-dup") for name, cells in benchmark_cells(world).items()}


def reference_reliability(scores: torch.Tensor, index: dict[str, list[int]], seed: int = 0) -> float:
    """Spearman, across the benchmarks in ``index``, of the performance-based redundancies given by the first and
    the second half of the model family (the columns of ``scores``; a family of consecutive models spans every
    layer in both halves)."""
    from qscope_rl.tools.redundancy import performance_redundancy

    half = scores.shape[1] // 2
    if half < 3:
        raise ValueError(f"the reference's reliability needs two halves of at least 3 models, got "
                         f"{scores.shape[1]} models")
    first = [performance_redundancy(scores[idx, :half], seed=seed) for idx in index.values()]
    second = [performance_redundancy(scores[idx, half:2 * half], seed=seed) for idx in index.values()]
    return spearman(first, second)


def min_cell_size(world) -> int:
    """Held-out documents in the world's smallest (topic, language) cell: the largest benchmark one cell can fill."""
    counts: dict[tuple[str, str], int] = {}
    for d in world.documents("heldout"):
        counts[(d.topic, d.lang)] = counts.get((d.topic, d.lang), 0) + 1
    return min(counts.values())


def world_benchmarks(world, per_benchmark: int = 48, seed: int = 0, duplicates: int = 8):
    """({name: indices into world.documents("heldout")}, {(a, b): true overlap}) for one draw of documents."""
    docs = world.documents("heldout")
    by_cell: dict[tuple[str, str], list[int]] = {}
    for i, d in enumerate(docs):
        by_cell.setdefault((d.topic, d.lang), []).append(i)
    rng = random.Random(seed)
    spec = benchmark_cells(world)
    out = {}
    for name, cells in spec.items():
        if name.endswith("-dup"):  # a few distinct documents, repeated up to the benchmark's size
            distinct = rng.sample(by_cell[cells[0]], duplicates)
            out[name] = [distinct[i % duplicates] for i in range(per_benchmark)]
            continue
        per_cell = [per_benchmark // len(cells) + (j < per_benchmark % len(cells)) for j in range(len(cells))]
        short = [(c, k) for c, k in zip(cells, per_cell) if len(by_cell.get(c, ())) < k]
        if short:
            (topic, lang), k = short[0]
            raise ValueError(f"benchmark {name!r} needs {k} held-out documents of topic {topic!r} in {lang!r}, the "
                             f"world has {len(by_cell.get((topic, lang), ()))}: ask for per_benchmark <= "
                             f"{min_cell_size(world)}")
        out[name] = [i for c, k in zip(cells, per_cell) for i in rng.sample(by_cell[c], k)]
    truth = {(a, b): len(set(spec[a]) & set(spec[b])) / len(set(spec[a])) for a in spec for b in spec if a != b}
    return out, truth


def benchmark_draws(world, scores: torch.Tensor, per_benchmark: int, draws: int):
    """Per draw ``d`` of the benchmarks' documents (``world_benchmarks`` seeded ``d``): (index, true overlap, the
    performance-based redundancy of each benchmark from ``scores``, its subsets seeded ``d``)."""
    from qscope_rl.tools.redundancy import performance_redundancy

    out = []
    for draw in range(draws):
        index, truth = world_benchmarks(world, per_benchmark=per_benchmark, seed=draw)
        out.append((index, truth, [performance_redundancy(scores[idx], seed=draw) for idx in index.values()]))
    return out


@torch.no_grad()
def document_losses(model, tokenizer, texts, batch_size: int = 32) -> torch.Tensor:
    """(n,) mean next-token loss of each text under ``model``."""
    out = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(texts), batch_size):
        ids = [tokenizer(t)["input_ids"] for t in texts[start:start + batch_size]]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for r, x in enumerate(ids):
            input_ids[r, :len(x)] = torch.tensor(x)
            mask[r, :len(x)] = 1
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
        m = mask[:, 1:].float()
        out.append((nll * m).sum(1) / m.sum(1).clamp(min=1))
    return torch.cat(out)


class _AblateNeurons:
    """Zero some intermediate channels of one MLP (a pre-hook on its down projection), removed on exit."""

    def __init__(self, mlp, channels: torch.Tensor):
        self.module, self.channels, self.handle = mlp.down_proj, channels, None

    def _hook(self, module, args):
        x = args[0].clone()
        x[..., self.channels] = 0
        return (x,)

    def __enter__(self):
        self.handle = self.module.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def model_family_scores(world, texts, n_models: int = 24, share: float = 0.125, seed: int = 0,
                        progress: bool = True) -> torch.Tensor:
    """(n texts, n_models) loss of each text under each ablated model minus its loss under the intact model."""
    from tqdm.auto import tqdm

    from qscope_rl.hooks import decoder_layers

    model, tok = world.model, world.tokenizer
    layers = decoder_layers(model)
    base = document_losses(model, tok, texts)
    g = torch.Generator().manual_seed(seed)
    scores = []
    for m in tqdm(range(n_models), desc="redundancy: model family", leave=False, disable=not progress):
        mlp = layers[m % len(layers)].mlp
        width = mlp.down_proj.in_features
        channels = torch.randperm(width, generator=g)[: max(1, int(share * width))]
        with _AblateNeurons(mlp, channels):
            scores.append(document_losses(model, tok, texts) - base)
    return torch.stack(scores, 1)


def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(list(x), list(y)).statistic)
