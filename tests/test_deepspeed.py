"""DeepSpeed on a CPU box: ZeRO-2/3 configs parse with transformers and accelerate, and the SAE hooks and
loss helper reach the layers through a DeepSpeed-engine-shaped wrapper (``engine.module``). The SAE is not
a parameter of the wrapped model, so ZeRO never partitions it."""

import copy

import pytest
import torch
from torch import nn

from qscope_rl import capture_residual, load_sae
from qscope_rl.trainers import SAELossHelper

pytest.importorskip("deepspeed")


def zero_config(stage):
    return {"zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu"}},
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "bf16": {"enabled": False}}


class EngineLike(nn.Module):
    """What `deepspeed.initialize` returns, as far as the hooks care: the model under `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_configs_parse(stage):
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    config = HfTrainerDeepSpeedConfig(zero_config(stage))
    assert config.get_value("zero_optimization.stage") == stage
    assert config.is_zero3() == (stage == 3)
    plugin = DeepSpeedPlugin(hf_ds_config=zero_config(stage))
    assert plugin.zero_stage == stage


def test_hooks_and_helper_reach_layers_through_an_engine_wrapper(world, packs):
    model = copy.deepcopy(world.model)
    engine = EngineLike(model)
    sae = load_sae(world.sae_dir, layer=world.layer)
    batch = world.tokenizer(["a b c", "d e"], return_tensors="pt", padding=True)
    assert capture_residual(engine, world.layer).module is model.model.layers[world.layer]
    with torch.no_grad(), capture_residual(engine, world.layer) as capture:
        engine(**batch)
    assert capture.last.shape == (*batch["input_ids"].shape, model.config.hidden_size)
    helper = SAELossHelper(engine, sae, packs["zh"], weight=1.0)
    with helper.capture():
        engine(**batch)
    helper.loss(batch["attention_mask"]).backward()
    assert any(p.grad is not None for p in model.parameters())
    assert not any(p.requires_grad for p in sae.parameters())
    assert not set(map(id, sae.parameters())) & set(map(id, engine.parameters()))  # never handed to ZeRO


ENGINE_SCRIPT = '''
import json, os, sys
import deepspeed.comm.torch  # noqa: F401
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # gloo only: no JIT-built shm op
import torch
from datasets import Dataset
from qscope_rl.hooks import _LayerHook, _raise_stop_forward, unwrap_model
from qscope_rl.rewards import LanguageConsistencyReward, SAECodeSwitchPenalty
from qscope_rl.trainers import SAEGRPOConfig, SAEGRPOTrainer
from qscope_rl.world.world import World

world_path, zh_pack, loop_pack, out, stage, capture = sys.argv[1:7]
world = World(world_path)
# transformers gives accelerate no backend under DeepSpeed; on a machine without GPUs accelerate then counts 1
# process beside DeepSpeed's 2 (its gather fails). A state set up first, with gloo, is used as configured.
from accelerate import PartialState
os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
PartialState(backend="gloo")
# persistence threshold 0: ZeRO-3 partitions every parameter (the tiny model's would all stay resident otherwise)
config = {"zero_optimization": {"stage": int(stage), "stage3_param_persistence_threshold": 0},
          "train_micro_batch_size_per_gpu": "auto",
          "gradient_accumulation_steps": "auto", "bf16": {"enabled": False}, "zero_allow_untested_optimizer": True}
args = SAEGRPOConfig(output_dir=os.path.join(out, capture), per_device_train_batch_size=4, num_generations=4,
                     max_completion_length=8, max_steps=2, learning_rate=5e-4, bf16=False, report_to="none",
                     logging_steps=1, save_strategy="no", seed=0, gradient_checkpointing=False, deepspeed=config,
                     accelerator_config={"use_configured_state": True},
                     sae_source=str(world.sae_dir), sae_layer=world.layer, code_switch_pack=zh_pack,
                     aux_loss_weight=0.1, amplify_pack=loop_pack, amplify_alpha=4.0, sae_capture=capture)
prompts = [p.text for p in world.prompts("train", lang="en")[:8]]
trainer = SAEGRPOTrainer(model=world.model, reward_funcs=[LanguageConsistencyReward("en"),
                         SAECodeSwitchPenalty(zh_pack)], args=args, processing_class=world.tokenizer,
                         train_dataset=Dataset.from_dict({"prompt": prompts}))
trainer.train()
model = unwrap_model(trainer.model_wrapped)
ours = [h for m in model.modules() for h in m._forward_hooks.values()
        if isinstance(getattr(h, "__self__", None), _LayerHook) or h is _raise_stop_forward]
gathered = [n for n, p in model.named_parameters() if hasattr(p, "ds_status") and p.ds_status.name != "NOT_AVAILABLE"]
sae_metrics = [{k: v for k, v in e.items() if k.startswith("sae/") or k.startswith("rewards/")}
               for e in trainer.state.log_history if "loss" in e]
report = dict(engine=type(trainer.model_wrapped).__name__, world_size=trainer.accelerator.num_processes,
              zero_stage=trainer.accelerator.state.deepspeed_plugin.zero_stage, leaked_hooks=len(ours),
              gathered=gathered, sae_metrics=sae_metrics, path=trainer.sae_capture_path,
              partitioned=sum(hasattr(p, "ds_status") for p in model.parameters()))
with open(os.path.join(out, f"{capture}-rank{trainer.accelerator.process_index}.json"), "w") as f:
    json.dump(report, f)
'''


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_grpo_with_sae_under_deepspeed_on_two_cpu_processes(world, pack_files, tmp_path, stage):
    """A real DeepSpeed engine (CPU accelerator, gloo), 2 processes, 2 GRPO steps with SAE rewards, the aux loss and
    amplified sampling, in both capture modes: same sae/* metrics on both ranks, our hooks gone, ZeRO-3 parameters
    released (none left gathered) after the early-exit forward."""
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "engine.py"
    script.write_text(ENGINE_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
           "DS_ACCELERATOR": "cpu"}
    for capture in ("generation", "forward"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               str(world.path), str(pack_files["zh"]), str(pack_files["loop"]), str(tmp_path), str(stage), capture]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-4000:]
        ranks = [json.loads((tmp_path / f"{capture}-rank{r}.json").read_text()) for r in (0, 1)]
        for report in ranks:
            assert report["engine"] == "DeepSpeedEngine" and report["world_size"] == 2
            assert report["zero_stage"] == stage and report["path"] == capture
            assert report["leaked_hooks"] == 0 and report["gathered"] == []
            assert (report["partitioned"] > 0) == (stage == 3)
            assert len(report["sae_metrics"]) == 2
            for entry in report["sae_metrics"]:
                assert {"sae/code_switch_rate", "sae/aux_loss", "sae/amplified_fraction"} <= set(entry)
        assert ranks[0]["sae_metrics"] == ranks[1]["sae_metrics"]
