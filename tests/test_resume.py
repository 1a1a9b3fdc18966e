"""Save and resume: the SAE stays out of the checkpoint, its config is saved beside it, the sae/* metric stream
continues after resume, and resuming with a different pack is refused."""

import copy
import json

import pytest
from datasets import Dataset
from safetensors import safe_open

from qscope_rl.rewards import LanguageConsistencyReward
from qscope_rl.trainers import SAEGRPOConfig, SAEGRPOTrainer


def trainer(world, pack_files, tmp_path, max_steps, pack="zh"):
    args = SAEGRPOConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, num_generations=4,
                         max_completion_length=8, max_steps=max_steps, learning_rate=5e-4, bf16=False,
                         report_to="none", logging_steps=1, save_strategy="steps", save_steps=2, use_cpu=True, seed=0,
                         gradient_checkpointing=False, sae_source=str(world.sae_dir), sae_layer=world.layer,
                         code_switch_pack=str(pack_files[pack]), aux_loss_weight=0.1)
    prompts = [p.text for p in world.prompts("train", lang="en")[:8]]
    return SAEGRPOTrainer(model=copy.deepcopy(world.model), reward_funcs=[LanguageConsistencyReward("en")], args=args,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=world.tokenizer)


@pytest.mark.slow
def test_interrupted_run_resumes_with_the_same_sae(world, pack_files, tmp_path):
    first = trainer(world, pack_files, tmp_path, max_steps=2)
    first.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    sidecar = json.loads((checkpoint / "qscope_sae.json").read_text())
    assert sidecar["sae_source"] == str(world.sae_dir) and sidecar["sae_layer"] == world.layer
    assert sidecar["packs"]["code_switch_pack"]["name"] == json.loads(pack_files["zh"].read_text())["name"]
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("sae" in k or "W_enc" in k or "W_dec" in k for k in keys)

    with pytest.raises(ValueError, match="different SAE setting: packs"):
        trainer(world, pack_files, tmp_path, max_steps=4, pack="en").train(resume_from_checkpoint=str(checkpoint))

    second = trainer(world, pack_files, tmp_path, max_steps=4)
    second.train(resume_from_checkpoint=str(checkpoint))
    history = second.state.log_history
    steps = [e["step"] for e in history if "sae/code_switch_rate" in e]
    assert steps == [1, 2, 3, 4]  # the metric stream of the first run, continued
    assert all("sae/aux_loss" in e for e in history if e["step"] in (3, 4) and "loss" in e)
    assert (tmp_path / "run" / "checkpoint-4" / "qscope_sae.json").exists()
