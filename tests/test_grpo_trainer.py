"""SAEGRPOTrainer on the test-size demo world: trains, logs sae/*, aligns activations, amplifies, refuses bad input."""

import copy
import inspect
import math
import pickle

import pytest
import torch
import trl
from datasets import Dataset
from torch.testing import assert_close

from qscope_rl import SparseActs, SparseAutoencoder, capture_residual, load_sae
from qscope_rl.features.aux_loss import FeatureAuxLoss, residual_for_loss
from qscope_rl.features.feature_pack import FeaturePackError
from qscope_rl.judges import ngram_repeat_ratio
from qscope_rl.rewards import (
    LanguageConsistencyReward,
    NgramRepetitionPenalty,
    SAECodeSwitchPenalty,
    SAEFeatureReward,
    SAEProbePenalty,
    SAERepetitionPenalty,
    get_reward_func,
)
from qscope_rl.trainers import SAEGRPOConfig, SAEGRPOTrainer


class RecordingReward:
    """Keeps what the trainer hands to reward functions, for the alignment and amplification checks."""

    __name__ = "recording"

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        self.calls.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids,
                               acts=kwargs.get("sae_activations"), amplified=kwargs.get("sae_amplified")))
        return [0.0] * len(completions)


def prompt_dataset(world, n=8, lang="en"):
    prompts = world.prompts("train", lang=lang)[:n]
    return Dataset.from_dict({"prompt": [p.text for p in prompts], "lang": [p.lang for p in prompts],
                              "topic": [p.topic for p in prompts]})


def make_config(tmp_path, **overrides):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                max_completion_length=12, max_steps=2, learning_rate=5e-4, bf16=False, report_to="none",
                logging_steps=1, save_strategy="no", use_cpu=True, seed=0, gradient_checkpointing=False)
    base.update(overrides)
    return SAEGRPOConfig(**base)


def make_trainer(world, tmp_path, reward_funcs, **overrides):
    return SAEGRPOTrainer(model=copy.deepcopy(world.model), reward_funcs=reward_funcs,
                          args=make_config(tmp_path, **overrides), train_dataset=prompt_dataset(world),
                          processing_class=world.tokenizer)


def sae_fields(world, packs, **extra):
    return dict(sae_source=str(world.sae_dir), sae_layer=world.layer, code_switch_pack=str(packs["zh"]),
                repetition_pack=str(packs["repetition"]), **extra)


@pytest.mark.slow
def test_trainer_trains_and_logs_sae_metrics(world, pack_files, tmp_path):
    trainer = make_trainer(world, tmp_path,
                           [LanguageConsistencyReward(), SAECodeSwitchPenalty(pack_files["zh"])],
                           **sae_fields(world, pack_files, aux_loss_weight=0.1, gradient_checkpointing=True))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logs = trainer.state.log_history
    assert any("loss" in entry for entry in logs)
    keys = set().union(*logs)
    for key in ("sae/code_switch_rate", "sae/repetition_rate", "sae/aux_loss", "rewards/sae_code_switch/mean"):
        assert key in keys, key
    assert any(k.startswith("sae/feature_rate/") for k in keys)
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))
    assert not any(n.startswith("sae") for n, _ in trainer.model.named_parameters())  # SAE stays outside


def test_rewards_receive_aligned_activations(world, pack_files, tmp_path):
    recorder = RecordingReward()
    trainer = make_trainer(world, tmp_path, [recorder], max_steps=1, **sae_fields(world, pack_files))
    trainer.train()
    call = recorder.calls[0]
    sae = load_sae(world.sae_dir, layer=world.layer)
    model = world.model
    checked = 0
    for prompt, ids, acts in zip(call["prompts"], call["completion_ids"], call["acts"]):
        prompt_ids = world.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full = torch.tensor([prompt_ids + ids])
        with torch.no_grad(), capture_residual(model, world.layer) as cap:
            model(input_ids=full)
        reference = sae.encode(cap.last[0, len(prompt_ids):])  # (T, d_sae): a separate forward pass
        n = len(ids)
        ours = SparseActs(acts.values[0, :n], acts.indices[0, :n]).to_dense(sae.d_sae)
        mask = acts.mask[0, :n]
        # the batch's width (rows that ended early are padded, and padding never counts); only the last sampled
        # token may lack a residual
        assert acts.values.shape[1] >= n and not acts.mask[0, n:].any() and mask[: n - 1].all()
        if ids[-1] == world.tokenizer.eos_token_id:
            assert not mask[n - 1]  # a closing eos is not text: left out of detection
        assert_close(ours[mask], reference[mask], rtol=1e-3, atol=1e-3)
        checked += int(mask.sum())
    assert checked > 0


def test_amplification_steers_m_rows_per_group_and_they_repeat_more(world, pack_files, tmp_path):
    recorder = RecordingReward()
    trainer = make_trainer(world, tmp_path, [recorder], max_steps=2, num_generations=4,
                           per_device_train_batch_size=16, max_completion_length=32,
                           sae_source=str(world.sae_dir), sae_layer=world.layer,
                           amplify_pack=str(pack_files["loop"]), amplify_alpha=10.0, amplify_top_n=2,
                           amplify_num_rollouts=1)
    trainer.train()
    amplified, normal = [], []
    for call in recorder.calls:
        flags = torch.tensor(call["amplified"])
        assert (flags.view(-1, 4).sum(1) == 1).all()  # exactly m = 1 per group of 4
        for text, flag in zip(call["completions"], flags.tolist()):
            (amplified if flag else normal).append(ngram_repeat_ratio(text, n=2))
    assert len(amplified) * 3 == len(normal)
    # Whether the amplified rollouts repeat more is a property of the world, not of the trainer: on the v1 world
    # they did; the v2 world's LM barely loops even amplified (issue 16: 0.4% of 1,024 at alpha 80 on the default
    # world), so the demo's "amplified" target measures it instead of this test.
    logs = set().union(*trainer.state.log_history)
    assert {"sae/reward_amplified", "sae/reward_normal", "sae/amplified_fraction"} <= logs


def test_aux_loss_has_gradients_and_lowers_target_pre_activations(world, packs):
    model = copy.deepcopy(world.model).train()
    sae = load_sae(world.sae_dir, layer=world.layer)
    pack = packs["zh"]
    aux = FeatureAuxLoss(sae, pack.ids, alphas=None, weight=1.0)  # alpha = 0: push every pre-act below 0
    # Chinese documents among them: there the zh features' pre-activations are positive, so the term has work
    docs = world.documents("train")
    texts = [d.text for d in docs if d.lang == "zh"][:4] + [d.text for d in docs if d.lang == "en"][:4]
    batch = world.tokenizer(texts, return_tensors="pt", padding=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    values = []
    for _ in range(4):
        with residual_for_loss(model, world.layer) as cap:
            model(**batch)
        loss = aux(cap.last, batch["attention_mask"])
        optimizer.zero_grad()
        loss.backward()
        grad = sum(p.grad.abs().sum() for p in model.parameters() if p.grad is not None)
        assert grad > 0
        optimizer.step()
        values.append(loss.item())
    assert values[-1] < values[0]


def test_rewards_pickle_and_resolve_by_name(packs, pack_files):
    rewards = [LanguageConsistencyReward("en"), NgramRepetitionPenalty(), SAECodeSwitchPenalty(pack_files["zh"]),
               SAERepetitionPenalty(packs["repetition"]), SAEFeatureReward({1: 1.0})]
    for reward in rewards:
        clone = pickle.loads(pickle.dumps(reward))
        assert clone.__name__ == reward.__name__
    assert get_reward_func("ngram_repetition", n=2).n == 2
    assert get_reward_func("qscope_rl.rewards:LanguageConsistencyReward", target="zh").target == "zh"
    with pytest.raises(ValueError, match="unknown reward 'nope'; known rewards"):
        get_reward_func("nope")
    with pytest.raises(ValueError, match="needs the `sae_activations` column"):
        SAECodeSwitchPenalty(pack_files["zh"])(completions=["x"])


@pytest.mark.parametrize("make, match", [
    (lambda f: NgramRepetitionPenalty(max_penalty=math.nan), "max_penalty must be a finite number <= 0"),
    (lambda f: SAECodeSwitchPenalty(f["zh"], weight=math.nan), "weight must be a finite number >= 0"),
    (lambda f: SAECodeSwitchPenalty(f["zh"], weight=-1.0), "weight must be a finite number >= 0"),
    (lambda f: SAECodeSwitchPenalty(f["zh"], threshold=math.inf), "threshold must be a finite number"),
    (lambda f: SAERepetitionPenalty(f["repetition"], weight=math.inf), "weight must be a finite number >= 0"),
    (lambda f: SAEFeatureReward({1: math.nan}), "weight of feature 1 must be a finite number"),
    (lambda f: SAEFeatureReward({1.5: 1.0}), "feature ids must be integers"),
])
def test_rewards_refuse_weights_that_would_make_every_reward_nan(pack_files, make, match):
    with pytest.raises(ValueError, match=match):
        make(pack_files)


def test_sae_rewards_refuse_non_finite_activations(packs):
    """TRL sums rewards with nansum: a NaN penalty would vanish from the reward without a word."""
    from qscope_rl.features.detection import CompletionActivations

    pack = packs["zh"]
    ids = torch.tensor([[[int(pack.ids[0]), int(pack.ids[1])]] * 2])  # (1, 2 tokens, k=2)
    values = torch.tensor([[[1.0, float("nan")], [0.5, 0.0]]])
    acts = CompletionActivations(values, ids, torch.ones(1, 2, dtype=torch.bool), d_sae=pack.d_sae)
    for reward in (SAECodeSwitchPenalty(pack), SAERepetitionPenalty(pack), SAEFeatureReward({int(pack.ids[0]): 1.0})):
        with pytest.raises(ValueError, match="completion 0 hold NaN or infinite values"):
            reward(completions=["x"], sae_activations=[acts])
    acts.values[0, 0, 1] = 2.0
    assert SAECodeSwitchPenalty(pack)(completions=["x"], sae_activations=[acts])[0] < 0


@pytest.mark.parametrize("field", ["aux_loss_weight", "amplify_alpha", "sae_detect_threshold"])
def test_config_refuses_non_finite_numbers(world, pack_files, tmp_path, field):
    with pytest.raises(ValueError, match=f"{field} must be finite"):
        make_config(tmp_path, sae_source=str(world.sae_dir), code_switch_pack=str(pack_files["zh"]),
                    amplify_pack=str(pack_files["repetition"]), **{field: math.nan})


def test_probe_penalty_trains_and_is_checked_against_the_sae(world, pack_files, tmp_path):
    from qscope_rl.features.classifier import ClassifierError
    from qscope_rl.features.probe import fit_completion_probe

    sae = load_sae(world.sae_dir, layer=world.layer)
    docs = world.documents("train")
    probe = fit_completion_probe(world.model, world.tokenizer, sae, [d.text for d in docs if d.loop_char][:40],
                                 [d.text for d in docs if not d.loop_char][:40], last=8)
    path = probe.save(tmp_path / "loop.safetensors")
    penalty = get_reward_func("sae_probe", probe=str(path), weight=2.0)
    assert pickle.loads(pickle.dumps(penalty)).__name__ == "sae_probe"
    trainer = make_trainer(world, tmp_path, [NgramRepetitionPenalty(), penalty], max_steps=1,
                           **sae_fields(world, pack_files, repetition_probe=str(path)))
    trainer.train()
    logged = [e["rewards/sae_probe/mean"] for e in trainer.state.log_history if "rewards/sae_probe/mean" in e]
    assert logged and all(-2.0 <= v <= 0.0 for v in logged)
    # the same probe as a metric: the share of rollouts it calls looping
    rates = [e["sae/repetition_probe_rate"] for e in trainer.state.log_history if "sae/repetition_probe_rate" in e]
    assert rates and all(0.0 <= r <= 1.0 for r in rates)
    with pytest.raises(ValueError, match="repetition_probe / aux_loss_weight / amplify_pack need sae_source"):
        make_config(tmp_path, repetition_probe=str(path))
    probe.sae["fingerprint"] = "0" * 16  # as if fitted on another SAE
    with pytest.raises(ClassifierError, match="fitted on another SAE"):
        make_trainer(world, tmp_path, [SAEProbePenalty(probe)], **sae_fields(world, pack_files))


def test_without_sae_it_is_grpo(world, tmp_path):
    reward = LanguageConsistencyReward()
    ours = make_trainer(world, tmp_path / "ours", [reward], max_steps=1)
    ours.train()
    base_args = trl.GRPOConfig(output_dir=str(tmp_path / "base"), per_device_train_batch_size=4, num_generations=4,
                               max_completion_length=12, max_steps=1, learning_rate=5e-4, bf16=False,
                               report_to="none", logging_steps=1, save_strategy="no", use_cpu=True, seed=0,
                               gradient_checkpointing=False)
    base = trl.GRPOTrainer(model=copy.deepcopy(world.model), reward_funcs=[reward], args=base_args,
                           train_dataset=prompt_dataset(world), processing_class=world.tokenizer)
    base.train()
    assert set(ours.state.log_history[0]) == set(base.state.log_history[0])
    assert ours.sae is None


def test_bad_input_is_refused_at_construction(world, packs, pack_files, tmp_path):
    with pytest.raises(ValueError, match="layer 99 does not exist"):
        make_trainer(world, tmp_path, [NgramRepetitionPenalty()], sae_source=str(world.sae_dir), sae_layer=99)
    wrong = tmp_path / "SAE-Res-Wrong-W64-L0_4"
    wrong.mkdir()
    d = world.model.config.hidden_size + 8
    torch.save({"W_enc": torch.randn(64, d), "b_enc": torch.zeros(64), "W_dec": torch.randn(d, 64),
                "b_dec": torch.zeros(d)}, wrong / f"layer{world.layer}.sae.pt")
    with pytest.raises(ValueError, match="d_in=.*hidden size"):
        make_trainer(world, tmp_path, [NgramRepetitionPenalty()], sae_source=str(wrong), sae_layer=world.layer)
    other = packs["zh"].top(2)
    other.d_sae = other.d_sae * 2
    other_path = other.save(tmp_path / "other.json")
    with pytest.raises(FeaturePackError, match="from another SAE"):
        make_trainer(world, tmp_path, [NgramRepetitionPenalty()], sae_source=str(world.sae_dir),
                     sae_layer=world.layer, code_switch_pack=str(other_path))
    with pytest.raises(ValueError, match="num_generations >= 2"):
        make_config(tmp_path, sae_source=str(world.sae_dir), amplify_pack=str(pack_files["repetition"]),
                    num_generations=1, per_device_train_batch_size=1)
    with pytest.raises(ValueError, match="need sae_source"):
        make_config(tmp_path, code_switch_pack=str(pack_files["zh"]))


def test_trl_private_methods_we_override_are_there():
    """We override private GRPOTrainer methods: fail loudly if TRL changes them under us."""
    assert trl.__version__.startswith("1.16."), f"qscope-rl is tested with TRL 1.16, found {trl.__version__}"
    expected = {
        "_generate_single_turn": ["self", "prompt_ids", "images", "multimodal_fields", "num_generations",
                                  "has_tool_images"],
        "_generate": ["self", "prompts"],
        "_calculate_rewards": ["self", "inputs", "prompts", "completions", "completion_ids_list"],
        "_compute_loss": ["self", "model", "inputs"],
        "_save_checkpoint": ["self", "model", "trial"],
    }
    for name, params in expected.items():
        assert list(inspect.signature(getattr(trl.GRPOTrainer, name)).parameters) == params, name
    assert trl.GRPOTrainer.loss_is_scaled_for_ga is True


def test_sae_is_frozen_outside_the_model(world):
    sae = load_sae(world.sae_dir, layer=world.layer)
    assert isinstance(sae, SparseAutoencoder) and not any(p.requires_grad for p in sae.parameters())


@pytest.mark.parametrize("model_dtype, sae_dtype", [(torch.bfloat16, None), (torch.float32, "bfloat16")])
def test_mixed_dtypes_train_with_the_sae_in_its_own_dtype(world, pack_files, tmp_path, model_dtype, sae_dtype):
    model = copy.deepcopy(world.model).to(model_dtype)
    args = make_config(tmp_path, max_steps=1, **sae_fields(world, pack_files, aux_loss_weight=0.1, sae_dtype=sae_dtype))
    trainer = SAEGRPOTrainer(model=model, reward_funcs=[SAECodeSwitchPenalty(pack_files["zh"])], args=args,
                             train_dataset=prompt_dataset(world), processing_class=world.tokenizer)
    stored = load_sae(world.sae_dir, layer=world.layer).W_enc.dtype
    assert trainer.sae.W_enc.dtype == (torch.bfloat16 if sae_dtype else stored)
    trainer.train()
    logs = trainer.state.log_history
    losses = [e["loss"] for e in logs if "loss" in e]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses)
    aux = [e["sae/aux_loss"] for e in logs if "sae/aux_loss" in e]
    assert aux and all(v == v for v in aux)  # not NaN
    assert next(trainer.model.parameters()).dtype == model_dtype
