"""The vLLM colocate pieces that need no vLLM: the eager-engine override, when hooks are needed, server-mode
refusals, and how captured activations are laid out on TRL's completion ids (tests/test_vllm_colocate.py runs
the engine itself, in CI's vLLM environment)."""

import pytest
import torch
import trl
from trl.generation import vllm_generation

from qscope_rl.features.vllm_tap import CapturedCompletions
from qscope_rl.trainers import SAEGRPOConfig, SAERLOOConfig
from qscope_rl.trainers.vllm_rollouts import eager_vllm_engine, vllm_hooks_needed

CPU = dict(bf16=False, use_cpu=True, report_to="none")


def test_eager_override_adds_enforce_eager_only_while_open(monkeypatch):
    seen = []
    monkeypatch.setattr(vllm_generation, "LLM", lambda *a, **kw: seen.append(kw), raising=False)
    original = vllm_generation.LLM
    with eager_vllm_engine():
        vllm_generation.LLM(model="m", max_num_seqs=4)
    assert seen == [{"model": "m", "max_num_seqs": 4, "enforce_eager": True}]
    assert vllm_generation.LLM is original
    with pytest.raises(RuntimeError), eager_vllm_engine():
        raise RuntimeError("restored on errors too")
    assert vllm_generation.LLM is original


def test_eager_override_refuses_another_trl(monkeypatch):
    monkeypatch.setattr(vllm_generation, "LLM", lambda *a, **kw: None, raising=False)
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(RuntimeError, match="TRL 1.17.0"), eager_vllm_engine():
        pass


def test_hooks_are_needed_only_for_colocate_capture_or_amplification(tmp_path):
    base = dict(output_dir=str(tmp_path), sae_source="sae", sae_layer=1, num_generations=4, **CPU)
    colocate = dict(use_vllm=True, vllm_mode="colocate")
    assert vllm_hooks_needed(SAEGRPOConfig(**base, **colocate))  # auto capture
    assert not vllm_hooks_needed(SAEGRPOConfig(**base, **colocate, sae_capture="forward"))
    assert vllm_hooks_needed(SAEGRPOConfig(**base, **colocate, sae_capture="forward", amplify_pack="p.json"))
    assert not vllm_hooks_needed(SAEGRPOConfig(**base, **colocate), tools=[print])  # tools: forward capture
    assert not vllm_hooks_needed(SAEGRPOConfig(**base))  # HF generation
    assert not vllm_hooks_needed(SAEGRPOConfig(output_dir=str(tmp_path), **CPU, **colocate))  # no SAE
    assert not vllm_hooks_needed(SAEGRPOConfig(**base, use_vllm=True, vllm_mode="server"))


@pytest.mark.parametrize("config", [SAEGRPOConfig, SAERLOOConfig])
def test_server_mode_refuses_amplification_and_generation_capture(config, tmp_path):
    base = dict(output_dir=str(tmp_path), sae_source="sae", sae_layer=1, num_generations=4, **CPU, use_vllm=True,
                vllm_mode="server")
    with pytest.raises(ValueError, match="amplify_pack.*vllm_mode='server'"):
        config(**base, amplify_pack="p.json")
    with pytest.raises(ValueError, match="sae_capture='generation'.*vllm_mode='server'"):
        config(**base, sae_capture="generation")


def test_captured_completions_land_on_their_rows_and_tokens():
    # Entries as a tap records them: out of order, one row the caller does not own (7), one offset past
    # the width, and a duplicate (a request recomputed after preemption).
    rows = torch.tensor([3, 1, 1, 3, 7, 1, 1])
    offsets = torch.tensor([0, 1, 0, 1, 0, 5, 1])
    values = torch.arange(1.0, 8.0)[:, None].repeat(1, 2)
    indices = torch.arange(7)[:, None].repeat(1, 2)
    pre = torch.arange(7.0)[:, None]
    captured = CapturedCompletions.from_entries(rows, offsets, values, indices, pre, torch.tensor([4]), d_sae=16)
    acts = captured.completion_activations(rows=[1, 3], text_lengths=[2, 1], width=3)
    assert acts.values.shape == (2, 3, 2) and acts.pre.shape == (2, 3, 1) and acts.d_sae == 16
    assert acts.mask.tolist() == [[True, True, False], [True, False, False]]  # row 3's offset 1 is past its text
    assert acts.values[0, 0, 0] == 3.0 and acts.values[0, 1, 0] in (2.0, 7.0) and acts.values[1, 0, 0] == 1.0
    assert acts.values[0, 2].eq(0).all() and acts.values[1, 2].eq(0).all()  # nothing captured there
    assert acts.pre[1, 0, 0] == 0.0 and acts.pre[0, 0, 0] == 2.0


def test_readme_shows_the_vllm_test_command_ci_runs():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    ci = (root / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if line.startswith("VLLM_TEST_COMMAND="))
    command = command.split("=", 1)[1].strip("'\"")
    assert command in (root / "README.md").read_text()
    assert (root / command.split()[-1]).exists()  # the vLLM test module CI names
