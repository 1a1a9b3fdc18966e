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
