"""GRPO step time and peak memory with SAE penalties on vs off, on the demo world, measured side by side.

Every arm runs in its own subprocess, interleaved over `--repeats` rounds so that machine noise hits all of them.

Step time (no profiler attached), median of TRL's per-step `step_time` after a warm-up step:
- `off`: SAEGRPOTrainer with no SAE (it is GRPOTrainer) and the baseline rewards;
- `capture`: + the SAE code-switch penalty and sae/* metrics, rollouts encoded from the residual
  captured during generation (no extra forward);
- `early_exit`: the same, rollouts encoded by one no-grad forward that stops after the SAE layer.

Peak memory: the peak of tensor memory allocated from building the trainer to the end of training, from
torch.profiler's allocation events (exact, unlike process RSS, which moves by tens of MiB between identical
runs). Arms `off`, `capture` (the world's 1 MiB SAE), and `capture_wide` / `early_exit_wide`: a random TopK SAE
`--wide-d-sae` wide on the same model (128 MiB at 131072), big enough that a dense (tokens, d_sae) tensor in a
step would show (a step's 1536 rollout tokens would take 768 MiB dense).

    python benchmarks/grpo_overhead.py [--size default] [--steps 6] [--repeats 5] [--wide-d-sae 131072]

The last line is one JSON object with `step_ratio_capture`, `step_ratio_early_exit` (time with SAE / time
without; target <= 1.10 for capture) and `extra_mem_over_sae_weights` (extra peak tensor memory with the wide
SAE, as a ratio to that SAE's weights; target < 1.10), and `extra_mem_over_sae_weights_world_sae` beside it.
On CUDA the same arms train in bf16 on the GPU and memory is `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import make_random_sae, peak_tensor_bytes, run_child, sae_weight_bytes, step_times  # noqa: E402

TIME_ARMS = ("off", "capture", "early_exit")
MEMORY_ARMS = ("off", "capture", "capture_wide", "early_exit_wide")


def run_arm(arm: str, size: str, steps: int, wide_sae: str | None, measure_memory: bool) -> dict:
    """Child process: build the trainer for one arm, train, report step times or peak tensor memory."""
    import copy

    import torch
    from datasets import Dataset

    from qscope_rl import load_sae
    from qscope_rl.rewards import LanguageConsistencyReward, SAECodeSwitchPenalty, SAEFeatureReward
    from qscope_rl.trainers import SAEGRPOConfig, SAEGRPOTrainer
    from qscope_rl.world import load_world
    from qscope_rl.world.packs import world_pack_files

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()  # then the trainer puts the policy on the GPU and trains in bf16
    world = load_world(size)
    packs = world_pack_files(world)
    prompts = world.prompts("train", lang="en")[:64]
    dataset = Dataset.from_dict({"prompt": [p.text for p in prompts], "lang": [p.lang for p in prompts]})
    rewards = [LanguageConsistencyReward()]
    sae_fields, sae_source = {}, None
    capture = "generation" if arm.startswith("capture") else "forward"
    if arm.endswith("_wide"):
        sae_source = wide_sae
        rewards.append(SAEFeatureReward({0: 1.0}))  # reads every rollout's activations
        sae_fields = dict(sae_source=sae_source, sae_layer=world.layer, sae_capture=capture)
    elif arm != "off":
        sae_source = str(world.sae_dir)
        rewards.append(SAECodeSwitchPenalty(packs["zh"]))
        sae_fields = dict(sae_source=sae_source, sae_layer=world.layer, code_switch_pack=str(packs["zh"]),
                          repetition_pack=str(packs["repetition"]), sae_capture=capture)
    with tempfile.TemporaryDirectory() as out:
        args = SAEGRPOConfig(output_dir=out, per_device_train_batch_size=16, num_generations=8,
                             max_completion_length=32, max_steps=steps + 1, bf16=cuda, report_to="none",
                             logging_steps=1, save_strategy="no", use_cpu=not cuda, seed=0, disable_tqdm=True,
                             **sae_fields)
        trainers = []

        def build_and_train():
            trainers.append(SAEGRPOTrainer(model=copy.deepcopy(world.model), reward_funcs=rewards, args=args,
                                           train_dataset=dataset, processing_class=world.tokenizer))
            trainers[0].train()

        peak = peak_tensor_bytes(build_and_train) if measure_memory else None
        if not measure_memory:
            build_and_train()
    sae_bytes = sae_weight_bytes(load_sae(sae_source, layer=world.layer)) if sae_source is not None else 0
    return {"arm": arm, "step_time": statistics.median(step_times(trainers[0])), "peak_tensor_bytes": peak,
            "sae_bytes": sae_bytes}


def child(arm: str, args, wide_sae: Path, memory: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", arm, "--size", args.size, "--steps", str(args.steps),
           "--wide-sae", str(wide_sae)] + (["--memory"] if memory else [])
    return run_child(cmd, arm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="default", choices=["test", "default"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)  # 2 rounds proved too few on a noisy machine
    parser.add_argument("--wide-d-sae", type=int, default=131072)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--wide-sae", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_arm(args.child, args.size, args.steps, args.wide_sae, args.memory)))
        return

    from qscope_rl.world import load_world

    world = load_world(args.size)  # build once, outside the measurements
    with tempfile.TemporaryDirectory() as tmp:
        wide = make_random_sae(Path(tmp), world.stats["d_model"], args.wide_d_sae, world.layer)
        times = {arm: [] for arm in TIME_ARMS}
        for r in range(args.repeats):
            for arm in TIME_ARMS:
                times[arm].append(child(arm, args, wide, memory=False)["step_time"])
                print(f"round {r + 1}/{args.repeats} {arm:<16} step {times[arm][-1]:.3f}s", flush=True)
        memory = {}
        for arm in MEMORY_ARMS:  # allocation is deterministic: one profiled run per arm
            memory[arm] = child(arm, args, wide, memory=True)
            print(f"memory {arm:<16} peak tensor memory {memory[arm]['peak_tensor_bytes'] / 2**20:.1f} MiB",
                  flush=True)
    step = {arm: min(times[arm]) for arm in TIME_ARMS}
    print(f"{'arm':<16} {'step s':>8} {'ratio':>6}")
    for arm in TIME_ARMS:
        print(f"{arm:<16} {step[arm]:>8.3f} {step[arm] / step['off']:>6.3f}")
    off = memory["off"]["peak_tensor_bytes"]
    ratios = {}
    print(f"{'arm':<16} {'peak MiB':>9} {'extra MiB':>10} {'SAE MiB':>8} {'extra / SAE':>12}")
    for arm in MEMORY_ARMS[1:]:
        extra, sae = memory[arm]["peak_tensor_bytes"] - off, memory[arm]["sae_bytes"]
        ratios[arm] = extra / sae
        print(f"{arm:<16} {memory[arm]['peak_tensor_bytes'] / 2**20:>9.1f} {extra / 2**20:>10.1f} "
              f"{sae / 2**20:>8.1f} {ratios[arm]:>12.3f}")
    print(json.dumps({
        "step_ratio_capture": round(step["capture"] / step["off"], 3),
        "step_ratio_early_exit": round(step["early_exit"] / step["off"], 3),
        "extra_mem_over_sae_weights": round(max(ratios["capture_wide"], ratios["early_exit_wide"]), 3),
        "extra_mem_over_sae_weights_world_sae": round(ratios["capture"], 3),
        "wide_d_sae": args.wide_d_sae, "size": args.size, "steps": args.steps, "repeats": args.repeats,
    }))


if __name__ == "__main__":
    main()
