"""`qscope-rl demo`: the quick mode end to end on the test world, the report's statistics and checks, bad input."""

import json

import numpy as np
import pytest

from qscope_rl.cli import main
from qscope_rl.demo.main_job import ARMS, DEFAULT_ARMS, DemoSettings
from qscope_rl.demo.policy_measure import MEASURES
from qscope_rl.demo.report import analyse, markdown
from qscope_rl.demo.stats import bootstrap_draws, half_step, overlap, ratio, resampled_means, summarize

N_PROMPTS = 400


def measured(rates: dict, rng) -> dict:
    """Per-prompt means of 4 Bernoulli samples per prompt at the given rates."""
    return {m: (rng.random((4, N_PROMPTS)) < rates.get(m, 0.03)).mean(0).tolist() for m in MEASURES}


def fake_raw(arm_rates: dict, untrained: dict, sft: dict | None = None, seeds=(0, 1, 2)) -> dict:
    rng = np.random.default_rng(0)
    curve = {"code_switch_rate_zh": [0.03] * 20, "code_switch_rate_es": [0.03] * 20, "loop_rate": [0.03] * 20,
             "task_reward": [0.4] * 20}
    arms = {a: {"label": ARMS[a], "runs": [{"seed": s, "measured": measured(arm_rates.get(a, {}), rng),
                                            "curves": curve, "seconds": 1.0} for s in seeds]} for a in ARMS}
    raw = {"settings": {"seeds": list(seeds), "bootstrap": 300, "max_steps": 20, "prompts_per_step": 4,
                        "num_generations": 8, "eval_prompts": N_PROMPTS, "eval_samples_per_prompt": 4,
                        "amplify_calibration_prompts": 16, "sft_steps": 5, "sft_batch_size": 4, "sasft_lambda": 0.1,
                        "notes": {"amplify": {"pack": "repetition", "top_n": 2, "alpha": 20.0, "grid": []}}},
           "world": {"size": "test", "seed": 0}, "untrained": [measured(untrained, rng) for _ in seeds],
           "amplified_heldout": {"loop_rate": 0.9, "task_reward": 0.0, "n": 100},
           "arms": arms, "seconds": 1.0, "seconds_prepare": 0.5, "sft": {}}
    for method, rates in (sft or {}).items():
        raw["sft"][method] = [{"seed": s, "measured": measured(rates, rng), "perplexity": rates["ppl"]} for s in seeds]
    return raw


def test_bootstrap_matches_an_independent_reference():
    rng = np.random.default_rng(1)
    matrix = rng.random((3, 50))
    draws = bootstrap_draws(3, 50, 500, seed=0)
    # reference: the same draws by explicit loops
    seed_idx, prompt_idx = draws
    ref = [matrix[seed_idx[b]][:, prompt_idx[b]].mean() for b in range(500)]
    np.testing.assert_allclose(resampled_means(matrix, draws), ref)
    s = summarize(matrix, draws)
    assert s["ci"][0] < s["mean"] < s["ci"][1] and s["per_seed"] == pytest.approx(matrix.mean(1))
    assert summarize(np.full((3, 50), 0.25), draws)["ci"] == [0.25, 0.25]
    r = ratio(matrix * 0.5, matrix, draws)
    assert r["value"] == pytest.approx(0.5) and r["ci"] == pytest.approx([0.5, 0.5])
    assert np.isnan(ratio(np.zeros((3, 50)), np.zeros((3, 50)), draws)["value"])
    with pytest.raises(ValueError, match="matrix"):
        resampled_means(np.zeros(5), draws)
    assert overlap((0, 1), (0.5, 2)) and not overlap((0, 1), (1.5, 2))


def test_half_step_is_the_first_step_at_half_the_baseline():
    base = [[0.04] * 30] * 2
    falling = [[0.04] * 10 + [0.0] * 20] * 2
    assert half_step(falling, base, window=1) == 11
    # with a 4-step moving average the mean reaches half after 2 zero steps
    assert half_step(falling, base, window=4) == 12
    assert half_step(base, base, window=1) is None


def test_analyse_and_checks_against_the_targets():
    good = {"a": {"loop_rate": 0.04, "code_switch_rate_zh": 0.03, "code_switch_rate_es": 0.03, "code_switch_rate": 0.06,
                  "task_reward": 0.5},
            "b": {"code_switch_rate_es": 0.03, "code_switch_rate": 0.03, "task_reward": 0.5},
            "c": {"code_switch_rate_es": 0.005, "task_reward": 0.5},
            "d": {"code_switch_rate": 0.01, "task_reward": 0.5},
            "e": {"loop_rate": 0.01, "task_reward": 0.5}, "f": {"loop_rate": 0.02, "task_reward": 0.5},
            "g": {"task_reward": 0.5}}
    untrained = {"loop_rate": 0.04, "code_switch_rate_zh": 0.03, "code_switch_rate_es": 0.03, "task_reward": 0.5}
    sft = {"sft": {"code_switch_rate": 0.05, "ppl": 10.0}, "sasft": {"code_switch_rate": 0.005, "ppl": 10.2}}
    report = analyse(fake_raw(good, untrained, sft))
    checks = {c["key"]: c for c in report["checks"]}
    assert set(checks) == {"regime", "d_vs_a", "same_script", "task", "e_vs_a", "amplified", "sasft"}
    assert all(c["met"] for c in checks.values()), [c for c in checks.values() if not c["met"]]
    assert checks["d_vs_a"]["value"] == pytest.approx(report["arms"]["d"]["code_switch_rate"]["mean"]
                                                      / report["arms"]["a"]["code_switch_rate"]["mean"])
    assert report["arms"]["a"]["loop_rate"]["ci"][0] < 0.04 < report["arms"]["a"]["loop_rate"]["ci"][1]
    text = markdown(report)
    assert "**NO**" not in text and "| (d) + SAE penalty + SASFT auxiliary loss |" in text and "SASFT / SFT" in text
    assert "built with CPU kernels not recorded" in text  # the fake world has no stats: said, not guessed
    raw = fake_raw(good, untrained, sft)
    raw["world"] |= {"recipe_hash": "abc123", "cpu_kernels": "aten AVX2, mkl_cbwr AUTO (AVX2 asked, refused by MKL)"}
    assert "World recipe hash abc123, built with CPU kernels aten AVX2, mkl_cbwr AUTO (AVX2 asked" in markdown(
        analyse(raw))

    # the regime fails when task-only training removes a failure; the rest fail on their own terms
    bad = {**good, "a": {**good["a"], "loop_rate": 0.01}, "d": {"code_switch_rate": 0.06, "task_reward": 0.4},
           "c": {"code_switch_rate_es": 0.025, "task_reward": 0.5}, "e": {"loop_rate": 0.01, "task_reward": 0.5}}
    bad_sft = {"sft": {"code_switch_rate": 0.05, "ppl": 10.0}, "sasft": {"code_switch_rate": 0.005, "ppl": 11.0}}
    checks = {c["key"]: c for c in analyse(fake_raw(bad, untrained, bad_sft))["checks"]}
    for key in ("regime", "d_vs_a", "same_script", "task", "e_vs_a", "sasft"):
        assert not checks[key]["met"], key
    assert "**NO**" in markdown(analyse(fake_raw(bad, untrained, bad_sft)))


def test_a_zero_baseline_meets_no_ratio_target():
    rates = {"a": {"loop_rate": 0.0}, "e": {"loop_rate": 0.0}}
    checks = {c["key"]: c for c in analyse(fake_raw(rates, {"loop_rate": 0.0}))["checks"]}
    assert not checks["e_vs_a"]["met"] and "undefined" in checks["e_vs_a"]["detail"]
    assert not checks["regime"]["met"]


def test_settings_refuse_bad_input():
    with pytest.raises(ValueError, match="unknown arms"):
        DemoSettings(arms=("a", "z"))
    with pytest.raises(ValueError, match="at least one seed"):
        DemoSettings(seeds=())
    with pytest.raises(ValueError, match="world_seed"):
        DemoSettings(world_seed=-1)
    with pytest.raises(SystemExit, match="unknown arms"):
        main(["demo", "--quick", "--arms", "ax"])


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(world, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["demo", "--quick", "--world", str(world.path), "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["arms"]) == set(DEFAULT_ARMS)
    for row in [report["untrained"], *report["arms"].values(), report["sft"]["sft"], report["sft"]["sasft"]]:
        for measure in MEASURES:
            assert 0.0 <= row[measure]["ci"][0] <= row[measure]["mean"] <= row[measure]["ci"][1] <= 1.0
            assert len(row[measure]["per_seed"]) == 1
    for arm in report["arms"].values():
        curves = arm["curves"][0]  # one value per GRPO step, from the weight-0 judge rewards
        assert len(curves["code_switch_rate_es"]) == len(curves["loop_rate"]) == report["settings"]["max_steps"]
    assert {c["key"] for c in report["checks"]} == {"regime", "d_vs_a", "same_script", "task", "e_vs_a",
                                                     "amplified", "sasft"}
    for name in ("demo.json", "demo.md", "training_curves.png", "held_out.png"):
        assert (out / name).stat().st_size > 0
    assert "| (d) + SAE penalty + SASFT auxiliary loss |" in (out / "demo.md").read_text()
    # only (e) amplifies: its amplified and normal rollouts' rewards are reported
    assert "reward_amplified" in report["arms"]["e"] and "reward_amplified" not in report["arms"]["a"]
    assert 0.0 <= report["amplified_heldout"]["loop_rate"] <= 1.0
