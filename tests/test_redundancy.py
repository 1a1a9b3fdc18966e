"""Evaluation redundancy: exact coverage curve against brute force, overlap, the demo world, bad input."""

import itertools
import json
import math

import pytest
import torch

from qscope_rl import load_sae
from qscope_rl.cli import main
from qscope_rl.demo.measures import DEMO_BENCHMARKS, demo_benchmarks, overlap_spearman
from qscope_rl.tools.redundancy import (
    compare_benchmarks,
    compare_footprints,
    coverage_curve,
    footprints,
    overlap,
    redundancy_score,
)

SAMPLES = [frozenset(s) for s in ({1, 2}, {2, 3}, {2}, {4, 5, 6}, {1})]


def brute_force_curve(samples):
    union = frozenset().union(*samples)
    return [sum(len(frozenset().union(*c)) / len(union) for c in itertools.combinations(samples, n))
            / math.comb(len(samples), n) for n in range(1, len(samples) + 1)]


def test_coverage_curve_is_exact():
    torch.testing.assert_close(coverage_curve(SAMPLES), torch.tensor(brute_force_curve(SAMPLES), dtype=torch.float64))
    assert coverage_curve(SAMPLES)[-1] == 1.0
    assert redundancy_score(SAMPLES) == pytest.approx(sum(brute_force_curve(SAMPLES)) / len(SAMPLES))


def test_redundancy_orders_duplicated_benchmarks_higher():
    diverse = [frozenset({i}) for i in range(6)]
    duplicated = [frozenset({0, 1})] * 6
    assert redundancy_score(duplicated) == 1.0
    assert redundancy_score(diverse) < 0.6


def test_overlap_is_asymmetric():
    small, big = frozenset({1, 2}), frozenset({1, 2, 3, 4})
    assert overlap(small, big) == 1.0 and overlap(big, small) == 0.5
    report = compare_footprints({"small": [small], "big": [big]})
    assert report.overlap.tolist() == [[1.0, 1.0], [0.5, 1.0]]
    assert "small" in report.table()


@pytest.mark.parametrize("bad", [{}, {"a": [], "b": [frozenset({1})]}])
def test_empty_benchmarks_are_rejected(bad):
    with pytest.raises(ValueError, match="no benchmarks|no samples"):
        compare_footprints(bad)


def test_empty_texts_are_rejected(world):
    sae = load_sae(world.sae_dir, layer=world.layer)
    with pytest.raises(ValueError, match="no samples"):
        compare_benchmarks(world.model, world.tokenizer, sae, {"a": ["some text"], "b": []})
    with pytest.raises(ValueError, match="empty"):
        footprints(world.model, world.tokenizer, sae, ["fine", "  "])


def test_world_footprints_and_overlap(world, tmp_path):
    sae = load_sae(world.sae_dir, layer=world.layer)
    benchmarks, truth = demo_benchmarks(world, per_topic=4)
    assert len(truth) == len(DEMO_BENCHMARKS) * (len(DEMO_BENCHMARKS) - 1)
    report = compare_benchmarks(world.model, world.tokenizer, sae, benchmarks, progress=False)
    assert report.overlap.shape == (6, 6)
    torch.testing.assert_close(report.overlap.diagonal(), torch.ones(6, dtype=torch.float64))
    assert all(0 < r <= 1 for r in report.redundancy)
    assert all(0 < f <= sae.d_sae for f in report.footprint_size)
    # a last-token footprint has at most k features
    prints = footprints(world.model, world.tokenizer, sae, benchmarks["A"][:3], progress=False)
    assert all(0 < len(p) <= sae.k for p in prints)
    assert -1 <= overlap_spearman(report, truth) <= 1
    png = report.plot(tmp_path / "overlap.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_redundancy(world, world_cache, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("QSCOPE_RL_CACHE", str(world_cache))
    a, b = tmp_path / "a.jsonl", tmp_path / "b.txt"
    docs = world.documents("heldout")
    a.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in docs[:6]))
    b.write_text("".join(d.text + "\n" for d in docs[4:12]))
    assert main(["redundancy", "--benchmark", f"a={a}", "--benchmark", f"b={b}", "--json",
                 "--plot", str(tmp_path / "h.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["overlap"]) == {"a", "b"} and out["benchmarks"]["b"]["n_samples"] == 8
    assert (tmp_path / "h.png").exists()
    with pytest.raises(SystemExit, match="NAME=FILE"):
        main(["redundancy", "--benchmark", str(a)])


def exact_performance_redundancy(scores):
    """Every subset of every size, exactly (the tool draws subsets; tiny N here)."""
    n_samples = scores.shape[0]
    full = scores.mean(0)
    total = 0.0
    for n in range(1, n_samples + 1):
        corrs = [float(torch.corrcoef(torch.stack([scores[list(c)].mean(0), full]))[0, 1])
                 for c in itertools.combinations(range(n_samples), n)]
        total += sum(corrs) / len(corrs)
    return total / n_samples


def test_performance_redundancy():
    from qscope_rl.tools.redundancy import performance_redundancy

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 5, generator=g, dtype=torch.float64)
    assert performance_redundancy(scores, draws=4000) == pytest.approx(exact_performance_redundancy(scores), abs=0.01)
    same = torch.randn(1, 5, generator=g, dtype=torch.float64).repeat(8, 1)
    assert performance_redundancy(same) == pytest.approx(1.0)
    noisy = same + 3 * torch.randn(8, 5, generator=g, dtype=torch.float64)
    assert performance_redundancy(noisy) < performance_redundancy(same + 0.1 * torch.randn(8, 5, generator=g))
    with pytest.raises(ValueError, match="at least 3 models"):
        performance_redundancy(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="same mean score"):
        performance_redundancy(torch.ones(4, 3))
    with pytest.raises(ValueError, match="scores must be finite"):  # a NaN would make every correlation NaN
        performance_redundancy(torch.tensor([[0.1, 0.2, float("nan")], [0.3, 0.1, 0.2]]))


def test_world_benchmarks_and_model_family(world):
    from qscope_rl.demo.redundancy_benchmarks import (
        ASYMMETRIC_PAIR,
        benchmark_cells,
        document_losses,
        min_cell_size,
        model_family_scores,
        world_benchmarks,
    )

    smallest = min_cell_size(world)
    cells = {}
    for d in world.documents("heldout"):
        cells[(d.topic, d.lang)] = cells.get((d.topic, d.lang), 0) + 1
    assert smallest == min(cells.values())
    world_benchmarks(world, per_benchmark=smallest, seed=1)  # the largest size every one-cell benchmark can fill
    single = next(cs[0] for name, cs in benchmark_cells(world).items() if len(cs) == 1 and not name.endswith("-dup"))
    with pytest.raises(ValueError, match=f"of topic '{single[0]}' in '{single[1]}'.*per_benchmark <= {smallest}"):
        world_benchmarks(world, per_benchmark=cells[single] + 1, seed=1)
    index, truth = world_benchmarks(world, per_benchmark=12, seed=1)
    assert len(index) >= 12 and all(len(v) == 12 for v in index.values())
    assert len(set(index["T0-dup"])) == 8
    a, b = ASYMMETRIC_PAIR
    assert truth[(a, b)] == 1.0 and truth[(b, a)] == pytest.approx(2 / len(benchmark_cells(world)["all"]))
    docs = world.documents("heldout")
    cells = benchmark_cells(world)
    assert all((docs[i].topic, docs[i].lang) in cells[name] for name, idx in index.items() for i in idx)
    texts = [d.text for d in docs[:6]]
    before = document_losses(world.model, world.tokenizer, texts)
    scores = model_family_scores(world, texts, n_models=3, progress=False)
    assert scores.shape == (6, 3) and (scores.abs().sum(0) > 0).all()  # every ablation changes some loss
    torch.testing.assert_close(document_losses(world.model, world.tokenizer, texts), before)  # hooks gone


def test_any_token_footprints_hold_the_last_token_and_every_firing_feature(world):
    from qscope_rl.features.text_features import encode_texts

    sae = load_sae(world.sae_dir, layer=world.layer)
    texts = [d.text for d in world.documents("heldout")[:4]]
    last = footprints(world.model, world.tokenizer, sae, texts, progress=False)
    anywhere = footprints(world.model, world.tokenizer, sae, texts, where="any", progress=False)
    max_acts = encode_texts(world.model, world.tokenizer, sae, texts, progress=False).max_acts
    assert anywhere == [frozenset(torch.nonzero(row > 0).flatten().tolist()) for row in max_acts]
    assert all(a <= b and len(b) > len(a) for a, b in zip(last, anywhere))
    with pytest.raises(ValueError, match="where"):
        footprints(world.model, world.tokenizer, sae, texts, where="first")


def test_designed_redundancy_orders_benchmarks_by_their_distinct_sources(world):
    from qscope_rl.demo.redundancy_benchmarks import benchmark_cells, designed_redundancy

    cells = benchmark_cells(world)
    designed = designed_redundancy(world)
    assert set(designed) == set(cells)
    assert max(designed, key=designed.get) == "T0-dup"  # 8 documents of one cell: the most redundant
    assert min(designed, key=designed.get) == "all"  # every cell: the least
    single = [n for n, cs in cells.items() if len(cs) == 1 and not n.endswith("-dup")]
    assert all(designed[s] > designed[n] for s in single for n, cs in cells.items() if len(cs) > 1)
    assert all((designed[a] > designed[b]) == (len(cells[a]) < len(cells[b]))
               for a in cells for b in cells if "-dup" not in a + b and len(cells[a]) != len(cells[b]))


def test_reference_reliability_is_the_agreement_of_two_halves_of_the_model_family():
    from qscope_rl.demo.redundancy_benchmarks import reference_reliability, spearman
    from qscope_rl.tools.redundancy import performance_redundancy

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(60, 8, generator=g, dtype=torch.float64)
    index = {f"b{i}": list(range(5 * i, 5 * i + 10)) for i in range(10)}
    expected = spearman([performance_redundancy(scores[idx, :4], seed=3) for idx in index.values()],
                        [performance_redundancy(scores[idx, 4:], seed=3) for idx in index.values()])
    assert reference_reliability(scores, index, seed=3) == pytest.approx(expected)
    # a family whose two halves are the same models agrees with itself exactly
    twin = torch.cat([scores[:, :4], scores[:, :4]], 1)
    assert reference_reliability(twin, index) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="two halves of at least 3 models"):
        reference_reliability(scores[:, :5], index)


def test_benchmark_draws_are_the_seeded_benchmarks_and_their_reference(world):
    from qscope_rl.demo.redundancy_benchmarks import benchmark_draws, world_benchmarks
    from qscope_rl.tools.redundancy import performance_redundancy

    n = len(world.documents("heldout"))
    scores = torch.randn(n, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    draws = benchmark_draws(world, scores, per_benchmark=8, draws=2)
    assert len(draws) == 2
    for d, (index, truth, perf) in enumerate(draws):
        assert (index, truth) == world_benchmarks(world, per_benchmark=8, seed=d)
        assert perf == [performance_redundancy(scores[idx], seed=d) for idx in index.values()]
