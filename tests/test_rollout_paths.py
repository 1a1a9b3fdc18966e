"""The SAE RL trainers off the default settings, one issue each: beams, rollout_func, VLMs, drop-in configs,
feature ids in metrics, the auxiliary term's mask, the monitor's padding side, and how capture layouts are read."""

import copy
import functools
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from tiny_models import tiny_model
from torch.testing import assert_close
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer, SFTConfig

import qscope_rl.trainers
from qscope_rl import add_to_residual, capture_residual, load_sae
from qscope_rl.features.aux_loss import FeatureAuxLoss
from qscope_rl.trainers import SAEGRPOConfig, SAEGRPOTrainer, SAEMonitor, SAERLOOTrainer
from qscope_rl.trainers.rollout_capture import GenerationCapture
from qscope_rl.trainers.sae_mixin import SAETrainerMixin

COMMON = dict(per_device_train_batch_size=4, num_generations=2, max_completion_length=10, max_steps=1,
              learning_rate=5e-4, bf16=False, report_to="none", logging_steps=1, save_strategy="no", use_cpu=True,
              seed=0, gradient_checkpointing=False)


def prompts(world, n=4):
    return Dataset.from_dict({"prompt": [p.text for p in world.prompts("train", lang="en")[:n]]})


def zero_reward(completions, **kwargs):
    return [0.0] * len(completions)


def grpo(world, tmp_path, reward_funcs=(zero_reward,), **fields):
    args = SAEGRPOConfig(output_dir=str(tmp_path / "out"), **{**COMMON, **fields})
    return SAEGRPOTrainer(model=copy.deepcopy(world.model), reward_funcs=list(reward_funcs), args=args,
                          train_dataset=prompts(world), processing_class=world.tokenizer)


def sae_fields(world, pack_files, **extra):
    return dict(sae_source=str(world.sae_dir), sae_layer=world.layer, code_switch_pack=str(pack_files["zh"]), **extra)


def test_residual_edit_refuses_rows_outside_the_batch():
    model = tiny_model("qwen3")
    with add_to_residual(model, 1, torch.ones(model.config.hidden_size), rows=[1, 5]):
        with pytest.raises(IndexError, match=r"rows \[5\] are outside this forward's batch of 2 rows"):
            model(input_ids=torch.tensor([[1, 2, 3], [4, 5, 6]]))
    assert not model.model.layers[1]._forward_hooks  # removed on the error path too


def test_every_beam_of_an_amplified_rollout_is_steered_and_the_capture_is_unsteered(world, pack_files, tmp_path):
    trainer = grpo(world, tmp_path, generation_kwargs={"num_beams": 2},
                   **sae_fields(world, pack_files, amplify_pack=str(pack_files["loop"]), amplify_alpha=10.0))
    assert trainer._capture_mode == "forward"  # 'auto': beams are not captured during generation
    trainer._capture_mode = "generation"  # to read the captured (unsteered) residual beside the steered one
    trainer.generation_capture_store = "dense"  # the residual itself, not its codes
    model = trainer.model.train()
    batch = world.tokenizer([p.text for p in world.prompts("train", lang="en")[:4]], return_tensors="pt",
                            padding=True)
    trainer._amplified, trainer._turns = trainer._amplified_rows(4), 0
    assert trainer._amplified.tolist() == [True, False, True, False]  # the first of every group of 2
    layer = trainer.model.model.layers[world.layer]
    hooks_before = dict(layer._forward_hooks)  # transformers may hold its own output recorders here
    with trainer._rollout_hooks([[0]] * 4), capture_residual(model, world.layer) as steered:
        model.generate(**batch, num_beams=2, do_sample=False, max_new_tokens=2, pad_token_id=0)
    unsteered = trainer._captured.pieces[0]  # the prefill, (4 rows x 2 beams, P, d)
    delta = steered.chunks[0] - unsteered
    expected = torch.zeros(8, dtype=torch.bool)
    expected[[0, 1, 4, 5]] = True  # both beams of rollouts 0 and 2 (generate repeats each row per beam)
    assert_close(delta[expected], trainer._amplify_vector.expand_as(delta[expected]), rtol=1e-4, atol=1e-4)
    assert delta[~expected].abs().max() == 0
    assert dict(layer._forward_hooks) == hooks_before  # ours are gone


def test_amplify_with_a_rollout_func_is_refused(world, pack_files, tmp_path):
    def rollout_func(prompts, trainer):
        ids = [[1, 2, 3]] * len(prompts)
        return {"prompt_ids": ids, "completion_ids": ids, "logprobs": [[0.0] * 3] * len(prompts)}

    args = SAEGRPOConfig(output_dir=str(tmp_path / "out"), **COMMON,
                         **sae_fields(world, pack_files, amplify_pack=str(pack_files["loop"])))
    with pytest.raises(ValueError, match="amplified sampling .* \\(a rollout_func generates the rollouts\\)"):
        SAEGRPOTrainer(model=copy.deepcopy(world.model), reward_funcs=[zero_reward], args=args,
                       train_dataset=prompts(world), processing_class=world.tokenizer, rollout_func=rollout_func)
    args.amplify_pack = None  # without amplification, a rollout_func's rollouts are encoded by the forward
    trainer = SAEGRPOTrainer(model=copy.deepcopy(world.model), reward_funcs=[zero_reward], args=args,
                             train_dataset=prompts(world), processing_class=world.tokenizer, rollout_func=rollout_func)
    assert trainer._capture_mode == "forward"


def test_vlm_policy_with_forward_capture_is_refused():
    def trainer(capture, **attrs):
        fields = dict(args=SimpleNamespace(sae_capture=capture), _amplify_vector=None, _is_vlm=True,
                      model=torch.nn.Linear(1, 1), use_vllm=False, tools=None)
        return SimpleNamespace(**{**fields, **attrs})

    with pytest.raises(ValueError, match="cannot encode a VLM's rollouts.*use sae_capture='generation'"):
        SAETrainerMixin._resolve_capture_mode(trainer("forward"))
    with pytest.raises(ValueError, match="'auto' chose it: vllm_mode='server' generates in another process"):
        SAETrainerMixin._resolve_capture_mode(trainer("auto", use_vllm=True, vllm_mode="server"))
    assert SAETrainerMixin._resolve_capture_mode(trainer("auto")) == "generation"


@pytest.mark.parametrize("ours, parent, plain_config", [(SAEGRPOTrainer, GRPOTrainer, GRPOConfig),
                                                        (SAERLOOTrainer, RLOOTrainer, RLOOConfig)])
def test_drop_in_without_args_and_with_the_parents_plain_config(world, tmp_path, monkeypatch, ours, parent,
                                                                 plain_config):
    monkeypatch.chdir(tmp_path)
    name = parent.__name__.removesuffix("Trainer")
    config_class = getattr(qscope_rl.trainers, f"SAE{name}Config")
    # TRL's defaults ask for bf16 on a GPU (the parent's default fails the same way on a CPU): only that is changed
    monkeypatch.setattr(config_class, "__init__", functools.partialmethod(config_class.__init__, bf16=False,
                                                                          use_cpu=True, report_to="none"))
    trainer = ours(model=copy.deepcopy(world.model), reward_funcs=zero_reward, train_dataset=prompts(world),
                   processing_class=world.tokenizer)
    assert type(trainer.args).__name__ == f"SAE{name}Config" and trainer.sae is None
    assert trainer.args.output_dir.endswith(f"-{name}")  # named after the model, as the parent names it
    # the parent's own config (a peer's test suite, a script written for TRL): it runs as the parent, no SAE
    plain = plain_config(str(tmp_path / "plain"), per_device_train_batch_size=4, num_generations=4,
                         max_completion_length=8, max_steps=1, bf16=False, use_cpu=True, report_to="none",
                         learning_rate=1e-5, seed=3)
    before = plain.to_dict()
    trainer = ours(model=copy.deepcopy(world.model), reward_funcs=zero_reward, args=plain,
                   train_dataset=prompts(world), processing_class=world.tokenizer)
    assert isinstance(trainer.args, config_class) and trainer.sae is None and trainer.args.sae_source is None
    assert plain.to_dict() == before and type(plain) is plain_config  # the caller's object is not touched
    for key, value in before.items():  # every TRL field as the caller set it (and as TRL's set-up derived it)
        assert trainer.args.to_dict()[key] == value or key in {"output_dir", "logging_dir"}, key
    trainer.train()
    assert trainer.state.global_step == 1
    started = []
    monkeypatch.setattr(parent, "__init__", lambda self, *a, **k: started.append(1))
    with pytest.raises(TypeError, match=f"needs an SAE{name}Config .* or a {plain_config.__name__}, got SFTConfig"):
        ours(model=world.model, reward_funcs=zero_reward, args=SFTConfig(str(tmp_path / "sft"), use_cpu=True))
    assert not started  # refused before the parent's whole set-up


def test_feature_ids_are_logged_per_id_never_averaged(world, pack_files, tmp_path):
    kept = []

    def keep(completions, sae_activations, **kwargs):
        kept.extend(sae_activations)
        return [0.0] * len(completions)

    keep.__name__ = "keep"
    trainer = grpo(world, tmp_path, [keep], max_steps=2, logging_steps=2, sae_log_top_features=3,
                   **sae_fields(world, pack_files))
    trainer.train()
    logged = {k for entry in trainer.state.log_history for k in entry if k.startswith("sae/feature")}
    assert logged and not any("/id" in k for e in trainer.state.log_history for k in e)
    pack_ids = set(trainer.code_switch_pack.ids.tolist())
    assert {int(k.rsplit("/", 1)[1]) for k in logged} <= pack_ids  # every logged key names a real pack feature
    top = trainer.sae_top_features()
    assert 0 < len(top) <= 3 and [t["rate"] for t in top] == sorted((t["rate"] for t in top), reverse=True)
    # the last batch's rates and mean activations, recounted from what the reward got
    last = kept[-4:]
    tokens = sum(int(a.mask.sum()) for a in last)
    for feature in top:
        values = [v for a in last for v, i in zip(a.values[a.mask].flatten(), a.indices[a.mask].flatten())
                  if i == feature["id"] and v > 0]
        assert feature["rate"] == pytest.approx(len(values) / tokens)
        assert feature["mean_activation"] == pytest.approx(float(sum(values) / max(len(values), 1)), rel=1e-5)


def test_aux_term_leaves_out_tool_results_and_every_eos_id(world, pack_files, tmp_path):
    trainer = grpo(world, tmp_path, **sae_fields(world, pack_files, aux_loss_weight=1.0, aux_loss_use_alpha=False))
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train() around each step
    second_eos = 7
    trainer.eos_token_ids = [world.tokenizer.eos_token_id, second_eos]  # as TRL reads them from generation_config
    batch = world.tokenizer([d.text for d in world.documents("train")[:2]], return_tensors="pt", padding="longest")
    ids = batch["input_ids"].clone()
    ids[0, 3] = second_eos
    tool_mask = torch.ones_like(ids)
    tool_mask[1, 2:5] = 0
    inputs = {"completion_ids": ids, "completion_mask": batch["attention_mask"], "tool_mask": tool_mask}
    model = trainer.model.train()
    trainer._add_aux_loss(model, inputs, lambda: model(input_ids=ids).logits.sum() * 0.0)
    logged = trainer._metrics["train"]["sae/aux_loss"][-1]
    with torch.no_grad(), capture_residual(model, world.layer) as cap:
        model(input_ids=ids)
    eos = torch.tensor([second_eos, world.tokenizer.eos_token_id])
    mask = batch["attention_mask"].bool() & (tool_mask == 1) & ~torch.isin(ids, eos)
    aux = FeatureAuxLoss(trainer.sae, trainer.code_switch_pack.ids, None, weight=1.0)
    assert logged == pytest.approx(aux(cap.last, mask).item(), rel=1e-5)
    assert logged != pytest.approx(aux(cap.last, batch["attention_mask"]).item(), rel=1e-5)


def test_monitor_left_pads_prompts_whatever_the_tokenizer_says(world):
    sae = load_sae(world.sae_dir, layer=world.layer)
    texts = [p.text for p in world.prompts("train", lang="en")[:4]]
    assert len({len(world.tokenizer(t)["input_ids"]) for t in texts}) > 1  # padding matters
    right = copy.deepcopy(world.tokenizer)
    right.padding_side = "right"
    kwargs = dict(prompts=texts, features=list(range(8)), max_new_tokens=6, seed=3)
    left_acts = SAEMonitor(sae, world.tokenizer, **kwargs)._encode_batch(world.model, texts)
    right_acts = SAEMonitor(sae, right, **kwargs)._encode_batch(world.model, texts)
    assert torch.equal(left_acts.mask, right_acts.mask) and torch.equal(left_acts.indices, right_acts.indices)
    assert right.padding_side == "right"  # restored


def test_generation_capture_reads_each_layout_or_says_why_not():
    rows, prompt, completion, d = 2, 5, 4, 3
    full = torch.randn(rows, prompt + completion - 1, d)  # every position fed to the model
    layouts = {
        "kv_cache": [full[:, :prompt]] + [full[:, t:t + 1] for t in range(prompt, prompt + completion - 1)],
        "chunked_prefill": [full[:, :2], full[:, 2:4], full[:, 4:5]] + [full[:, t:t + 1] for t in range(5, 8)],
        "no_cache": [full[:, :t] for t in range(prompt, prompt + completion)],
    }
    for name, chunks in layouts.items():
        capture = GenerationCapture(prompt)
        for chunk in chunks:
            capture(chunk)
        hidden, why = capture.completion_residual(rows, completion)
        assert why == "", name
        assert torch.equal(hidden[:, :completion - 1], full[:, prompt:]) and not hidden[:, -1].any(), name
    beams = GenerationCapture(prompt)
    beams(torch.randn(2 * rows, prompt, d))
    assert beams.completion_residual(rows, completion)[1].startswith("generation ran forwards of [4] rows")
    short = GenerationCapture(prompt)
    short(full[:, :prompt])
    assert "expected 8" in short.completion_residual(rows, completion)[1]
