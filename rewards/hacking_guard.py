"""A reward-hacking guard for SAE penalties: the SAE's rate against an independent judge's, on the same rollouts.

An SAE penalty is the kind of reward a policy can game: it can learn to keep the penalised features quiet while
the behaviour stays (other features, other tokens, the same code-switch). The guard wraps the penalty, asks a
judge that reads only the text (`qscope_rl.judges`: Unicode script, loop detector) about the same rollouts, and
trips when the SAE rate has fallen while the judged rate has not, or when the penalty's recall on the judged
failures has fallen (mechreward cross-checks its rewards with a linear probe for the same reason).
"""

from __future__ import annotations

import warnings
from collections import deque

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ._sync import gather_floats
from .normalized import build_reward

ON_TRIP = ("warn", "stop")
RULES = ("either", "rate", "recall")
_SETTINGS = ("sae_drop", "judged_drop", "baseline_rollouts", "window_rollouts", "fire_threshold", "on_trip", "rule",
             "recall_drop", "min_judged_failures")


class RewardHackingGuard(TrainerCallback, ExportableState):
    """``penalty``'s rewards, unchanged, with the rate at which it fires watched against ``judge``'s.

    A rollout counts as SAE-flagged when the penalty's reward is below ``-fire_threshold`` and as judged-flagged
    when the judge (a reward function returning 1.0 for a failure, e.g. `CodeSwitchJudge`, `LoopJudge`) returns
    more than 0.5. The first ``baseline_rollouts`` rollouts (over all processes) fix the baseline rates
    ``s0, j0`` and the penalty's baseline recall ``r0`` (the share of judged failures it fires on); the last
    ``window_rollouts`` give the current ``s, j, r``. Two rules, chosen by ``rule`` ("either", the default, trips
    on whichever holds first; "rate" or "recall" alone):

        rate:    s <= (1 - sae_drop) * s0   and   j > (1 - judged_drop) * j0        (s0 > 0, j0 > 0)
        recall:  r <= (1 - recall_drop) * r0     (r0 > 0; both windows hold >= min_judged_failures judged failures)

    The rate rule: the SAE rate fell by at least ``sae_drop`` of its baseline while the judged rate fell by less
    than ``judged_drop`` of its own. It misses a policy whose behaviour GROWS while it evades (the SAE rate then
    need not fall below its baseline's, taken when the behaviour was rare); the recall rule reads that case
    directly, and needs enough judged failures in each window not to trip on a handful. On a trip the guard
    warns (``on_trip="warn"``) or also stops training at the end of the step (``"stop"``; the guard is a
    `TrainerCallback`: the SAE trainers register reward functions that are callbacks themselves; with another
    trainer pass it in ``callbacks=`` too). Metrics, through TRL's ``log_metric``, per reward call:
    ``guard/<name>/sae_rate`` and ``judged_rate`` (this batch), ``sae_recall`` (share of this batch's judged
    failures the penalty fires on), ``sae_kept`` and ``judged_kept`` (``s / s0``, ``j / j0``), ``recall_kept``
    (``r / r0``, once both windows hold enough judged failures) and ``tripped`` (0 or 1). Every process sees
    every process's flags, so every rank decides alike.

    ``penalty`` and ``judge`` may be registry names built with ``penalty_kwargs`` / ``judge_kwargs`` (recipes).

    Checkpoints: the guard is an ``ExportableState`` (transformers' stateful-callback convention), so every
    checkpoint's ``trainer_state.json`` holds its `state` (settings, baseline and window flags, tripped). The SAE
    trainers put it back into this same guard on resume (`load_state`; not needing
    ``restore_callback_states_from_checkpoint``, whose rebuild by ``type(cb)(**args)`` cannot rebuild the penalty
    and judge), so a resumed run decides as the uninterrupted one would. Elsewhere: `from_state`.

    Example::

        guard = RewardHackingGuard(SAECodeSwitchPenalty("zh.json"), CodeSwitchJudge("en"), on_trip="stop")
        trainer = SAEGRPOTrainer(..., reward_funcs=[task_reward, guard])   # guard returns the penalty's rewards
    """

    def __init__(self, penalty, judge, *, sae_drop: float = 0.5, judged_drop: float = 0.25,
                 baseline_rollouts: int = 64, window_rollouts: int = 64, fire_threshold: float = 0.0,
                 on_trip: str = "warn", rule: str = "either", recall_drop: float = 0.5, min_judged_failures: int = 16,
                 penalty_kwargs: dict | None = None, judge_kwargs: dict | None = None):
        penalty, judge = build_reward(penalty, penalty_kwargs), build_reward(judge, judge_kwargs)
        if on_trip not in ON_TRIP:
            raise ValueError(f"on_trip={on_trip!r}: expected one of {ON_TRIP}")
        if rule not in RULES:
            raise ValueError(f"rule={rule!r}: expected one of {RULES}")
        if min_judged_failures < 1:
            raise ValueError(f"min_judged_failures must be >= 1, got {min_judged_failures}")
        for name, value in (("sae_drop", sae_drop), ("judged_drop", judged_drop), ("recall_drop", recall_drop)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if baseline_rollouts < 1 or window_rollouts < 1:
            raise ValueError(f"baseline_rollouts and window_rollouts must be >= 1, got {baseline_rollouts}, "
                             f"{window_rollouts}")
        if not (callable(penalty) and callable(judge)):
            raise TypeError("penalty and judge must be reward functions")
        self.penalty, self.judge, self.on_trip = penalty, judge, on_trip
        self.sae_drop, self.judged_drop, self.fire_threshold = sae_drop, judged_drop, fire_threshold
        self.baseline_rollouts, self.window_rollouts = baseline_rollouts, window_rollouts
        self.rule, self.recall_drop, self.min_judged_failures = rule, recall_drop, min_judged_failures
        self.__name__ = getattr(penalty, "__name__", type(penalty).__name__)
        self.feature_pack = getattr(penalty, "feature_pack", None)  # checked against the SAE like the penalty's
        self.probe = getattr(penalty, "probe", None)
        self._baseline: list[tuple[bool, bool]] = []
        self._recent: deque[tuple[bool, bool]] = deque(maxlen=window_rollouts)
        self.tripped = False
        self.metrics: dict[str, float] = {}

    def __call__(self, completions, **kwargs) -> list[float | None]:
        rewards = self.penalty(completions=completions, **kwargs)
        judged = self.judge(completions=completions, **kwargs)
        local = [float(r is not None and r < -self.fire_threshold) + 2.0 * float(j is not None and j > 0.5)
                 for r, j in zip(rewards, judged, strict=True)]
        flags = [(bool(int(v) & 1), bool(int(v) & 2)) for v in gather_floats(local)[0]]
        self.observe(flags)
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            for key, value in self.metrics.items():
                log_metric(f"guard/{self.__name__}/{key}", value)
        return rewards

    def observe(self, flags: list[tuple[bool, bool]]) -> dict[str, float]:
        """Add a batch of ``(sae_flagged, judged_flagged)`` rollouts; update `metrics` and `tripped`."""
        if not flags:
            return self.metrics
        room = self.baseline_rollouts - len(self._baseline)
        self._baseline.extend(flags[:max(room, 0)])
        self._recent.extend(flags)
        judged_failures = [s for s, j in flags if j]
        metrics = {"sae_rate": _rate(s for s, _ in flags), "judged_rate": _rate(j for _, j in flags)}
        if judged_failures:
            metrics["sae_recall"] = _rate(judged_failures)
        if len(self._baseline) >= self.baseline_rollouts:
            s0, j0 = _rate(s for s, _ in self._baseline), _rate(j for _, j in self._baseline)
            s, j = _rate(s for s, _ in self._recent), _rate(j for _, j in self._recent)
            if s0 > 0 and j0 > 0:
                metrics["sae_kept"], metrics["judged_kept"] = s / s0, j / j0
                if self.rule != "recall" and s <= (1 - self.sae_drop) * s0 and j > (1 - self.judged_drop) * j0:
                    self._trip(f"fires on {s:.3f} of the recent rollouts (baseline {s0:.3f}), but the judge still "
                               f"flags {j:.3f} (baseline {j0:.3f})")
            base_caught = [s for s, j in self._baseline if j]
            now_caught = [s for s, j in self._recent if j]
            r0, r = _rate(base_caught), _rate(now_caught)
            if min(len(base_caught), len(now_caught)) >= self.min_judged_failures and r0 > 0:
                metrics["recall_kept"] = r / r0
                if self.rule != "rate" and r <= (1 - self.recall_drop) * r0:
                    self._trip(f"fires on {r:.3f} of the judged failures in the recent rollouts (baseline "
                               f"{r0:.3f}; {len(now_caught)} judged failures)")
        metrics["tripped"] = float(self.tripped)
        self.metrics = metrics
        return metrics

    def state(self) -> dict:
        """JSON-able settings and running state, in transformers' ``{"args", "attributes"}`` layout."""
        code = lambda flags: [int(s) + 2 * int(j) for s, j in flags]  # noqa: E731
        return {"args": {name: getattr(self, name) for name in _SETTINGS},
                "attributes": {"penalty": self.__name__, "baseline": code(self._baseline),
                               "recent": code(self._recent), "tripped": self.tripped, "metrics": dict(self.metrics)}}

    @classmethod
    def from_state(cls, state: dict, penalty, judge, **kwargs) -> RewardHackingGuard:
        """A guard on ``penalty`` and ``judge`` with the settings and running state of `state`'s."""
        _check_state(state)
        guard = cls(penalty, judge, **(state["args"] | kwargs))
        guard.load_state(state)
        return guard

    def load_state(self, state: dict) -> None:
        """Continue from `state` (a checkpoint's); refused if it was saved with other settings or penalty."""
        _check_state(state)
        attributes = state["attributes"]
        if attributes["penalty"] != self.__name__:
            raise ValueError(f"this is the state of the guard on {attributes['penalty']!r}, not on {self.__name__!r}")
        for name in _SETTINGS:
            saved, now = state["args"].get(name), getattr(self, name)
            if saved != now:
                raise ValueError(f"RewardHackingGuard {self.__name__!r}: saved with {name}={saved}, now {now}; "
                                 f"resume with the run's settings (a changed rule would not decide as it did)")
        decode = lambda codes: [(bool(c & 1), bool(c & 2)) for c in codes]  # noqa: E731
        self._baseline = decode(attributes["baseline"])
        self._recent = deque(decode(attributes["recent"]), maxlen=self.window_rollouts)
        self.tripped, self.metrics = bool(attributes["tripped"]), dict(attributes["metrics"])

    def _trip(self, finding: str) -> None:
        if self.tripped:
            return
        self.tripped = True
        action = "stopping training" if self.on_trip == "stop" else "continuing"
        warnings.warn(f"reward hacking? the {self.__name__} penalty {finding}: the policy may be evading the SAE "
                      f"features rather than the behaviour; {action}", stacklevel=3)

    def on_step_end(self, args, state, control, **kwargs):
        if self.tripped and self.on_trip == "stop":
            control.should_training_stop = True
        return control


def restore_guards(callbacks, saved) -> None:
    """Load a checkpoint's ``stateful_callbacks["RewardHackingGuard"]`` (one state, or a list) into the guards
    among ``callbacks``, matched by penalty name; for a name, its last saved states (transformers appends a
    list of same-class states on each save instead of replacing it)."""
    states = saved if isinstance(saved, list) else [saved]
    for state in states:
        _check_state(state)
    guards = [cb for cb in callbacks if isinstance(cb, RewardHackingGuard)]
    for name in dict.fromkeys(g.__name__ for g in guards):
        mine = [g for g in guards if g.__name__ == name]
        found = [s for s in states if s["attributes"]["penalty"] == name][-len(mine):]
        if len(found) < len(mine):
            warnings.warn(f"the checkpoint holds no state for {len(mine) - len(found)} reward-hacking guard(s) on "
                          f"{name!r}: they start afresh (a new baseline)", UserWarning, stacklevel=2)
        for guard, state in zip(mine[len(mine) - len(found):], found):
            guard.load_state(state)


def _check_state(state) -> None:
    if not (isinstance(state, dict) and isinstance(state.get("args"), dict)
            and {"penalty", "baseline", "recent", "tripped", "metrics"} <= set(state.get("attributes") or {})):
        raise ValueError(f"not a RewardHackingGuard state (expected 'args' and 'attributes' as its state() "
                         f"writes): {str(state)[:120]}")


def _rate(flags) -> float:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else 0.0
