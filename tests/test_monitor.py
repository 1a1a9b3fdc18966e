"""SAEMonitor / SAEMonitorCallback: rates on a fixed probe set, logged through TRL's _metrics or Trainer.log,
warn or stop on limits, refuse bad input."""

import copy

import pytest
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments
from trl import SFTConfig, SFTTrainer

from qscope_rl import load_sae
from qscope_rl.trainers import SAEMonitor, SAEMonitorCallback

COMMON = dict(bf16=False, report_to="none", logging_steps=1, save_strategy="no", use_cpu=True, seed=0,
              per_device_train_batch_size=4, learning_rate=1e-4)


def docs(world, lang, n=8):
    return [d.text for d in world.documents("train") if d.lang == lang and d.switch_char is None][:n]


@pytest.fixture(scope="module")
def sae(world):
    return load_sae(world.sae_dir, layer=world.layer)


def plain_trainer(world, tmp_path, max_steps=3):
    tok = world.tokenizer
    data = Dataset.from_dict(dict(tok(docs(world, "en", 12), truncation=True, max_length=48)))
    args = TrainingArguments(str(tmp_path / "plain"), max_steps=max_steps, **COMMON)
    return Trainer(model=copy.deepcopy(world.model), args=args, train_dataset=data,
                   data_collator=DataCollatorForLanguageModeling(tok, mlm=False))


def test_rates_follow_the_probe_text(world, sae, packs):
    features = packs["zh"].ids[:2].tolist()
    zh = SAEMonitor(sae, world.tokenizer, texts=docs(world, "zh"), code_switch_pack=packs["zh"], features=features)
    en = SAEMonitor(sae, world.tokenizer, texts=docs(world, "en"), code_switch_pack=packs["zh"], features=features)
    on_zh, on_en = zh.measure(world.model), en.measure(world.model)
    assert set(on_zh) == {"sae/probe/code_switch_rate"} | {f"sae/probe/feature_{f}_rate" for f in features}
    assert on_zh["sae/probe/code_switch_rate"] >= on_en["sae/probe/code_switch_rate"]
    assert sum(on_zh[f"sae/probe/feature_{f}_rate"] for f in features) > \
        sum(on_en[f"sae/probe/feature_{f}_rate"] for f in features)
    assert not world.model.training  # mode restored


def test_plain_trainer_logs_and_stops_on_limit(world, sae, packs, tmp_path):
    trainer = plain_trainer(world, tmp_path)
    trainer.add_callback(SAEMonitorCallback(trainer, sae, tokenizer=world.tokenizer, texts=docs(world, "zh", 4),
                                            code_switch_pack=packs["zh"], every_n_steps=1,
                                            limits={"code_switch_rate": 0.0}, on_limit="stop"))
    with pytest.warns(UserWarning, match="code_switch_rate.*stopping training"):
        trainer.train()
    assert trainer.state.global_step == 1  # stopped at the first check instead of running 3 steps
    logged = [e for e in trainer.state.log_history if "sae/probe/code_switch_rate" in e]
    assert logged and logged[0]["sae/probe/code_switch_rate"] > 0


def test_trl_trainer_gets_rates_in_its_metrics_from_sampled_prompts(world, sae, packs, tmp_path):
    args = SFTConfig(str(tmp_path / "sft"), max_steps=2, max_length=48, gradient_checkpointing=False, **COMMON)
    trainer = SFTTrainer(model=copy.deepcopy(world.model), args=args, processing_class=world.tokenizer,
                         train_dataset=Dataset.from_dict({"text": docs(world, "en", 8)}))
    prompts = [p.text for p in world.prompts("heldout", lang="en")[:4]]
    callback = SAEMonitorCallback(trainer, sae, prompts=prompts, max_new_tokens=8, every_n_steps=2,
                                  repetition_pack=packs["repetition"], code_switch_pack=packs["zh"])
    trainer.add_callback(callback)
    trainer.train()
    steps = [e["step"] for e in trainer.state.log_history if "sae/probe/repetition_rate" in e]
    assert steps == [2]  # every_n_steps=2, through TRL's metric averaging (same log entry as the loss)
    assert "loss" in next(e for e in trainer.state.log_history if e["step"] == 2)


def test_bad_input_is_refused(world, sae, packs, tmp_path):
    with pytest.raises(ValueError, match="probe set is empty"):
        SAEMonitor(sae, world.tokenizer, texts=[], code_switch_pack=packs["zh"])
    with pytest.raises(ValueError, match="either prompts= .* or texts="):
        SAEMonitor(sae, world.tokenizer, code_switch_pack=packs["zh"])
    with pytest.raises(ValueError, match="nothing to monitor"):
        SAEMonitor(sae, world.tokenizer, texts=["a"])
    with pytest.raises(ValueError, match="limits on unknown metrics"):
        SAEMonitor(sae, world.tokenizer, texts=["a"], code_switch_pack=packs["zh"], limits={"repetition_rate": 1})
    with pytest.raises(ValueError, match="has no SAE: pass sae="):
        SAEMonitorCallback(plain_trainer(world, tmp_path), texts=["a"], code_switch_pack=packs["zh"])
    with pytest.raises(ValueError, match="has no processing_class: pass tokenizer="):
        SAEMonitorCallback(plain_trainer(world, tmp_path), sae, texts=["a"], code_switch_pack=packs["zh"])
