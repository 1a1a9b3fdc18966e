"""Amplified rollouts are samples of the steered policy: their tokens' advantages carry min(pi / mu, cap),
checked against log-probabilities computed here with plain forwards, steered and unsteered."""

import copy

import pytest
import torch
from datasets import Dataset
from trl import GRPOTrainer, RLOOTrainer

from qscope_rl import add_to_residual
from qscope_rl.trainers import SAEGRPOConfig, SAEGRPOTrainer, SAERLOOConfig, SAERLOOTrainer
from qscope_rl.trainers.sampled_logprobs import SampledLogprobs

COMMON = dict(per_device_train_batch_size=4, num_generations=2, max_completion_length=8, max_steps=1,
              learning_rate=5e-4, bf16=False, report_to="none", logging_steps=1, save_strategy="no", use_cpu=True,
              seed=0, gradient_checkpointing=False, temperature=0.9)


def length_reward(completions, **kwargs):  # distinct rewards: non-zero advantages
    return [float(len(c)) for c in completions]


def make(kind, world, pack_files, tmp_path, **fields):
    config, trainer = {"grpo": (SAEGRPOConfig, SAEGRPOTrainer), "rloo": (SAERLOOConfig, SAERLOOTrainer)}[kind]
    args = config(output_dir=str(tmp_path / kind), sae_source=str(world.sae_dir), sae_layer=world.layer,
                  amplify_pack=str(pack_files["loop"]), amplify_alpha=20.0, amplify_top_n=2, **{**COMMON, **fields})
    data = Dataset.from_dict({"prompt": [p.text for p in world.prompts("train", lang="en")[:4]]})
    return trainer(model=copy.deepcopy(world.model), reward_funcs=[length_reward], args=args, train_dataset=data,
                   processing_class=world.tokenizer)


def generate_and_score(trainer, parent, world, monkeypatch):
    """The trainer's output on 2 prompts x 2 generations (as TRL repeats them), and the parent's advantages
    before the correction."""
    seen = {}
    original = parent._generate_and_score_completions

    def recording(self, inputs):
        out = original(self, inputs)
        seen["advantages"] = out["advantages"].clone()
        return out

    monkeypatch.setattr(parent, "_generate_and_score_completions", recording)
    trainer.model.train()
    batch = [{"prompt": p.text} for p in world.prompts("train", lang="en")[:2] for _ in range(2)]
    return trainer._generate_and_score_completions(batch), seen["advantages"]


def trained_advantages(trainer, parent, out, monkeypatch):
    """The advantages TRL's loss reads for the batch ``out`` (weighed there when pi comes from the training
    forward), and the loss against the same loss with those advantages given up front and no amplified keys."""
    seen, original = {}, parent._compute_loss

    def spying(self, model, inputs):
        loss = original(self, model, inputs)
        seen.setdefault("advantages", inputs["advantages"].clone())
        return loss

    monkeypatch.setattr(parent, "_compute_loss", spying)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train, read by TRL's loss
    batch = {k: v.clone() if torch.is_tensor(v) else v for k, v in out.items()}
    loss = trainer._compute_loss(trainer.model, batch)
    assert torch.equal(batch["advantages"], out["advantages"])  # the batch's own advantages are put back
    plain = {k: v for k, v in out.items() if k not in ("amplified", "amplified_mu")}
    plain["advantages"] = seen["advantages"]
    torch.testing.assert_close(loss, original(trainer, trainer.model, plain), rtol=1e-5, atol=1e-6)
    return seen["advantages"]


@torch.no_grad()
def reference_logps(model, out, rows, temperature, vector=None, layer=None):
    ids = torch.cat([out["prompt_ids"][rows], out["completion_ids"][rows]], 1)
    mask = torch.cat([out["prompt_mask"][rows], out["completion_mask"][rows]], 1)
    width = out["completion_ids"].shape[1]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    if vector is None:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    else:
        with add_to_residual(model, layer, vector):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    logp = torch.log_softmax(logits[:, -width - 1 : -1].float() / temperature, -1)
    return logp.gather(-1, out["completion_ids"][rows].unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_amplified_advantages_carry_the_truncated_importance_weight(kind, world, pack_files, tmp_path, monkeypatch):
    trainer = make(kind, world, pack_files, tmp_path, amplify_importance_cap=2.0)
    out, base = generate_and_score(trainer, {"grpo": GRPOTrainer, "rloo": RLOOTrainer}[kind], world, monkeypatch)
    amplified = trainer._amplified
    assert amplified.tolist() == [True, False, True, False]
    rows = amplified.nonzero().flatten()
    pi = reference_logps(trainer.model, out, rows, COMMON["temperature"])
    mu = reference_logps(trainer.model, out, rows, COMMON["temperature"], trainer._amplify_vector, world.layer)
    mask = out["completion_mask"][rows].float()
    weight = torch.exp(pi - mu).clamp(max=2.0) * mask
    assert (weight[mask.bool()] < 0.999).any()  # the steered policy differs: a weight that is not all ones
    assert torch.equal(out["advantages"], base)  # TRL's: pi comes from the training forward, which weighs them
    assert torch.equal(out["amplified"], amplified)
    got = trained_advantages(trainer, {"grpo": GRPOTrainer, "rloo": RLOOTrainer}[kind], out, monkeypatch)
    if kind == "grpo":
        assert got.shape == out["completion_ids"].shape
        torch.testing.assert_close(got[rows], base[rows, None] * weight, rtol=1e-4, atol=1e-5)
        normal = ~amplified
        torch.testing.assert_close(got[normal], base[normal, None].expand(-1, got.shape[1]))
    else:  # RLOO's loss is per sequence: the mean weight over the rollout's tokens
        assert got.shape == base.shape
        expected = base.clone()
        expected[rows] = base[rows] * weight.sum(1) / mask.sum(1)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert "sae/amplified_importance_weight" in trainer._metrics["train"]


def test_without_a_cap_amplified_rollouts_are_on_policy_samples(world, pack_files, tmp_path, monkeypatch):
    trainer = make("grpo", world, pack_files, tmp_path, amplify_importance_cap=None)
    out, base = generate_and_score(trainer, GRPOTrainer, world, monkeypatch)
    assert trainer._amplified.any()
    torch.testing.assert_close(out["advantages"], base)


def test_a_cap_that_is_not_positive_is_refused(world, pack_files, tmp_path):
    with pytest.raises(ValueError, match="amplify_importance_cap must be > 0"):
        make("grpo", world, pack_files, tmp_path, amplify_importance_cap=0.0)


def test_vllm_sampler_correction_leaves_amplified_rows_to_ours(world, pack_files, tmp_path, monkeypatch):
    """Under vLLM, TRL weighs each rollout by pi / mu_vLLM (`importance_sampling_ratio`; by default per sequence,
    masked above 3). vLLM sampled an amplified rollout from the steered policy, so that ratio is ~e^-(many) and
    would silently drop the rollout from the loss: on amplified rows it must be 1, the steering corrected by ours."""
    trainer = make("grpo", world, pack_files, tmp_path, amplify_importance_cap=2.0)
    out, base = generate_and_score(trainer, GRPOTrainer, world, monkeypatch)
    recorded = {k: v.clone() if torch.is_tensor(v) else v for k, v in out.items()}
    recorded["advantages"] = base.clone()
    engine = torch.full((4, 1), 1e-30)  # TRL's sequence-level ratio: tiny on amplified rows ...
    engine[~trainer._amplified] = 0.97  # ... and near 1 where vLLM sampled the policy itself
    recorded["importance_sampling_ratio"] = engine

    def parent(self, inputs):
        return {k: v.clone() if torch.is_tensor(v) else v for k, v in recorded.items()}

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", parent)
    again = trainer._generate_and_score_completions([])
    ratio = again["importance_sampling_ratio"]
    assert ratio[trainer._amplified].eq(1.0).all() and ratio[~trainer._amplified].eq(0.97).all()
    torch.testing.assert_close(again["advantages"], out["advantages"])  # our correction, unchanged



def counted_forwards(trainer, monkeypatch):
    """The calls to the trainer's log-probability forward from here on (a list that grows)."""
    calls, forward = [], trainer._get_per_token_logps_and_entropies
    monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies",
                        lambda *a, **k: calls.append(1) or forward(*a, **k))
    return calls


def replay(trainer, monkeypatch, out, base, **logps):
    """The trainer's correction run again on its recorded output ``out`` (``base``: the parent's advantages), with
    TRL's per-token log-probabilities added as TRL 1.16 returns them: ``old_per_token_logps`` (the training policy,
    when TRL computes it) and, under vLLM, ``sampling_per_token_logps`` (the engine's, of what it sampled: the
    steered policy on amplified rows). Also returns the calls to the trainer's log-probability forward."""
    recorded = {k: v.clone() if torch.is_tensor(v) else v for k, v in out.items()}
    recorded.update(advantages=base.clone(), **logps)
    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions",
                        lambda self, inputs: {k: v.clone() if torch.is_tensor(v) else v for k, v in recorded.items()})
    calls = counted_forwards(trainer, monkeypatch)
    return trainer._generate_and_score_completions([]), calls


def test_under_vllm_the_weight_comes_from_trl_log_probabilities_without_forwards(world, pack_files, tmp_path,
                                                                                 monkeypatch):
    """Under vLLM TRL already holds pi (``old_per_token_logps``) and the engine's log-probability of each sampled
    token (``sampling_per_token_logps``): mu itself on amplified rows, steered as sampled. The weight is
    min(exp(pi - mu_engine), cap), with no forward of ours; the engine's log-probabilities on amplified rows are
    then set to pi, so TRL's off-policy sequence mask, like its ratio, leaves their steering to our weight."""
    trainer = make("grpo", world, pack_files, tmp_path, amplify_importance_cap=2.0)
    first, base = generate_and_score(trainer, GRPOTrainer, world, monkeypatch)
    width = first["completion_ids"].shape[1]
    old = -torch.rand(4, width) * 3
    sampled = old - torch.randn(4, width)  # engine log-probabilities, both ways off pi
    sampled[0, 0] = float("nan")  # a token vLLM could not score (row 0 is amplified): no mu, weight 0
    out, calls = replay(trainer, monkeypatch, first, base, old_per_token_logps=old.clone(),
                        sampling_per_token_logps=sampled.clone())
    rows = trainer._amplified
    assert calls == []
    weight = torch.exp(old - sampled).clamp(max=2.0) * first["completion_mask"].float()
    weight[0, 0] = 0.0
    assert rows[0] and out["advantages"][0, 0] == 0
    torch.testing.assert_close(out["advantages"][rows], base[rows, None] * weight[rows])
    torch.testing.assert_close(out["advantages"][~rows], base[~rows, None].expand(-1, width))
    torch.testing.assert_close(out["sampling_per_token_logps"][rows], old[rows])
    torch.testing.assert_close(out["sampling_per_token_logps"][~rows], sampled[~rows])


def test_trl_policy_log_probabilities_replace_our_unsteered_forward(world, pack_files, tmp_path, monkeypatch):
    """Without vLLM TRL computes ``old_per_token_logps`` when generation and optimisation steps are misaligned;
    then pi is read from it and only the steered forward (mu) runs."""
    trainer = make("grpo", world, pack_files, tmp_path, amplify_importance_cap=2.0)
    first, base = generate_and_score(trainer, GRPOTrainer, world, monkeypatch)
    pi = reference_logps(trainer.model, first, torch.arange(4), COMMON["temperature"])
    out, calls = replay(trainer, monkeypatch, first, base, old_per_token_logps=pi.clone())
    rows = trainer._amplified
    assert len(calls) == 1
    mu = reference_logps(trainer.model, first, rows.nonzero().flatten(), COMMON["temperature"],
                         trainer._amplify_vector, world.layer)
    weight = torch.exp(pi[rows] - mu).clamp(max=2.0) * first["completion_mask"][rows].float()
    torch.testing.assert_close(out["advantages"][rows], base[rows, None] * weight, rtol=1e-4, atol=1e-5)


# forwards while scoring: TRL's own (RLOO: the policy's, summed into old_logps, and the reference's), + 1 where mu
# cannot come from generation (pi comes from the training forward)
@pytest.mark.parametrize("kind, generation, forwards, mu_forwards", [
    ("grpo", {}, 0, 0),
    ("grpo", {"use_cache": False}, 0, 0),
    ("grpo", {"prefill_chunk_size": 3}, 0, 0),
    ("rloo", {}, 2, 0),
    ("grpo", {"num_beams": 2}, 1, 1),  # beams are scored, not sampled: mu from the steered forward
], ids=["kv_cache", "no_cache", "chunked_prefill", "rloo", "beam_search"])
def test_mu_is_read_from_the_logits_generation_computed(kind, generation, forwards, mu_forwards, world, pack_files,
                                                        tmp_path, monkeypatch):
    """With HF generation, mu (the steered policy's log-probability of each sampled token) comes from the logits
    generation computed, in every layout it feeds positions in: no steered forward, and the same weights as the
    steered forward over the whole rollout gives (checked here with a plain forward)."""
    trainer = make(kind, world, pack_files, tmp_path, amplify_importance_cap=2.0, generation_kwargs=generation)
    recorded, read = [], SampledLogprobs.completion_logprobs
    monkeypatch.setattr(SampledLogprobs, "completion_logprobs",
                        lambda self, ids: recorded.append(read(self, ids)) or recorded[-1])
    calls = counted_forwards(trainer, monkeypatch)
    out, base = generate_and_score(trainer, {"grpo": GRPOTrainer, "rloo": RLOOTrainer}[kind], world, monkeypatch)
    assert len(calls) == forwards
    rows = trainer._amplified.nonzero().flatten()
    mask = out["completion_mask"][rows].bool()
    mu = reference_logps(trainer.model, out, rows, COMMON["temperature"], trainer._amplify_vector, world.layer)
    if mu_forwards:
        assert recorded == []
    else:
        got, why = recorded[0]
        assert why == "" and got.shape == mu.shape
        torch.testing.assert_close(got[mask], mu[mask], rtol=1e-4, atol=1e-4)
    pi = reference_logps(trainer.model, out, rows, COMMON["temperature"])
    weight = torch.exp(pi - mu).clamp(max=2.0) * mask
    got = trained_advantages(trainer, {"grpo": GRPOTrainer, "rloo": RLOOTrainer}[kind], out, monkeypatch)
    if kind == "grpo":
        torch.testing.assert_close(got[rows], base[rows, None] * weight, rtol=1e-4, atol=1e-4)
    else:
        torch.testing.assert_close(got[rows], base[rows] * weight.sum(1) / mask.sum(1), rtol=1e-4, atol=1e-4)


def test_a_generation_record_that_does_not_fit_falls_back_to_the_steered_forward(world, pack_files, tmp_path,
                                                                                 monkeypatch):
    trainer = make("grpo", world, pack_files, tmp_path, amplify_importance_cap=2.0)
    monkeypatch.setattr(SampledLogprobs, "completion_logprobs", lambda self, ids: (None, "an unknown layout"))
    calls = counted_forwards(trainer, monkeypatch)
    out, base = generate_and_score(trainer, GRPOTrainer, world, monkeypatch)
    assert len(calls) == 1  # mu's steered forward
    rows = trainer._amplified.nonzero().flatten()
    pi = reference_logps(trainer.model, out, rows, COMMON["temperature"])
    mu = reference_logps(trainer.model, out, rows, COMMON["temperature"], trainer._amplify_vector, world.layer)
    weight = torch.exp(pi - mu).clamp(max=2.0) * out["completion_mask"][rows]
    got = trained_advantages(trainer, GRPOTrainer, out, monkeypatch)
    torch.testing.assert_close(got[rows], base[rows, None] * weight, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fields", [dict(steps_per_generation=2), dict(num_iterations=2)])
def test_pi_comes_from_our_forward_where_the_training_forward_runs_other_weights(fields, world, pack_files,
                                                                                 tmp_path, monkeypatch):
    """When a generation is trained over several optimiser steps, TRL computes ``old_per_token_logps`` and pi is
    read from it at scoring; nothing waits for the training forward."""
    trainer = make("grpo", world, pack_files, tmp_path, amplify_importance_cap=2.0, **fields)
    out, base = generate_and_score(trainer, GRPOTrainer, world, monkeypatch)
    assert "old_per_token_logps" in out and "amplified_mu" not in out
    rows = trainer._amplified.nonzero().flatten()
    mu = reference_logps(trainer.model, out, rows, COMMON["temperature"], trainer._amplify_vector, world.layer)
    weight = torch.exp(out["old_per_token_logps"][rows] - mu).clamp(max=2.0) * out["completion_mask"][rows]
    torch.testing.assert_close(out["advantages"][rows], base[rows, None] * weight, rtol=1e-4, atol=1e-5)


def test_sampled_logprobs_follow_fed_tokens_and_name_what_does_not_fit():
    """The record, on forwards fed by hand: prefill in two chunks, then two decode steps (KV cache)."""
    torch.manual_seed(0)
    embed, head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = embed, head

        def get_input_embeddings(self):
            return self.embed

        def get_output_embeddings(self):
            return self.head

        def forward(self, ids):
            return self.head(self.embed(ids).cumsum(1))

    model, rows = Tiny(), torch.tensor([1])
    prompt = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    completion = torch.tensor([[9, 0, 3], [2, 5, 7]])
    with torch.no_grad(), SampledLogprobs(model, rows, prompt_width=4, num_rows=2, temperature=0.5) as record:
        steps = [model(prompt[:, :2]), model(prompt[:, 2:])]
        steps += [model(completion[:, t:t + 1]) for t in range(2)]  # the last token is sampled, never fed
    assert not embed._forward_pre_hooks and not head._forward_hooks
    got, why = record.completion_logprobs(completion)
    assert why == ""
    expected = [torch.log_softmax(steps[1 + t][1, -1] / 0.5, -1)[completion[1, t]] for t in range(3)]
    torch.testing.assert_close(got, torch.stack(expected)[None])
    assert record.completion_logprobs(completion[:, :2])[1].startswith("generation recorded 3 sampled tokens")
    with torch.no_grad(), SampledLogprobs(model, rows, prompt_width=4, num_rows=2, temperature=1.0) as beams:
        model(prompt.repeat(2, 1))
    assert beams.completion_logprobs(completion) == (None, "a forward of 4 rows for 2 rollouts (beams)")


def test_normal_baseline_scores_every_rollout_against_the_normal_rollouts_only(world, pack_files, tmp_path,
                                                                               monkeypatch):
    """``amplify_baseline='normal'``: each group's mean and std come from its normal rollouts; amplified and
    normal rollouts alike are scored against them (checked against rewards recomputed here, per group)."""
    trainer = make("grpo", world, pack_files, tmp_path, amplify_importance_cap=None, amplify_baseline="normal",
                   per_device_train_batch_size=6, num_generations=3)
    trainer.model.train()
    batch = [{"prompt": p.text} for p in world.prompts("train", lang="en")[:2] for _ in range(3)]
    out = trainer._generate_and_score_completions(batch)
    assert trainer._amplified.tolist() == [True, False, False] * 2
    texts = world.tokenizer.batch_decode(out["completion_ids"], skip_special_tokens=True)
    rewards = torch.tensor([float(len(t)) for t in texts]).view(2, 3)
    expected = []
    for group in rewards:
        normal = group[1:]
        expected += ((group - normal.mean()) / (normal.std() + 1e-4)).tolist()
    torch.testing.assert_close(out["advantages"], torch.tensor(expected), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fields, message", [
    (dict(amplify_baseline="mean"), "amplify_baseline='mean'"),
    (dict(amplify_baseline="normal", num_generations=2), "needs >= 2 normal rollouts"),
    (dict(amplify_baseline="normal", multi_objective_aggregation="normalize_then_sum", num_generations=3,
          per_device_train_batch_size=6), "sum_then_normalize"),
])
def test_a_normal_baseline_it_cannot_compute_is_refused(world, pack_files, tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        make("grpo", world, pack_files, tmp_path, **fields)


def test_rloo_refuses_the_normal_baseline(world, pack_files, tmp_path):
    with pytest.raises(ValueError, match="leave-one-out"):
        make("rloo", world, pack_files, tmp_path, amplify_baseline="normal", num_generations=3,
             per_device_train_batch_size=6)
