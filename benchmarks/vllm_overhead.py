"""GRPO steps in TRL's vLLM colocate mode with SAE capture + amplified sampling inside vLLM, vs without the SAE.

Needs vLLM (run it with .venv-vllm/bin/python, see .ci/run). The model is the test-size demo world with
head_dim 32 (vLLM's CPU attention has no head_dim-24 kernel), built into the cache on first use. Every arm runs in
its own subprocess (one vLLM engine per process), interleaved over `--repeats` rounds:

- `off`: SAEGRPOTrainer with no SAE (it is GRPOTrainer): vLLM as TRL builds it (compiled);
- `off_eager`: the same with the engine in eager mode: what the SAE trainers' eager override alone costs;
- `sae`: capture during generation (no extra forward) + amplified sampling (1 of 8 rollouts per group) + the SAE
  code-switch penalty and sae/* metrics, with the world's SAE (eager engine, set by the trainer).

Step time: median of TRL's per-step `step_time` after a warm-up step, then the median over rounds.
Peak memory: peak tensor memory allocated from building the trainer (engine included) to the end of training,
from torch.profiler's allocation events, for `off`, `off_eager` and `sae_wide` (the `sae` arm with a random TopK
SAE `--wide-d-sae` wide, whose weights dwarf noise: a dense (tokens, d_sae) tensor would show).

    .venv-vllm/bin/python benchmarks/vllm_overhead.py [--steps 4] [--repeats 3] [--wide-d-sae 131072]

The last line is one JSON object with `vllm_step_ratio` (sae / off; target <= 1.10 on CPU), `vllm_eager_ratio`
(off_eager / off) and `vllm_extra_mem_over_sae_weights` ((peak sae_wide - peak off) / SAE weights; target
<= 1.10). Eager mode on GPU gives up CUDA graphs for decoding: that cost is not measurable on CPU (see README).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import make_random_sae, peak_tensor_bytes, run_child, sae_weight_bytes, step_times  # noqa: E402

TIME_ARMS = ("off", "off_eager", "sae")
MEMORY_ARMS = ("off", "off_eager", "sae_wide")


def vllm_world(cache_dir=None):
    from dataclasses import replace

    from qscope_rl.world import World, WorldRecipe, build_world

    test = WorldRecipe.for_size("test")
    return World(build_world(recipe=replace(test, lm=replace(test.lm, head_dim=32)), cache_dir=cache_dir))


def random_pack(sae_dir: Path, layer: int, d_in: int, d_sae: int) -> Path:
    from qscope_rl.features.feature_pack import Feature, FeaturePack

    pack = FeaturePack(name="random", method="contrastive", model="benchmark", sae_source=str(sae_dir), layer=layer,
                       d_sae=d_sae, d_in=d_in, features=[Feature(id=i, name=f"f{i}", score=1.0) for i in (0, 1)])
    path = sae_dir / "pack.json"
    pack.save(path)
    return path


def run_arm(arm: str, steps: int, wide_sae: str | None, measure_memory: bool) -> dict:
    """Child process: build the trainer for one arm, train, report step times or peak tensor memory."""
    import copy

    import torch
    from datasets import Dataset

    from qscope_rl import load_sae
    from qscope_rl.rewards import LanguageConsistencyReward, SAECodeSwitchPenalty, SAEFeatureReward
    from qscope_rl.trainers import SAEGRPOConfig, SAEGRPOTrainer, vllm_rollouts
    from qscope_rl.world.packs import world_pack_files

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from vllm_cpu_sync import use_vllm_reload_on_cpu  # the CPU-only weight-sync bridge (test code)

    torch.manual_seed(0)
    world = vllm_world()
    packs = world_pack_files(world)
    prompts = world.prompts("train", lang="en")[:64]
    dataset = Dataset.from_dict({"prompt": [p.text for p in prompts], "lang": [p.lang for p in prompts]})
    rewards = [LanguageConsistencyReward()]
    sae_fields, sae_source = {}, None
    if arm == "sae":
        sae_source = str(world.sae_dir)
        rewards.append(SAECodeSwitchPenalty(packs["zh"]))
        sae_fields = dict(sae_source=sae_source, sae_layer=world.layer, code_switch_pack=str(packs["zh"]),
                          repetition_pack=str(packs["repetition"]), amplify_pack=str(packs["loop"]),
                          amplify_top_n=2, amplify_alpha=10.0)
    elif arm == "sae_wide":
        sae_source = wide_sae
        rewards.append(SAEFeatureReward({0: 1.0}))  # reads every rollout's activations
        sae_fields = dict(sae_source=sae_source, sae_layer=world.layer,
                          amplify_pack=str(Path(wide_sae) / "pack.json"))
    with tempfile.TemporaryDirectory() as out:
        args = SAEGRPOConfig(output_dir=out, per_device_train_batch_size=16, num_generations=8,
                             max_completion_length=32, max_steps=steps + 1, bf16=False, report_to="none",
                             logging_steps=1, save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
                             gradient_checkpointing=False, use_vllm=True, vllm_mode="colocate",
                             vllm_gpu_memory_utilization=0.1, vllm_max_model_length=256, **sae_fields)
        trainers = []

        def build_and_train():
            if arm == "off_eager":
                with vllm_rollouts.eager_vllm_engine():
                    trainer = SAEGRPOTrainer(model=copy.deepcopy(world.model), reward_funcs=rewards, args=args,
                                             train_dataset=dataset, processing_class=world.tokenizer)
            else:
                trainer = SAEGRPOTrainer(model=copy.deepcopy(world.model), reward_funcs=rewards, args=args,
                                         train_dataset=dataset, processing_class=world.tokenizer)
            use_vllm_reload_on_cpu(trainer.vllm_generation)
            trainers.append(trainer)
            trainer.train()

        peak = peak_tensor_bytes(build_and_train) if measure_memory else None
        if not measure_memory:
            build_and_train()
    sae_bytes = sae_weight_bytes(load_sae(sae_source, layer=world.layer)) if sae_source is not None else 0
    eager = trainers[0].vllm_generation.llm.llm_engine.vllm_config.model_config.enforce_eager
    return {"arm": arm, "step_time": statistics.median(step_times(trainers[0])), "peak_tensor_bytes": peak,
            "sae_bytes": sae_bytes, "eager": bool(eager)}


def child(arm: str, args, wide_sae: Path, memory: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", arm, "--steps", str(args.steps), "--wide-sae", str(wide_sae)] + \
        (["--memory"] if memory else [])
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    return run_child(cmd, arm, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--wide-d-sae", type=int, default=131072)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--wide-sae", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_arm(args.child, args.steps, args.wide_sae, args.memory)))
        return

    from qscope_rl.world.packs import world_pack_files

    world = vllm_world()  # build once, outside the measurements
    world_pack_files(world)
    with tempfile.TemporaryDirectory() as tmp:
        wide = make_random_sae(Path(tmp), world.stats["d_model"], args.wide_d_sae, world.layer)
        random_pack(wide, world.layer, world.stats["d_model"], args.wide_d_sae)
        times = {arm: [] for arm in TIME_ARMS}
        for r in range(args.repeats):
            for arm in TIME_ARMS:
                result = child(arm, args, wide, memory=False)
                times[arm].append(result["step_time"])
                print(f"round {r + 1}/{args.repeats} {arm:<10} eager={result['eager']!s:<5} "
                      f"step {times[arm][-1]:.3f}s", flush=True)
        memory = {}
        for arm in MEMORY_ARMS:  # allocation is deterministic: one profiled run per arm
            memory[arm] = child(arm, args, wide, memory=True)
            print(f"memory {arm:<10} peak tensor memory {memory[arm]['peak_tensor_bytes'] / 2**20:.1f} MiB",
                  flush=True)
    step = {arm: statistics.median(times[arm]) for arm in TIME_ARMS}
    print(f"{'arm':<10} {'step s':>8} {'ratio':>6}")
    for arm in TIME_ARMS:
        print(f"{arm:<10} {step[arm]:>8.3f} {step[arm] / step['off']:>6.3f}")
    sae_bytes = memory["sae_wide"]["sae_bytes"]
    extra = memory["sae_wide"]["peak_tensor_bytes"] - memory["off"]["peak_tensor_bytes"]
    extra_eager = memory["sae_wide"]["peak_tensor_bytes"] - memory["off_eager"]["peak_tensor_bytes"]
    print(f"sae_wide: extra peak {extra / 2**20:.1f} MiB over off, {extra_eager / 2**20:.1f} MiB over off_eager; "
          f"SAE weights {sae_bytes / 2**20:.1f} MiB")
    print(json.dumps({
        "vllm_step_ratio": round(step["sae"] / step["off"], 3),
        "vllm_eager_ratio": round(step["off_eager"] / step["off"], 3),
        "vllm_step_ratio_vs_eager": round(step["sae"] / step["off_eager"], 3),
        "vllm_extra_mem_over_sae_weights": round(extra / sae_bytes, 3),
        "vllm_extra_mem_over_sae_weights_vs_eager": round(extra_eager / sae_bytes, 3),
        "wide_d_sae": args.wide_d_sae, "steps": args.steps, "repeats": args.repeats,
    }))


if __name__ == "__main__":
    main()
