"""torchrun with 2 CPU processes (gloo): NormalizedReward pools its running statistics over both ranks and
RewardHackingGuard decides on both ranks' flags, each exactly as one process given every rank's values would."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from test_reward_guards import Fixed, Flags

from qscope_rl.rewards import NormalizedReward, RewardHackingGuard

# Per rank, per call: rewards of unequal lengths with missing ones; the window (6) cuts into the pooled history.
REWARDS = {0: [[1.0, 2.0], [5.0, None, 0.5], [2.0]], 1: [[3.0, None, 4.0], [-1.0], [7.0, 7.0, None]]}
# Per rank, per call: (sae, judged) flags. Pooled, the 8-rollout baseline is the first call and the guard trips on
# the second; either rank alone would need both calls for its baseline and would not trip.
FLAGS = {0: [([1, 1, 0, 0], [1, 1, 0, 0]), ([0, 0, 0, 0], [1, 1, 0, 0])],
         1: [([1, 0, 0, 0], [1, 0, 0, 0]), ([0, 0, 0, 0], [1, 0, 0, 0])]}

SCRIPT = textwrap.dedent('''
    import json, os, sys, warnings
    import torch.distributed as dist
    from test_reward_guards import Fixed, Flags
    from qscope_rl.rewards import NormalizedReward, RewardHackingGuard

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    rewards, flags = (json.loads(a)[str(rank)] for a in sys.argv[1:3])
    out = {}
    for method in ("zscore", "rank"):
        reward = NormalizedReward(Fixed(rewards), method=method, window=6)
        out[method] = [reward(completions=["c"] * len(batch)) for batch in rewards]
        out[method + "_history"] = list(reward.history)
    guard = RewardHackingGuard(Flags("sae", -1.0), Flags("judged", 1.0), baseline_rollouts=8, window_rollouts=8)
    out["guard"] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for sae, judged in flags:
            guard(completions=["c"] * len(sae), sae=sae, judged=judged)
            out["guard"].append(dict(guard.metrics))
    out["tripped"] = guard.tripped
    with open(os.path.join(sys.argv[3], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()
''')


def single_process(rewards_by_rank, method):
    """One NormalizedReward given every rank's rewards per call: its outputs, cut back into each rank's."""
    pooled = NormalizedReward(Fixed([r0 + r1 for r0, r1 in zip(*rewards_by_rank.values())]), method=method, window=6)
    per_rank = {0: [], 1: []}
    for r0, r1 in zip(*rewards_by_rank.values()):
        out = pooled(completions=["c"] * (len(r0) + len(r1)))
        per_rank[0].append(out[:len(r0)])
        per_rank[1].append(out[len(r0):])
    return per_rank, list(pooled.history)


@pytest.mark.slow
def test_two_processes_pool_normalisation_and_guard_decisions(tmp_path):
    script = tmp_path / "pooled_rewards.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           json.dumps(REWARDS), json.dumps(FLAGS), str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)}
    for method in ("zscore", "rank"):
        expected, history = single_process(REWARDS, method)
        for r in (0, 1):
            assert ranks[r][method + "_history"] == history  # both ranks hold the pooled window
            for got, want in zip(ranks[r][method], expected[r], strict=True):
                assert [g is None for g in got] == [w is None for w in want]
                assert [g for g in got if g is not None] == pytest.approx([w for w in want if w is not None])

    reference = RewardHackingGuard(Flags("sae", -1.0), Flags("judged", 1.0), baseline_rollouts=8, window_rollouts=8)
    with pytest.warns(UserWarning, match="reward hacking"):
        want = [dict(reference.observe([(bool(s), bool(j)) for rank in (0, 1) for s, j in zip(*FLAGS[rank][call])]))
                for call in range(2)]
    assert ranks[0]["guard"] == ranks[1]["guard"] == want and ranks[0]["tripped"] == ranks[1]["tripped"] is True
