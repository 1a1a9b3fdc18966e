"""torchrun with 2 CPU processes (gloo): SAEGRPOTrainer's sae/* rates are reduced over both ranks' rollouts."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch
    from datasets import Dataset
    from qscope_rl.features.detection import code_switch_scores
    from qscope_rl.rewards import LanguageConsistencyReward
    from qscope_rl.trainers import SAEGRPOConfig, SAEGRPOTrainer
    from qscope_rl.world.world import World

    world_path, zh_pack, out = sys.argv[1:4]
    world = World(world_path)

    class Recording(SAEGRPOTrainer):
        """Writes each rank's local code-switch flags before the mixin reduces them."""
        def _log_sae_metrics(self, mode, rewards_per_func=None):
            scores = code_switch_scores(self._rollout_acts, self.code_switch_pack).per_completion
            flags = (scores > self.args.sae_detect_threshold).float().tolist()
            with open(os.path.join(out, f"rank{self.accelerator.process_index}.jsonl"), "a") as f:
                f.write(json.dumps({"step": self.state.global_step + 1, "flags": flags}) + "\\n")
            super()._log_sae_metrics(mode, rewards_per_func)

    args = SAEGRPOConfig(output_dir=os.path.join(out, "run"), per_device_train_batch_size=4, num_generations=4,
                         max_completion_length=8, max_steps=2, learning_rate=5e-4, bf16=False, report_to="none",
                         logging_steps=1, save_strategy="no", use_cpu=True, seed=0, gradient_checkpointing=False,
                         sae_source=str(world.sae_dir), sae_layer=world.layer, code_switch_pack=zh_pack)
    prompts = [p.text for p in world.prompts("train", lang="en")[:8]]
    trainer = Recording(model=world.model, reward_funcs=[LanguageConsistencyReward("en")], args=args,
                        train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=world.tokenizer)
    trainer.train()
    if trainer.accelerator.is_main_process:
        with open(os.path.join(out, "main.json"), "w") as f:
            json.dump({"world_size": trainer.accelerator.num_processes, "log": trainer.state.log_history}, f)
''')


@pytest.mark.slow
def test_torchrun_two_processes_reduce_sae_rates(world, pack_files, tmp_path):
    script = tmp_path / "run_grpo.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(world.path), str(pack_files["zh"]), str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    main = json.loads((tmp_path / "main.json").read_text())
    assert main["world_size"] == 2
    ranks = [[json.loads(line) for line in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    logged = {e["step"]: e["sae/code_switch_rate"] for e in main["log"] if "sae/code_switch_rate" in e}
    assert sorted(logged) == [1, 2]
    for step, rate in logged.items():
        flags = [f for rank in ranks for entry in rank if entry["step"] == step for f in entry["flags"]]
        assert len(flags) == 8  # 4 rollouts on each of the 2 ranks
        assert rate == pytest.approx(sum(flags) / len(flags))
