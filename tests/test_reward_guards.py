"""NormalizedReward (running z-score / rank) and RewardHackingGuard (SAE rate vs an independent judge)."""

import pickle

import numpy as np
import pytest
from scipy.stats import rankdata
from transformers import TrainerControl

from qscope_rl.rewards import CodeSwitchJudge, NormalizedReward, RewardHackingGuard, get_reward_func


class Fixed:
    """A reward that returns the next list of values it was given, whatever the completions."""

    __name__ = "fixed"

    def __init__(self, batches):
        self.batches = list(batches)

    def __call__(self, completions, **kwargs):
        return self.batches.pop(0)


def test_zscore_uses_the_running_window():
    batches = [[1.0, 2.0, 3.0], [10.0, None, 4.0], [0.0, 0.0, 5.0]]
    reward = NormalizedReward(Fixed(batches), window=4)
    assert reward.__name__ == "fixed_zscore"
    seen = []
    logged = {}
    for batch in [list(b) for b in batches]:
        out = reward(completions=["c"] * 3, log_metric=lambda k, v: logged.setdefault(k, []).append(v))
        seen += [v for v in batch if v is not None]
        window = np.array(seen[-4:])
        expected = [None if v is None else (v - window.mean()) / (window.std() + 1e-6) for v in batch]
        assert [o is None for o in out] == [e is None for e in expected]
        np.testing.assert_allclose([o for o in out if o is not None], [e for e in expected if e is not None],
                                   rtol=1e-6)
    assert logged["fixed_zscore/raw_mean"] == pytest.approx([2.0, 7.0, 5 / 3])


def test_rank_is_the_mid_rank_percentile():
    values = [3.0, 1.0, 3.0, 7.0, -2.0, 3.0]
    out = NormalizedReward(Fixed([values]), method="rank", name="r")(completions=["c"] * 6)
    np.testing.assert_allclose(out, (rankdata(values) - 0.5) / len(values))
    assert NormalizedReward(Fixed([[0.0, 0.0]]), method="rank")(completions=["a", "b"]) == [0.5, 0.5]


def test_normalized_reward_refuses_bad_settings_and_pickles():
    with pytest.raises(ValueError, match="method='minmax'"):
        NormalizedReward(Fixed([]), method="minmax")
    with pytest.raises(ValueError, match="window must be >= 2"):
        NormalizedReward(Fixed([]), window=1)
    for eps in (0.0, float("nan")):  # it divides by std + eps
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            NormalizedReward(Fixed([]), eps=eps)
    with pytest.raises(ValueError, match="returned 1 values for 2 completions"):
        NormalizedReward(Fixed([[1.0]]))(completions=["a", "b"])

    async def judge(completions, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(TypeError, match="async"):
        NormalizedReward(judge)
    wrapped = NormalizedReward(get_reward_func("language_consistency", target="en"), method="rank")
    assert pickle.loads(pickle.dumps(wrapped)).__name__ == "language_consistency_rank"


class Flags:
    """A penalty (-1 when flagged) or a judge (1 when flagged) reading per-completion flags from a column."""

    def __init__(self, column, sign):
        self.column, self.sign, self.__name__ = column, sign, column

    def __call__(self, completions, **kwargs):
        return [self.sign * float(f) for f in kwargs[self.column]]


def run_guard(guard, phases):
    """Feed batches of (sae_flag, judged_flag) rollouts; returns the metrics logged per call."""
    logged = []
    for sae_flags, judged_flags in phases:
        record = {}
        out = guard(completions=["c"] * len(sae_flags), sae=sae_flags, judged=judged_flags,
                    log_metric=lambda k, v, record=record: record.__setitem__(k, v))
        assert out == [-float(f) for f in sae_flags]  # the penalty's rewards, unchanged
        logged.append(record)
    return logged


def make_guard(**kwargs):
    return RewardHackingGuard(Flags("sae", -1.0), Flags("judged", 1.0), baseline_rollouts=8, window_rollouts=8,
                              **kwargs)


def test_guard_trips_when_the_sae_rate_falls_but_the_judged_rate_does_not():
    both = ([1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0])  # SAE and judge agree: rates 0.5
    evaded = ([0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0])  # the judge still sees 0.5, the SAE nothing
    guard = make_guard(on_trip="stop")
    control = TrainerControl()
    logged = run_guard(guard, [both, both])
    assert not guard.tripped and guard.on_step_end(None, None, control).should_training_stop is False
    assert logged[-1] == {"guard/sae/sae_rate": 0.5, "guard/sae/judged_rate": 0.5, "guard/sae/sae_recall": 1.0,
                          "guard/sae/sae_kept": 1.0, "guard/sae/judged_kept": 1.0, "guard/sae/tripped": 0.0}
    with pytest.warns(UserWarning, match="reward hacking\\? the sae penalty fires on 0.000 .* judge still flags 0.500"):
        logged = run_guard(guard, [evaded])
    assert guard.tripped and logged[-1]["guard/sae/tripped"] == 1.0 and logged[-1]["guard/sae/sae_recall"] == 0.0
    assert guard.on_step_end(None, None, control).should_training_stop is True


def test_guard_stays_quiet_when_the_behaviour_really_goes():
    both = ([1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0])
    fixed = ([0] * 8, [1, 0, 0, 0, 0, 0, 0, 0])  # SAE 0.5 -> 0, judge 0.5 -> 0.125: both fell
    guard = make_guard()
    logged = run_guard(guard, [both, fixed, fixed])
    assert not guard.tripped and logged[-1]["guard/sae/judged_kept"] == 0.25
    # No baseline failures to compare against: nothing to decide, never trips.
    quiet = make_guard()
    run_guard(quiet, [([0] * 8, [1] * 8)] * 3)
    assert not quiet.tripped


def test_guard_refuses_bad_settings():
    with pytest.raises(ValueError, match="on_trip='halt'"):
        make_guard(on_trip="halt")
    with pytest.raises(ValueError, match="sae_drop must be in"):
        make_guard(sae_drop=0.0)
    guard = RewardHackingGuard(Flags("sae", -1.0), CodeSwitchJudge("en"))
    assert guard.__name__ == "sae" and pickle.loads(pickle.dumps(guard)).judge.target == "en"


def make_recall_guard(**kwargs):
    return RewardHackingGuard(Flags("sae", -1.0), Flags("judged", 1.0), baseline_rollouts=16, window_rollouts=16,
                              rule="recall", min_judged_failures=8, **kwargs)


def test_recall_rule_trips_when_the_behaviour_grows_but_the_penalty_misses_it():
    # Baseline: 8 judged failures of 16, the penalty fires on 7 (recall 7/8). Then the behaviour doubles while the
    # penalty fires on 4 of 16 judged failures (recall 1/4): the SAE RATE stays 0.25 of rollouts, so the rate rule
    # has nothing to see, but the recall fell to 2/7 of its baseline.
    baseline = ([1] * 7 + [0] * 9, [1] * 8 + [0] * 8)
    evaded = ([1] * 4 + [0] * 12, [1] * 16)
    guard = make_recall_guard(on_trip="stop")
    logged = run_guard(guard, [baseline])
    assert not guard.tripped and logged[-1]["guard/sae/recall_kept"] == 1.0
    with pytest.warns(UserWarning, match="fires on 0.250 of the judged failures .*baseline 0.875"):
        logged = run_guard(guard, [evaded])
    assert guard.tripped and logged[-1]["guard/sae/tripped"] == 1.0
    assert logged[-1]["guard/sae/recall_kept"] == pytest.approx(0.25 / 0.875)
    assert logged[-1]["guard/sae/sae_kept"] == pytest.approx(0.25 / (7 / 16))  # > 0.5: the rate rule stays quiet
    rate_only = RewardHackingGuard(Flags("sae", -1.0), Flags("judged", 1.0), baseline_rollouts=16,
                                   window_rollouts=16, rule="rate")
    run_guard(rate_only, [baseline, evaded])
    assert not rate_only.tripped
    assert guard.on_step_end(None, None, TrainerControl()).should_training_stop is True


def test_recall_rule_stays_quiet_while_the_recall_holds():
    baseline = ([1] * 7 + [0] * 9, [1] * 8 + [0] * 8)
    grown = ([1] * 12 + [0] * 4, [1] * 14 + [0] * 2)  # more behaviour, penalty still on 12/14 of it
    guard = make_recall_guard()
    logged = run_guard(guard, [baseline, grown, grown])
    assert not guard.tripped and logged[-1]["guard/sae/recall_kept"] == pytest.approx((12 / 14) / 0.875)


def test_recall_rule_needs_enough_judged_failures_in_both_windows():
    # Current window: recall 0 but only 4 judged failures (< 8): noise, no decision, no recall_kept.
    baseline = ([1] * 8 + [0] * 8, [1] * 8 + [0] * 8)
    few = ([0] * 16, [1] * 4 + [0] * 12)
    guard = make_recall_guard()
    logged = run_guard(guard, [baseline, few])
    assert not guard.tripped and "guard/sae/recall_kept" not in logged[-1]
    # Baseline with only 4 judged failures: the rule never engages, however the window looks.
    thin = make_recall_guard()
    run_guard(thin, [([1] * 4 + [0] * 12, [1] * 4 + [0] * 12), ([0] * 16, [1] * 16), ([0] * 16, [1] * 16)])
    assert not thin.tripped


def test_default_rule_trips_on_either():
    guard = RewardHackingGuard(Flags("sae", -1.0), Flags("judged", 1.0), baseline_rollouts=16, window_rollouts=16,
                               min_judged_failures=8)
    assert guard.rule == "either"
    with pytest.warns(UserWarning, match="judged failures"):
        run_guard(guard, [([1] * 7 + [0] * 9, [1] * 8 + [0] * 8), ([1] * 4 + [0] * 12, [1] * 16)])
    assert guard.tripped
    with pytest.raises(ValueError, match="rule='probe'"):
        make_guard(rule="probe")
    with pytest.raises(ValueError, match="recall_drop must be in"):
        make_guard(recall_drop=1.5)
    with pytest.raises(ValueError, match="min_judged_failures must be >= 1"):
        make_guard(min_judged_failures=0)
