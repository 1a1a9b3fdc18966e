"""SAERLOOTrainer and SASFTTrainer on the test-size demo world: train, log sae/*, scale the aux term for
gradient accumulation as their parents scale the loss, and SASFT lowers the target pre-activations."""

import copy
import functools

import pytest
import torch
import trl
from datasets import Dataset
from trl import RLOOTrainer, SFTConfig

from qscope_rl import load_sae
from qscope_rl.features.aux_loss import FeatureAuxLoss
from qscope_rl.rewards import LanguageConsistencyReward, SAECodeSwitchPenalty
from qscope_rl.trainers import SAEGRPOConfig, SAEGRPOTrainer, SAERLOOConfig, SAERLOOTrainer, SASFTConfig, SASFTTrainer

COMMON = dict(bf16=False, report_to="none", logging_steps=1, save_strategy="no", use_cpu=True, seed=0,
              gradient_checkpointing=False, learning_rate=5e-4)


def prompt_dataset(world, n=8):
    return Dataset.from_dict({"prompt": [p.text for p in world.prompts("train", lang="en")[:n]]})


def english_docs(world, n, offset=0):
    docs = [d.text for d in world.documents("train") if d.lang == "en" and d.switch_char is None]
    return docs[offset:offset + n]


def rl_fields(world, pack_files, **extra):
    return dict(sae_source=str(world.sae_dir), sae_layer=world.layer, code_switch_pack=str(pack_files["zh"]),
                repetition_pack=str(pack_files["repetition"]), aux_loss_weight=0.1, **extra)


def rloo_trainer(world, tmp_path, pack_files, **overrides):
    args = SAERLOOConfig(output_dir=str(tmp_path / "rloo"), per_device_train_batch_size=4, num_generations=4,
                         max_completion_length=12, max_steps=2, beta=0.0, **{**COMMON, **overrides},
                         **rl_fields(world, pack_files))
    return SAERLOOTrainer(model=copy.deepcopy(world.model), reward_funcs=[LanguageConsistencyReward("en"),
                          SAECodeSwitchPenalty(pack_files["zh"])], args=args, train_dataset=prompt_dataset(world),
                          processing_class=world.tokenizer)


@pytest.mark.slow
def test_rloo_trains_with_sae_metrics_aux_loss_and_amplification(world, pack_files, tmp_path):
    trainer = rloo_trainer(world, tmp_path, pack_files, amplify_pack=str(pack_files["repetition"]))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    keys = set().union(*trainer.state.log_history)
    for key in ("loss", "sae/code_switch_rate", "sae/repetition_rate", "sae/aux_loss", "sae/amplified_fraction",
                "rewards/sae_code_switch/mean"):
        assert key in keys, key
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))


def _aux_added(trainer, world):
    """What `_add_aux_loss` adds to a zero parent loss on one batch, and the aux value it logged."""
    batch = world.tokenizer(english_docs(world, 2), return_tensors="pt", padding=True)
    model = trainer.model.train()
    zero = lambda: model(**batch).logits.sum() * 0.0
    added = trainer._add_aux_loss(model, {"completion_mask": batch["attention_mask"]}, zero)
    return added.item(), trainer._metrics["train"]["sae/aux_loss"][-1]


def test_aux_term_follows_each_parents_gradient_accumulation_scaling(world, pack_files, tmp_path):
    # RLOO returns a per-micro-batch loss and lets transformers' Trainer divide by the accumulation steps
    assert RLOOTrainer.loss_is_scaled_for_ga is False
    rloo = rloo_trainer(world, tmp_path, pack_files, gradient_accumulation_steps=2)
    rloo.current_gradient_accumulation_steps = 2
    added, aux = _aux_added(rloo, world)
    assert aux > 0 and added == pytest.approx(aux, rel=1e-5)  # unscaled: the Trainer divides the sum
    grpo = SAEGRPOTrainer(model=copy.deepcopy(world.model), reward_funcs=[LanguageConsistencyReward("en")],
                          args=SAEGRPOConfig(output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=4,
                                             num_generations=4, max_steps=1, gradient_accumulation_steps=2,
                                             **COMMON, **rl_fields(world, pack_files)),
                          train_dataset=prompt_dataset(world), processing_class=world.tokenizer)
    grpo.current_gradient_accumulation_steps = 2
    added, aux = _aux_added(grpo, world)
    assert added == pytest.approx(aux / 2, rel=1e-5)  # GRPO pre-scales its loss: so is the term


def sasft_trainer(world, tmp_path, name, pack_files=None, docs=None, **overrides):
    sae = dict(sae_source=str(world.sae_dir), sae_layer=world.layer, sasft_pack=str(pack_files["zh"]),
               sasft_lambda=1.0, sasft_alpha="zero") if pack_files else {}
    args = SASFTConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=3, max_length=64,
                       **{**COMMON, **sae, **overrides})
    train = Dataset.from_dict({"text": docs or english_docs(world, 12)})
    return SASFTTrainer(model=copy.deepcopy(world.model), args=args, train_dataset=train,
                        processing_class=world.tokenizer)


def _target_pre_acts(model, world, pack, docs):
    """Mean positive pre-activation of the pack's features on a fixed batch."""
    sae = load_sae(world.sae_dir, layer=world.layer)
    aux = FeatureAuxLoss(sae, pack.ids, None)
    batch = world.tokenizer(docs, return_tensors="pt", padding=True)
    from qscope_rl.features.aux_loss import residual_for_loss

    with torch.no_grad(), residual_for_loss(model.eval(), world.layer) as cap:
        model(**batch)
    return aux(cap.last, batch["attention_mask"]).item()


@pytest.mark.slow
def test_sasft_logs_aux_loss_and_lowers_target_pre_activations_vs_sft(world, packs, pack_files, tmp_path):
    docs = english_docs(world, 8)
    sasft = sasft_trainer(world, tmp_path, "sasft", pack_files, docs=docs)
    sasft.train()
    sft = sasft_trainer(world, tmp_path, "sft", docs=docs)
    assert sft.sae is None
    sft.train()
    keys = set().union(*sasft.state.log_history)
    assert {"loss", "sae/aux_loss"} <= keys
    assert "sae/aux_loss" not in set().union(*sft.state.log_history)
    base = _target_pre_acts(copy.deepcopy(world.model), world, packs["zh"], docs)
    with_sasft = _target_pre_acts(sasft.model, world, packs["zh"], docs)
    with_sft = _target_pre_acts(sft.model, world, packs["zh"], docs)
    assert with_sasft < with_sft and with_sasft < base


def test_sasft_aux_term_scaled_as_transformers_scales_the_loss(world, pack_files, tmp_path):
    trainer = sasft_trainer(world, tmp_path, "ga", pack_files, gradient_accumulation_steps=2)
    trainer.current_gradient_accumulation_steps = 2
    trainer.model.train()
    assert trainer.model_accepts_loss_kwargs  # the CE is normalised by num_items_in_batch: pre-scaled
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    n = int((inputs["labels"][:, 1:] != -100).sum()) * 2
    plain = super(SASFTTrainer, trainer).compute_loss(trainer.model, dict(inputs), num_items_in_batch=n)
    ours = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=n)
    aux = trainer._metrics["train"]["sae/aux_loss"][-1]
    assert aux > 0 and (ours - plain).item() == pytest.approx(aux / 2, rel=1e-4)
    # without num_items_in_batch the Trainer divides the whole loss itself: the term is added unscaled
    plain = super(SASFTTrainer, trainer).compute_loss(trainer.model, dict(inputs))
    ours = trainer.compute_loss(trainer.model, dict(inputs))
    assert (ours - plain).item() == pytest.approx(trainer._metrics["train"]["sae/aux_loss"][-1], rel=1e-4)


def test_sasft_refuses_bad_config(world, pack_files, tmp_path):
    with pytest.raises(ValueError, match="needs the unwanted-language pack"):
        SASFTConfig(output_dir=str(tmp_path), sae_source=str(world.sae_dir))
    with pytest.raises(ValueError, match="sasft_alpha"):
        SASFTConfig(output_dir=str(tmp_path), sae_source=str(world.sae_dir), sasft_pack=str(pack_files["zh"]),
                    sasft_alpha="mean")
    with pytest.raises(ValueError, match="sasft_lambda must be a finite number >= 0"):
        SASFTConfig(output_dir=str(tmp_path), sae_source=str(world.sae_dir), sasft_pack=str(pack_files["zh"]),
                    sasft_lambda=float("nan"))
    with pytest.raises(ValueError, match="layer 7 does not exist"):
        sasft_trainer(world, tmp_path, "bad", pack_files, sae_layer=7)


def test_sasft_is_a_drop_in_sft_trainer(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train = Dataset.from_dict({"text": english_docs(world, 8)})
    # the parent's own config (a peer's test suite, a script written for TRL): it runs as SFTTrainer, no SAE
    plain = SFTConfig(output_dir=str(tmp_path / "plain"), per_device_train_batch_size=4, max_steps=1, max_length=64,
                      **COMMON)
    before = plain.to_dict()
    trainer = SASFTTrainer(model=copy.deepcopy(world.model), args=plain, train_dataset=train,
                           processing_class=world.tokenizer)
    assert isinstance(trainer.args, SASFTConfig) and trainer.aux_loss is None and trainer.args.sae_source is None
    assert plain.to_dict() == before and type(plain) is SFTConfig
    trainer.train()
    assert trainer.state.global_step == 1
    # no args: the default config, named as SFTTrainer names its own
    monkeypatch.setattr(SASFTConfig, "__init__", functools.partialmethod(SASFTConfig.__init__, **COMMON))
    trainer = SASFTTrainer(model=copy.deepcopy(world.model), train_dataset=train, processing_class=world.tokenizer)
    assert isinstance(trainer.args, SASFTConfig) and trainer.args.output_dir.endswith("-SFT")
    with pytest.raises(TypeError, match="SASFTTrainer needs a SASFTConfig .* or a SFTConfig, got GRPOConfig"):
        SASFTTrainer(model=world.model, args=trl.GRPOConfig(str(tmp_path / "g"), **COMMON), train_dataset=train)
