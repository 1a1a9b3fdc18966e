"""Sparse capture during HF generation gives the rewards and `sae/*` metrics the dense path gives, in every
generation layout the trainers capture (KV cache, no cache, chunked prefill, amplified rows, RLOO), and the
shared code store (HF and vLLM capture) lays codes out where they belong."""

import copy
from collections import defaultdict
from contextlib import contextmanager

import pytest
import torch
from datasets import Dataset
from torch.testing import assert_close

from qscope_rl import SparseAutoencoder, capture_residual
from qscope_rl.features.code_store import SparseCodeStore
from qscope_rl.features.detection import encode_completions
from qscope_rl.features.sparse_capture import SparseCapture
from qscope_rl.rewards import SAECodeSwitchPenalty, SAERepetitionPenalty
from qscope_rl.trainers import SAEGRPOConfig, SAEGRPOTrainer, SAERLOOConfig, SAERLOOTrainer
from qscope_rl.trainers.rollout_capture import GenerationCapture, detection_mask, padded_width

COMMON = dict(per_device_train_batch_size=4, num_generations=2, max_completion_length=10, max_steps=1,
              learning_rate=5e-4, bf16=False, report_to="none", logging_steps=1, save_strategy="no", use_cpu=True,
              seed=0, gradient_checkpointing=False)
AMPLIFY = dict(amplify_alpha=10.0, amplify_top_n=2, amplify_num_rollouts=1)
NO_CACHE = dict(generation_kwargs={"use_cache": False})
LAYOUTS = [  # name, trainer, config overrides
    ("kv_cache", "grpo", {}),
    ("no_cache", "grpo", NO_CACHE),
    ("chunked_prefill", "grpo", dict(generation_kwargs={"prefill_chunk_size": 4})),
    ("amplified", "grpo", AMPLIFY),
    ("amplified_no_cache", "grpo", {**AMPLIFY, **NO_CACHE}),
    ("rloo_amplified", "rloo", AMPLIFY),
]
TRAINERS = {"grpo": (SAEGRPOTrainer, SAEGRPOConfig), "rloo": (SAERLOOTrainer, SAERLOOConfig)}


def dense(values, indices, d_sae):
    return torch.zeros(*values.shape[:-1], d_sae, dtype=values.dtype).scatter_add_(-1, indices, values.float())


def assert_same(got, ref, tol):
    assert torch.equal(got.mask, ref.mask) and got.indices.dtype == torch.long and got.d_sae == ref.d_sae
    assert_close(dense(got.values, got.indices, ref.d_sae), dense(ref.values, ref.indices, ref.d_sae), **tol)
    assert torch.equal(got.tracked_ids, ref.tracked_ids)
    assert_close(got.pre, ref.pre, **tol)


def random_sae(d_in=8, d_sae=64, k=4):
    g = torch.Generator().manual_seed(0)
    return SparseAutoencoder.from_weights({"W_enc": torch.randn(d_sae, d_in, generator=g),
                                           "b_enc": torch.randn(d_sae, generator=g) * 0.1,
                                           "W_dec": torch.randn(d_in, d_sae, generator=g), "b_dec": torch.zeros(d_in)},
                                          architecture="topk", k=k)


def test_sparse_generation_capture_reads_each_layout_as_the_dense_one():
    rows, prompt, completion, d = 3, 5, 6, 8
    sae, tracked = random_sae(d), torch.tensor([1, 7, 30])
    full = torch.randn(rows, prompt + completion - 1, d)
    decode = [full[:, t:t + 1] for t in range(prompt, prompt + completion - 1)]
    layouts = {
        "kv_cache": [full[:, :prompt]] + decode,
        "chunked_prefill": [full[:, :2], full[:, 2:4], full[:, 4:5]] + decode,
        "no_cache": [full[:, :t] for t in range(prompt, prompt + completion)],
    }
    mask = torch.ones(rows, completion, dtype=torch.bool)
    mask[:, -1] = False  # the last sampled token is never fed
    mask[0, 3:] = False  # an early EOS
    for name, chunks in layouts.items():
        reference, sparse = GenerationCapture(prompt), GenerationCapture(
            prompt, SparseCapture(sae, tracked_ids=tracked, prompt_length=prompt, chunk_tokens=4, capacity=3))
        for chunk in chunks:
            reference(chunk)
            sparse(chunk)
        hidden, why = reference.completion_residual(rows, completion)
        acts, sparse_why = sparse.completion_activations(mask)
        assert why == sparse_why == "", name
        assert_same(acts, encode_completions(sae, hidden, mask, tracked_ids=tracked), dict(rtol=1e-5, atol=1e-5))
        # per token: k values (float32) and int16 ids, f pre-activations, a flag; capacity 3 doubled to fit 5
        assert sparse.sparse.store.shape == (3, 6, 4) and sparse.sparse.store.indices.dtype == torch.int16
        assert sparse.sparse.nbytes() == 3 * 6 * (4 * (4 + 2) + 3 * 4 + 1)
    beams = GenerationCapture(prompt, SparseCapture(sae, prompt_length=prompt))
    beams(torch.randn(2 * rows, prompt, d))
    beams(torch.randn(rows, 1, d))  # a later row count is not fed (it would not fit the store)
    assert beams.completion_activations(mask)[1].startswith("generation ran forwards of [3, 6] rows")
    short = GenerationCapture(prompt, SparseCapture(sae, prompt_length=prompt))
    short(full[:, :prompt])
    assert "expected 10" in short.completion_activations(mask)[1]
    with pytest.raises(ValueError, match="must start at the prompt width 5"):
        GenerationCapture(prompt, SparseCapture(sae, prompt_length=2))


def test_code_store_grows_overwrites_and_reads_zero_where_nothing_was_written():
    store = SparseCodeStore(d_sae=40000, width=2, value_dtype=torch.float32, device="cpu", tracked=1, capacity=2)
    assert store.indices.dtype == torch.int32  # 40,000 ids do not fit int16
    slots, offsets = torch.tensor([0, 2, 2, 0]), torch.tensor([0, 5, 1, 0])
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    indices = torch.tensor([[39999, 1], [2, 3], [4, 5], [6, 7]])
    store.write(slots, offsets, values, indices, torch.tensor([[0.5], [1.5], [2.5], [3.5]]))
    assert store.shape[0] >= 3 and store.shape[1] >= 6  # grown past the preallocated capacity
    store.write(torch.tensor([1]), torch.tensor([0]), torch.tensor([[9.0]]), torch.tensor([[11]]),
                torch.tensor([[4.5]]))  # a narrower write is zero-padded
    got_values, got_indices, pre, written = store.grid(torch.tensor([2, 0, -1, 1]), 0, 6)
    assert got_indices.dtype == torch.long and got_values.shape == (4, 6, 2)
    assert got_values[0, 5].tolist() == [3.0, 4.0] and got_values[0, 1].tolist() == [5.0, 6.0]
    assert got_indices[1, 0].tolist() in ([39999, 1], [6, 7]) and pre[0, 5, 0] == 1.5
    assert got_values[3, 0].tolist() == [9.0, 0.0] and got_indices[3, 0].tolist() == [11, 0]
    assert written.tolist() == [[False, True, False, False, False, True], [True] + [False] * 5, [False] * 6,
                                [True] + [False] * 5]
    assert got_values[2].eq(0).all() and not got_values[0, 0].any()
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[0, 5] = True
    masked = store.grid(torch.tensor([2, 0, -1, 1]), 0, 6, mask)
    assert masked[0][0, 5].tolist() == [3.0, 4.0] and not masked[0][0, 1].any() and not masked[2][1].any()
    with pytest.raises(ValueError, match="tracks 1 pre-activations; got None"):
        store.write(slots, offsets, values, indices)


def capture_dense_beside(trainer, dense_captures):
    """Wrap the trainer's rollout hooks with a dense `GenerationCapture` registered first (it reads the unsteered
    residual, as the trainer's own capture does)."""
    original = trainer._rollout_hooks

    @contextmanager
    def both(prompt_ids):
        first = trainer._turns == 0
        capture = GenerationCapture(padded_width(prompt_ids, getattr(trainer, "pad_to_multiple_of", None)))
        with capture_residual(trainer.model_wrapped, trainer.sae_layer, on_forward=capture), original(prompt_ids):
            yield
        if first:
            dense_captures.append(capture)

    trainer._rollout_hooks = both


@pytest.mark.slow
@pytest.mark.parametrize("name, kind, overrides", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_sparse_capture_gives_the_dense_paths_rewards_and_metrics(world, pack_files, tmp_path, name, kind,
                                                                   overrides):
    trainer_class, config_class = TRAINERS[kind]
    fields = dict(sae_source=str(world.sae_dir), sae_layer=world.layer, code_switch_pack=str(pack_files["zh"]),
                  repetition_pack=str(pack_files["loop"]), aux_loss_weight=0.1, sae_capture="generation")
    if "amplify_alpha" in overrides:
        fields["amplify_pack"] = str(pack_files["loop"])
    args = config_class(output_dir=str(tmp_path / "out"), **{**COMMON, **overrides}, **fields)
    rewards = [SAECodeSwitchPenalty(pack_files["zh"]), SAERepetitionPenalty(pack_files["loop"])]
    prompts = [p.text for p in world.prompts("train", lang="en")[:4]]
    trainer = trainer_class(model=copy.deepcopy(world.model), reward_funcs=rewards, args=args,
                            processing_class=world.tokenizer, train_dataset=Dataset.from_dict({"prompt": prompts}))
    assert trainer.generation_capture_store == "sparse"
    captures, batches, generate = [], [], trainer._generate

    def recording(prompts):
        output = generate(prompts)
        batches.append((output[1], trainer._rollout_acts, trainer._amplified.clone()))
        return output

    trainer._generate = recording
    capture_dense_beside(trainer, captures)
    trainer.train()
    assert trainer.sae_capture_path == "generation" and len(batches) == len(captures) == 1
    completion_ids, sparse_acts, amplified = batches[0]
    mask = detection_mask(completion_ids, trainer._eos_token_ids(), None)
    hidden, why = captures[0].completion_residual(len(completion_ids), mask.shape[1])
    assert why == ""
    dense_acts = encode_completions(trainer.sae, hidden, mask, tracked_ids=trainer._tracked_ids,
                                    chunk_tokens=trainer.sae.memory_bounded_chunk())
    # no cache: each position is read from the forward that first computed it, not from the last (longer) one
    tol = dict(rtol=1e-4, atol=1e-4) if "use_cache" in str(overrides) else dict(rtol=1e-5, atol=1e-5)
    assert_same(sparse_acts, dense_acts, tol)

    def rewards_and_metrics(acts):
        columns = [[acts.select([i]) for i in range(len(acts))]]
        per_func = torch.tensor([r(completions=[""] * len(acts), sae_activations=columns[0]) for r in rewards]).T
        trainer._rollout_acts, trainer._amplified = acts, amplified
        trainer._metrics = {"train": defaultdict(list)}
        trainer._log_sae_metrics("train", per_func)
        return per_func, {k: v for k, v in trainer._metrics["train"].items() if k.startswith("sae/")}

    sparse_rewards, sparse_metrics = rewards_and_metrics(sparse_acts)
    dense_rewards, dense_metrics = rewards_and_metrics(dense_acts)
    assert_close(sparse_rewards, dense_rewards, **tol)
    assert sparse_metrics.keys() == dense_metrics.keys() and "sae/code_switch_score" in sparse_metrics
    for key in dense_metrics:
        assert sparse_metrics[key] == pytest.approx(dense_metrics[key], rel=tol["rtol"], abs=tol["atol"]), key
    if "amplify_alpha" in overrides:
        assert "sae/reward_amplified" in sparse_metrics and amplified.any()
