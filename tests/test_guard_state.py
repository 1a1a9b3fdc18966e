"""RewardHackingGuard's running state in trainer checkpoints: saved as TRL/transformers' ExportableState,
restored into the guard the trainer already has, so a resumed run makes the same decisions."""

import copy
import json

import pytest
from datasets import Dataset
from test_reward_guards import Flags, make_guard, run_guard

from qscope_rl.rewards import CodeSwitchJudge, RewardHackingGuard, SAECodeSwitchPenalty
from qscope_rl.trainers import SAEGRPOConfig, SAEGRPOTrainer

BOTH = ([1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0])  # SAE and judge agree: rates 0.5
EVADED = ([0] * 8, [1, 1, 1, 1, 0, 0, 0, 0])  # the judge still sees 0.5, the SAE nothing


def test_state_round_trips_through_json_and_gives_the_same_decisions():
    interrupted = make_guard()
    run_guard(interrupted, [BOTH, BOTH])
    saved = json.loads(json.dumps(interrupted.state()))  # what trainer_state.json holds
    assert saved["args"]["baseline_rollouts"] == 8 and saved["attributes"]["tripped"] is False

    resumed = RewardHackingGuard.from_state(saved, penalty=Flags("sae", -1.0), judge=Flags("judged", 1.0))
    fresh = make_guard()  # what a resume without the state had: EVADED becomes its baseline, nothing to compare
    with pytest.warns(UserWarning, match="reward hacking"):
        expected = run_guard(interrupted, [EVADED, BOTH])
    with pytest.warns(UserWarning, match="reward hacking"):
        assert run_guard(resumed, [EVADED, BOTH]) == expected
    assert resumed.tripped and resumed.state() == interrupted.state()
    run_guard(fresh, [EVADED, BOTH])
    assert not fresh.tripped


def test_state_of_other_settings_or_another_penalty_is_refused():
    guard = make_guard()
    run_guard(guard, [BOTH])
    other = make_guard(sae_drop=0.3)
    with pytest.raises(ValueError, match="RewardHackingGuard 'sae': saved with sae_drop=0.5, now 0.3"):
        other.load_state(guard.state())
    renamed = RewardHackingGuard(Flags("other", -1.0), Flags("judged", 1.0), baseline_rollouts=8, window_rollouts=8)
    with pytest.raises(ValueError, match="state of the guard on 'sae', not on 'other'"):
        renamed.load_state(guard.state())
    with pytest.raises(ValueError, match="not a RewardHackingGuard state"):
        guard.load_state({"args": {}})


def grpo(world, pack_files, tmp_path, guard, max_steps, **extra):
    args = SAEGRPOConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, num_generations=4,
                         max_completion_length=8, max_steps=max_steps, learning_rate=5e-4, bf16=False,
                         report_to="none", logging_steps=1, save_strategy="steps", save_steps=2, use_cpu=True, seed=0,
                         gradient_checkpointing=False, sae_source=str(world.sae_dir), sae_layer=world.layer, **extra)
    prompts = [p.text for p in world.prompts("train", lang="en")[:8]]
    return SAEGRPOTrainer(model=copy.deepcopy(world.model), reward_funcs=[guard], args=args,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=world.tokenizer)


def make_world_guard(pack_files):
    return RewardHackingGuard(SAECodeSwitchPenalty(pack_files["zh"]), CodeSwitchJudge("en"), baseline_rollouts=6,
                              window_rollouts=4)


@pytest.mark.slow
@pytest.mark.parametrize("restore_callbacks", [False, True])
def test_resume_restores_the_guard_the_trainer_rewards_with(world, pack_files, tmp_path, restore_callbacks):
    first_guard = make_world_guard(pack_files)
    grpo(world, pack_files, tmp_path, first_guard, max_steps=2).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    stored = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["RewardHackingGuard"]
    assert stored == json.loads(json.dumps(first_guard.state()))
    assert len(stored["attributes"]["baseline"]) == 6 and len(stored["attributes"]["recent"]) == 4

    guard = make_world_guard(pack_files)
    resumed = grpo(world, pack_files, tmp_path, guard, max_steps=2,
                   restore_callback_states_from_checkpoint=restore_callbacks)
    restored = []  # the guard's state right after the restore (GRPO may still score one batch after it)
    load_state = guard.load_state
    guard.load_state = lambda state: (load_state(state), restored.append(guard.state()))
    resumed.train(resume_from_checkpoint=str(checkpoint))  # already at max_steps
    assert restored == [first_guard.state()]
    assert resumed.reward_funcs[0] is guard
    assert [cb for cb in resumed.callback_handler.callbacks if isinstance(cb, RewardHackingGuard)] == [guard]
