"""`qscope-rl demo`: the quick mode end to end on the test world, the report's checks, and bad input."""

import json

import pytest

from qscope_rl.cli import main
from qscope_rl.demo.main_job import ARMS, DemoSettings
from qscope_rl.demo.report import checks, markdown


def stat(mean):
    return {"mean": mean, "std": 0.0, "per_seed": [mean]}


def fake_result(untrained_cs=0.1, cs=None, loop=None, task=None):
    cs, loop, task = cs or {}, loop or {}, task or {}
    arms = {a: {"label": ARMS[a], "code_switch_rate": stat(cs.get(a, 0.05)), "loop_rate": stat(loop.get(a, 0.1)),
                "task_reward": stat(task.get(a, 0.5)), "rollout_code_switch_rate": stat(0.1),
                "rollout_loop_rate": stat(0.1), "curves": []} for a in ARMS}
    return {"untrained": {"code_switch_rate": stat(untrained_cs), "loop_rate": stat(0.2), "task_reward": stat(0.2)},
            "arms": arms, "settings": {"seeds": [0], "max_steps": 1, "prompts_per_step": 1, "num_generations": 2,
                                       "eval_prompts": 1, "eval_samples_per_prompt": 1},
            "world": {"size": "test"}, "seconds": 1.0}


def test_checks_compare_against_the_targets():
    good = {c["claim"]: c for c in checks(fake_result(cs={"d": 0.02, "b": 0.04}, loop={"e": 0.04, "f": 0.06},
                                                      task={"a": 0.5, "c": 0.49, "d": 0.476}))}
    assert all(c["met"] for c in good.values())
    assert good["(d) code-switch rate <= 0.3x the untrained rate"]["value"] == pytest.approx(0.2)
    assert good["(e) loop rate <= 0.5x (a)'s"]["value"] == pytest.approx(0.4)
    bad = {c["claim"]: c for c in checks(fake_result(cs={"d": 0.05, "b": 0.04}, loop={"e": 0.09},
                                                     task={"a": 0.5, "c": 0.4}))}
    for claim in ("(d) code-switch rate <= 0.3x the untrained rate", "(d) code-switch rate <= (b)'s",
                  "(c) task reward within 5% of (a)'s", "(e) loop rate <= 0.5x (a)'s"):
        assert not bad[claim]["met"], claim
    assert "**NO**" in markdown({**fake_result(cs={"d": 0.05}), "checks": []})


def test_loop_check_when_the_baseline_never_loops():
    result = fake_result(loop={"a": 0.0, "e": 0.003})
    check = {c["claim"]: c for c in checks(result)}["(e) loop rate <= 0.5x (a)'s"]
    assert not check["met"] and check["detail"] == "(e) 0.0030 vs (a) 0.0000"
    report = markdown(result)
    assert "(e) 0.0030 vs (a) 0.0000) | **NO** |" in report
    assert "(a)'s held-out loop rate is 0" in report and "inf" not in report
    both_zero = {c["claim"]: c for c in checks(fake_result(loop={"a": 0.0, "e": 0.0}))}
    assert both_zero["(e) loop rate <= 0.5x (a)'s"]["met"]


def test_settings_refuse_bad_input():
    with pytest.raises(ValueError, match="unknown arms"):
        DemoSettings(arms=("a", "z"))
    with pytest.raises(ValueError, match="at least one seed"):
        DemoSettings(seeds=())
    with pytest.raises(SystemExit, match="unknown arms"):
        main(["demo", "--quick", "--arms", "ax"])


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(world, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["demo", "--quick", "--world", str(world.path), "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["arms"]) == set(ARMS)
    for row in [report["untrained"], *report["arms"].values()]:
        for measure in ("code_switch_rate", "loop_rate", "task_reward"):
            assert 0.0 <= row[measure]["mean"] <= 1.0
            assert len(row[measure]["per_seed"]) == 1
    for arm in report["arms"].values():
        curves = arm["curves"][0]  # one value per GRPO step, from the weight-0 judge rewards
        assert len(curves["code_switch_rate"]) == len(curves["loop_rate"]) == report["settings"]["max_steps"]
    assert {c["claim"] for c in report["checks"]} >= {"(d) code-switch rate <= 0.3x the untrained rate",
                                                       "(e) loop rate <= 0.5x (a)'s"}
    for name in ("demo.json", "demo.md", "training_curves.png", "held_out.png"):
        assert (out / name).stat().st_size > 0
    assert "| (d) + SAE penalty + SASFT auxiliary loss |" in (out / "demo.md").read_text()
    # only (e) amplifies: its amplified and normal rollouts' rewards are reported
    assert 0.0 <= report["arms"]["e"]["reward_amplified"]["mean"] <= 1.0
    assert "reward_amplified" not in report["arms"]["a"]
    assert "(e)'s amplified rollouts earned" in (out / "demo.md").read_text()
