"""Save and resume: the SAE stays out of the checkpoint, its config is saved beside it, the sae/* metric stream
continues after resume, and resuming with a different pack is refused."""

import copy
import json
import os

import pytest
import torch
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


def fake_checkpoint(source, folder, complete=True):
    """What a save leaves in a checkpoint folder, without training: the sidecar of ``source``'s settings, and
    (if complete) transformers' trainer_state.json, which is written last."""
    folder.mkdir(parents=True)
    source._write_sae_sidecar(str(folder))
    if complete:
        (folder / "trainer_state.json").write_text("{}")
    return folder


def test_resume_true_checks_the_last_checkpoint_like_a_path(world, pack_files, tmp_path):
    """issue 13 item 4: train(resume_from_checkpoint=True) skipped the sidecar check a path gets."""
    fake_checkpoint(trainer(world, pack_files, tmp_path, max_steps=2, pack="en"), tmp_path / "run" / "checkpoint-2")
    zh = trainer(world, pack_files, tmp_path, max_steps=4)
    for resume in (True, "true"):  # "true" as `--resume_from_checkpoint true` on a command line gives it
        with pytest.raises(ValueError, match="checkpoint-2 with a different SAE setting: packs"):
            zh.train(resume_from_checkpoint=resume)


def test_sidecar_records_the_method_settings_and_the_sae_identity(world, pack_files, tmp_path):
    """issue 13 item 11: settings that change the method are recorded and a change is refused naming it."""
    source = trainer(world, pack_files, tmp_path, max_steps=2)
    sidecar = source._sae_sidecar()
    assert {"sae_detect_threshold", "aux_loss_use_alpha", "amplify_alpha", "amplify_top_n",
            "aux_loss_weight"} <= set(sidecar["method"])
    assert sidecar["sae_digest"] and sidecar["format"] == "qscope-rl/sae-sidecar"
    checkpoint = fake_checkpoint(source, tmp_path / "run" / "checkpoint-2")
    other = trainer(world, pack_files, tmp_path, max_steps=4)
    other.args.sae_detect_threshold = 0.5
    with pytest.raises(ValueError, match="method setting sae_detect_threshold was 0.0, now 0.5"):
        other.train(resume_from_checkpoint=str(checkpoint))
    same = trainer(world, pack_files, tmp_path, max_steps=4)
    with torch.no_grad():  # same shape, same source path, other weights: the digest tells them apart
        same.sae.b_enc.add_(1.0)
    del same.sae._qscope_digest
    with pytest.raises(ValueError, match="different SAE setting: sae_digest"):
        same.train(resume_from_checkpoint=str(checkpoint))


def test_sasft_sidecar_records_sasft_settings(world, pack_files, tmp_path):
    from qscope_rl.trainers import SASFTConfig, SASFTTrainer

    args = SASFTConfig(output_dir=str(tmp_path / "sft"), max_steps=1, report_to="none", use_cpu=True, bf16=False,
                       sae_source=str(world.sae_dir), sae_layer=world.layer, sasft_pack=str(pack_files["zh"]),
                       sasft_top_n=3, max_length=32)
    docs = [d.text for d in world.documents("train")[:4]]
    sft = SASFTTrainer(model=copy.deepcopy(world.model), args=args, train_dataset=Dataset.from_dict({"text": docs}),
                       processing_class=world.tokenizer)
    method = sft._sae_sidecar()["method"]
    assert method["sasft_top_n"] == 3 and "sasft_lambda" in method and "sasft_alpha" in method


def test_missing_corrupt_or_incomplete_checkpoints_are_named(world, pack_files, tmp_path, monkeypatch):
    source = trainer(world, pack_files, tmp_path, max_steps=2)
    good = fake_checkpoint(source, tmp_path / "run" / "checkpoint-2")
    cut = fake_checkpoint(source, tmp_path / "run" / "checkpoint-4", complete=False)
    resumed = trainer(world, pack_files, tmp_path, max_steps=6)
    for resume in (True, str(cut)):
        with pytest.raises(ValueError, match=r"checkpoint-4 is incomplete \(no trainer_state.json.*resume from "
                                             r".*checkpoint-2, the last complete one"):
            resumed.train(resume_from_checkpoint=resume)
    (good / "qscope_sae.json").unlink()
    with pytest.raises(ValueError, match="checkpoint-2 has no qscope_sae.json.*QSCOPE_RL_RESUME_WITHOUT_SIDECAR=1"):
        resumed._check_sae_sidecar(str(good))
    monkeypatch.setenv("QSCOPE_RL_RESUME_WITHOUT_SIDECAR", "1")
    with pytest.warns(UserWarning, match="has no qscope_sae.json"):
        resumed._check_sae_sidecar(str(good))
    for content, message in ((b"[1, 2]", "must hold a JSON object, got list"), (b'{"sae_so', "not valid JSON"),
                             (b"\x00\xff\xfe", "not UTF-8")):
        (good / "qscope_sae.json").write_bytes(content)
        with pytest.raises(ValueError, match=message):
            resumed._check_sae_sidecar(str(good))


def test_sidecar_is_written_before_the_model_and_goes_to_the_hub(world, pack_files, tmp_path, monkeypatch):
    import transformers

    source = trainer(world, pack_files, tmp_path, max_steps=2)
    seen = {}

    def save(self, output_dir=None, state_dict=None):
        seen["sidecar_before_weights"] = (tmp_path / "out" / "qscope_sae.json").exists()

    monkeypatch.setattr(transformers.Trainer, "_save", save)
    source.save_model(str(tmp_path / "out"))
    assert seen == {"sidecar_before_weights": True}

    checkpoint = fake_checkpoint(source, tmp_path / "run" / "checkpoint-2")
    uploaded = {}
    monkeypatch.setattr(transformers.Trainer, "_push_from_checkpoint",
                        lambda self, folder: uploaded.update(files=sorted(os.listdir(self.args.output_dir))))
    source._push_from_checkpoint(str(checkpoint))
    assert "qscope_sae.json" in uploaded["files"]
