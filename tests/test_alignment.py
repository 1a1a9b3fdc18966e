"""Every rollout path hands reward functions the SAE activations of the right positions, or is refused.

One table (PEFT's TEST_CASES style): each generation setting the SAE RL trainers accept, in both capture modes,
GRPO and RLOO. For each, a recording reward keeps the activations it is handed, and they are compared with an
independent reference: an unpadded forward of each row's prompt + completion alone through the initial policy,
encoded by the same SAE. Amplified rows are compared with that same UNSTEERED reference. The detection mask is
checked against the rule written out here: every completion token except the last sampled one, EOS ids and
tool-result tokens. A setting that cannot use the generation path must be refused by ``sae_capture='generation'``
(naming why) and then run through ``'auto'`` (the forward).
"""

import copy

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from torch.testing import assert_close

from qscope_rl import capture_residual, load_sae
from qscope_rl.trainers import SAEGRPOConfig, SAEGRPOTrainer, SAERLOOConfig, SAERLOOTrainer

COMMON = dict(per_device_train_batch_size=4, num_generations=2, max_completion_length=10, max_steps=1,
              learning_rate=5e-4, bf16=False, report_to="none", logging_steps=1, save_strategy="no", use_cpu=True,
              seed=0, gradient_checkpointing=False)
AMPLIFY = dict(amplify_alpha=10.0, amplify_top_n=2, amplify_num_rollouts=1)  # + amplify_pack (a fixture path)
NO_CACHE = dict(generation_kwargs={"use_cache": False})
BEAMS = dict(generation_kwargs={"num_beams": 2})
TOOLS = dict(max_completion_length=24, generation_kwargs={"max_new_tokens": 5})

# name, trainer, config overrides, setup, why the generation path is refused (None: it runs)
TEST_CASES = [
    ("left_padding_early_eos", "grpo", {}, {}, None),
    ("steps_per_generation_2", "grpo", dict(steps_per_generation=2, max_steps=2), {}, None),
    ("peft_gradient_checkpointing", "grpo", dict(gradient_checkpointing=True), {"peft": True}, None),
    ("generation_kwargs_no_cache", "grpo", NO_CACHE, {}, None),
    ("model_config_no_cache", "grpo", {}, {"model_use_cache": False}, None),
    ("two_eos_ids", "grpo", {}, {"second_eos": True}, None),
    ("chunked_prefill", "grpo", dict(generation_kwargs={"prefill_chunk_size": 4}), {}, None),
    ("beam_search", "grpo", BEAMS, {}, "beam search"),
    ("tools", "grpo", TOOLS, {"tools": True}, "tool calls"),
    ("amplified", "grpo", AMPLIFY, {}, None),
    ("amplified_no_cache", "grpo", {**AMPLIFY, **NO_CACHE}, {}, None),
    ("amplified_chunked_prefill", "grpo", {**AMPLIFY, "generation_kwargs": {"prefill_chunk_size": 3}}, {}, None),
    ("amplified_beam_search", "grpo", {**AMPLIFY, **BEAMS}, {}, "beam search"),
    ("rloo", "rloo", {}, {}, None),
    ("rloo_no_cache", "rloo", NO_CACHE, {}, None),
    ("rloo_amplified", "rloo", AMPLIFY, {}, None),
]
TRAINERS = {"grpo": (SAEGRPOTrainer, SAEGRPOConfig), "rloo": (SAERLOOTrainer, SAERLOOConfig)}


class RecordingReward:
    __name__ = "recording"

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        self.calls.append(dict(acts=kwargs["sae_activations"], amplified=kwargs["sae_amplified"],
                               step=kwargs["trainer_state"].global_step))
        return [0.0] * len(completions)


def lookup() -> str:
    """Look up a fact.

    Returns:
        The fact.
    """
    return "the sea is wide"


def tool_calling_setup(world, monkeypatch):
    """A chat template that renders tool calls, and a response parser that makes rows 0 and 2 of the first turn
    call `lookup` (the world model cannot write tool calls): TRL's real tool loop then regenerates those rows."""
    import trl.trainer.grpo_trainer as grpo_module

    tokenizer = copy.deepcopy(world.tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }}{% for c in m.get('tool_calls', []) %} "
                               "{{ c['function']['name'] }} {{ c['function']['arguments'] | tojson }}{% endfor %}"
                               "{{ eos_token }}{% endfor %}")
    tokenizer.response_template = {"unused": True}  # parse_response is replaced below
    parsed = []

    def parse_response(tokenizer, ids, prefix=None, tools=None):
        parsed.append(ids)
        message = {"role": "assistant", "content": tokenizer.decode(ids, skip_special_tokens=True)}
        if len(parsed) <= 4 and len(parsed) % 2 == 1:
            message["tool_calls"] = [{"type": "function", "function": {"name": "lookup", "arguments": {}}}]
        return message

    monkeypatch.setattr(grpo_module, "parse_response", parse_response)
    return tokenizer


def frequent_token(world):
    """The commonest token of the world's English documents (a second EOS that sampling often hits)."""
    counts = torch.bincount(torch.tensor([t for d in world.documents("train") if d.lang == "en"
                                          for t in world.tokenizer(d.text)["input_ids"]]))
    counts[world.tokenizer.eos_token_id] = 0
    return int(counts.argmax())


def build(world, pack_files, tmp_path, monkeypatch, kind, overrides, setup, capture):
    trainer_class, config_class = TRAINERS[kind]
    fields = dict(sae_source=str(world.sae_dir), sae_layer=world.layer, code_switch_pack=str(pack_files["zh"]),
                  sae_capture=capture)
    if "amplify_alpha" in overrides:
        fields["amplify_pack"] = str(pack_files["loop"])
    args = config_class(output_dir=str(tmp_path / "out"), **{**COMMON, **overrides}, **fields)
    model = copy.deepcopy(world.model)
    if setup.get("model_use_cache") is False:
        model.generation_config.use_cache = False  # a checkpoint saved that way
    if setup.get("second_eos"):  # like Qwen3 instruct's <|im_end|> beside <|endoftext|>: TRL stops on both
        model.generation_config.eos_token_id = [world.tokenizer.eos_token_id, frequent_token(world)]
    # four prompts of four token lengths: the batch is left-padded unevenly, as real batches are
    by_length = {}
    for p in world.prompts("train", lang="en"):
        by_length.setdefault(len(world.tokenizer(p.text)["input_ids"]), p.text)
    prompts = list(by_length.values())[:4]
    extra, tokenizer = {}, world.tokenizer
    if setup.get("peft"):
        extra["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    if setup.get("tools"):
        tokenizer = tool_calling_setup(world, monkeypatch)
        prompts = [[{"role": "user", "content": p}] for p in prompts]
        extra["tools"] = [lookup]
    reward = RecordingReward()
    trainer = trainer_class(model=model, reward_funcs=[reward], args=args, processing_class=tokenizer,
                            train_dataset=Dataset.from_dict({"prompt": prompts}), **extra)
    return trainer, reward


def record_rollouts(trainer):
    """Keep what `_generate` returns (prompt ids, completion ids, tool mask) beside what the rewards get."""
    rollouts, generate = [], trainer._generate

    def recording(prompts):
        output = generate(prompts)
        rollouts.append(dict(prompt_ids=output[0], completion_ids=output[1],
                             tool_mask=output[2] if len(output) == 8 else None))
        return output

    trainer._generate = recording
    return rollouts


def expected_mask(completion_ids, eos_ids, tool_mask):
    rows = []
    for i, ids in enumerate(completion_ids):
        rows.append([t < len(ids) - 1 and ids[t] not in eos_ids and (tool_mask is None or tool_mask[i][t] == 1)
                     for t in range(len(ids))])
    return rows


@torch.no_grad()
def reference_acts(model, sae, layer, prompt_ids, completion_ids):
    """Dense SAE activations of each completion token from an unpadded forward of that row alone."""
    out = []
    for p, c in zip(prompt_ids, completion_ids):
        with capture_residual(model, layer) as cap:
            model(input_ids=torch.tensor([list(p) + list(c)]))
        out.append(sae.encode(cap.last[0, len(p):]))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("capture", ["generation", "forward"])
@pytest.mark.parametrize("name, kind, overrides, setup, refused", TEST_CASES, ids=[c[0] for c in TEST_CASES])
def test_rewards_get_the_residual_of_their_own_tokens(world, pack_files, tmp_path, monkeypatch, capture, name, kind,
                                                      overrides, setup, refused):
    if capture == "generation" and refused:
        with pytest.raises(ValueError, match=f"sae_capture='generation' is impossible here \\({refused}"):
            build(world, pack_files, tmp_path, monkeypatch, kind, overrides, setup, capture)
        capture = "auto"  # what a user is told to use: it takes the forward
    trainer, reward = build(world, pack_files, tmp_path, monkeypatch, kind, overrides, setup, capture)
    rollouts = record_rollouts(trainer)
    trainer.train()
    assert trainer.sae_capture_path == ("forward" if capture == "forward" or refused else "generation")

    assert len(rollouts) == 1 and reward.calls[0]["step"] == 0  # one generation batch, sampled by the initial policy
    rollout, call = rollouts[0], reward.calls[0]
    prompt_ids, completion_ids = rollout["prompt_ids"], rollout["completion_ids"]
    assert len({len(p) for p in prompt_ids}) > 1  # left padding of different lengths
    sae = load_sae(world.sae_dir, layer=world.layer)
    reference = reference_acts(world.model, sae, world.layer, prompt_ids, completion_ids)
    masks = expected_mask(completion_ids, set(trainer.eos_token_ids), rollout["tool_mask"])
    checked = 0
    for acts, ids, ref, want in zip(call["acts"], completion_ids, reference, masks):
        n = len(ids)
        assert acts.mask[0, :n].tolist() == want and not acts.mask[0, n:].any()
        keep = acts.mask[0, :n]
        ours = torch.zeros(n, sae.d_sae).scatter_add_(1, acts.indices[0, :n], acts.values[0, :n].float())
        assert_close(ours[keep], ref[keep], rtol=1e-3, atol=1e-3)
        checked += int(keep.sum())
    assert checked > 0
    amplified = torch.tensor(call["amplified"])
    if "amplify_alpha" in overrides:  # m = 1 steered rollout per group of 2, checked against the unsteered reference
        assert amplified.view(-1, 2).sum(1).tolist() == [1, 1]
    else:
        assert not amplified.any()
    if setup.get("second_eos"):  # some rollouts closed on the second id, which the mask leaves out
        assert len(trainer.eos_token_ids) == 2 and any(ids[-1] == trainer.eos_token_ids[1] for ids in completion_ids)
    if setup.get("tools"):
        assert any(0 in m for m in rollout["tool_mask"])  # the tool loop ran and its results are masked out


TWO_PROCESS_SCRIPT = '''
import json, os, sys
import torch
from datasets import Dataset
from qscope_rl import capture_residual, load_sae
from qscope_rl.trainers import SAEGRPOConfig, SAEGRPOTrainer
from qscope_rl.world.world import World

world_path, zh_pack, loop_pack, out = sys.argv[1:5]
world = World(world_path)
sae = load_sae(world.sae_dir, layer=world.layer)
rank = int(os.environ["RANK"])
report = {}
for capture in ("generation", "forward"):
    calls, rollouts = [], []

    def recording(prompts, completions, sae_activations, sae_amplified, **kwargs):
        calls.append((sae_activations, sae_amplified))
        return [0.0] * len(completions)

    recording.__name__ = "recording"
    args = SAEGRPOConfig(output_dir=os.path.join(out, capture), per_device_train_batch_size=4, num_generations=4,
                         max_completion_length=8, max_steps=1, bf16=False, report_to="none", save_strategy="no",
                         use_cpu=True, seed=0, gradient_checkpointing=False, sae_source=str(world.sae_dir),
                         sae_layer=world.layer, code_switch_pack=zh_pack, amplify_pack=loop_pack, amplify_alpha=10.0,
                         sae_capture=capture)
    prompts = [p.text for p in world.prompts("train", lang="en")[:8]]
    trainer = SAEGRPOTrainer(model=world.model, reward_funcs=[recording], args=args, processing_class=world.tokenizer,
                             train_dataset=Dataset.from_dict({"prompt": prompts}))
    generate = trainer._generate
    trainer._generate = lambda p: rollouts.append(generate(p)) or rollouts[-1]
    trainer.train()
    prompt_ids, completion_ids = rollouts[0][0], rollouts[0][1]
    acts, amplified = calls[0]
    errors, masks_ok, checked = [], True, 0
    with torch.no_grad():
        for a, p, c in zip(acts, prompt_ids, completion_ids):  # an unpadded, unsteered forward of each row alone
            with capture_residual(world.model, world.layer) as cap:
                world.model(input_ids=torch.tensor([p + c]))
            ref = sae.encode(cap.last[0, len(p):])
            keep = a.mask[0, :len(c)]
            masks_ok &= keep.tolist() == [t < len(c) - 1 and c[t] not in trainer.eos_token_ids for t in range(len(c))]
            ours = torch.zeros(len(c), sae.d_sae).scatter_add_(1, a.indices[0, :len(c)], a.values[0, :len(c)].float())
            errors.append(float((ours[keep] - ref[keep]).abs().max()) if keep.any() else 0.0)
            checked += int(keep.sum())
    report[capture] = dict(max_error=max(errors), masks_ok=masks_ok, checked=checked, amplified=list(amplified),
                           path=trainer.sae_capture_path, world_size=trainer.accelerator.num_processes)
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(report, f)
'''


@pytest.mark.slow
def test_two_processes_hand_every_rank_its_own_aligned_rows(world, pack_files, tmp_path):
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "align.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(world.path), str(pack_files["zh"]), str(pack_files["loop"]), str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for capture, r in report.items():
            assert r["world_size"] == 2 and r["path"] == capture
            assert r["masks_ok"] and r["checked"] > 0 and r["max_error"] < 1e-3, (rank, capture, r)
            # the first of every group of 4 is steered, by global row: rank 1 holds rows 4..7
            assert r["amplified"] == [True, False, False, False], (rank, capture)
