"""GRPO step time and peak memory with SAE penalties on vs off, on the demo world, measured side by side.

Three arms, each run in its own subprocess (so peak memory is its own), interleaved over `--repeats`
rounds so that machine noise hits all of them:

- `off`: SAEGRPOTrainer with no SAE (it is GRPOTrainer) and the baseline rewards;
- `capture`: + the SAE code-switch penalty and sae/* metrics, rollouts encoded from the residual
  captured during generation (no extra forward);
- `early_exit`: the same, rollouts encoded by one no-grad forward that stops after the SAE layer.

Step time is the median of TRL's per-step `step_time` after a warm-up step; peak memory is the growth of
the process's VmHWM from before the trainer is built to the end of training.

    python benchmarks/grpo_overhead.py [--size default] [--steps 6] [--repeats 2]

The last line is one JSON object with `step_ratio_capture`, `step_ratio_early_exit` (time with SAE / time
without; target <= 1.10 for capture) and `extra_mem_over_sae_weights` (extra peak memory with the SAE, as a
ratio to the SAE's own weights; target < 1.10).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

ARMS = ("off", "capture", "early_exit")


def vm_hwm() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory needs Linux")


def run_arm(arm: str, size: str, steps: int) -> dict:
    """Child process: build the trainer for one arm, train, report step times and memory growth."""
    import copy

    import torch
    from datasets import Dataset

    from qscope_rl import load_sae
    from qscope_rl.rewards import LanguageConsistencyReward, SAECodeSwitchPenalty
    from qscope_rl.trainers import SAEGRPOConfig, SAEGRPOTrainer
    from qscope_rl.world import load_world
    from qscope_rl.world.packs import world_pack_files

    torch.manual_seed(0)
    world = load_world(size)
    packs = world_pack_files(world)
    prompts = world.prompts("train", lang="en")[:64]
    dataset = Dataset.from_dict({"prompt": [p.text for p in prompts], "lang": [p.lang for p in prompts]})
    rewards = [LanguageConsistencyReward()]
    sae_fields = {}
    if arm != "off":
        rewards.append(SAECodeSwitchPenalty(packs["zh"]))
        sae_fields = dict(sae_source=str(world.sae_dir), sae_layer=world.layer, code_switch_pack=str(packs["zh"]),
                          repetition_pack=str(packs["repetition"]),
                          sae_capture="generation" if arm == "capture" else "forward")
    with tempfile.TemporaryDirectory() as out:
        args = SAEGRPOConfig(output_dir=out, per_device_train_batch_size=16, num_generations=8,
                             max_completion_length=32, max_steps=steps + 1, bf16=False, report_to="none",
                             logging_steps=1, save_strategy="no", use_cpu=True, seed=0, **sae_fields)
        before = vm_hwm()
        trainer = SAEGRPOTrainer(model=copy.deepcopy(world.model), reward_funcs=rewards, args=args,
                                 train_dataset=dataset, processing_class=world.tokenizer)
        trainer.train()
        growth = vm_hwm() - before
    step_times = [e["step_time"] for e in trainer.state.log_history if "step_time" in e][1:]  # drop warm-up
    sae_bytes = 0
    if arm != "off":
        sae_bytes = sum(p.numel() * p.element_size() for p in load_sae(world.sae_dir, layer=world.layer).parameters())
    return {"arm": arm, "step_time": statistics.median(step_times), "peak_growth_bytes": growth,
            "sae_bytes": sae_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="default", choices=["test", "default"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_arm(args.child, args.size, args.steps)))
        return

    from qscope_rl.world import load_world

    load_world(args.size)  # build once, outside the measurements
    results = {arm: [] for arm in ARMS}
    for r in range(args.repeats):
        for arm in ARMS:
            cmd = [sys.executable, __file__, "--child", arm, "--size", args.size, "--steps", str(args.steps)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[arm].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.repeats} {arm:<10} step {results[arm][-1]['step_time']:.3f}s  "
                  f"peak growth {results[arm][-1]['peak_growth_bytes'] / 2**20:.0f} MiB", flush=True)
    step = {arm: min(x["step_time"] for x in results[arm]) for arm in ARMS}
    growth = {arm: min(x["peak_growth_bytes"] for x in results[arm]) for arm in ARMS}
    sae_bytes = results["capture"][0]["sae_bytes"]
    print(f"{'arm':<11} {'step s':>8} {'ratio':>6} {'peak growth MiB':>16}")
    for arm in ARMS:
        print(f"{arm:<11} {step[arm]:>8.3f} {step[arm] / step['off']:>6.3f} {growth[arm] / 2**20:>16.1f}")
    extra = max(growth["capture"], growth["early_exit"]) - growth["off"]
    print(f"SAE weights: {sae_bytes / 2**20:.1f} MiB; extra peak memory with the SAE: {extra / 2**20:.1f} MiB")
    print(json.dumps({
        "step_ratio_capture": round(step["capture"] / step["off"], 3),
        "step_ratio_early_exit": round(step["early_exit"] / step["off"], 3),
        "extra_mem_over_sae_weights": round(extra / sae_bytes, 3),
        "size": args.size, "steps": args.steps, "repeats": args.repeats,
    }))


if __name__ == "__main__":
    main()
