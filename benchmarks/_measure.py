"""What the trainer benchmarks (grpo_overhead, real_shape, vllm_overhead) measure the same way: peak tensor memory,
TRL's step times, a random Qwen-Scope-layout SAE, and one arm per child process reporting a JSON line; and the
built demo world a benchmark's --world-dir names (utilities, steer_throughput)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path


def built_world(world_dir: str):
    """The `World` in ``world_dir``; a clear exit where the folder holds no built world."""
    from qscope_rl.world import World

    if not (Path(world_dir) / "stats.json").is_file():
        raise SystemExit(f"error: --world-dir {world_dir} is not a built world (no stats.json there)")
    return World(world_dir)


def peak_tensor_bytes(fn) -> int:
    """Peak of tensor memory allocated while `fn()` runs, relative to its start: torch.profiler's allocation
    events on CPU (exact, unlike process RSS, which moves by tens of MiB between identical runs),
    `torch.cuda.max_memory_allocated` on CUDA."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    level = peak = 0
    for event in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns()):
        level += event.nbytes()
        peak = max(peak, level)
    return peak


def make_random_sae(folder: Path, d_in: int, d_sae: int, layer: int, k: int = 32) -> Path:
    """A random TopK SAE in the Qwen-Scope layout (layer{L}.sae.pt in a folder named ...-L0_<k>)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    W_dec = torch.nn.functional.normalize(torch.randn(d_in, d_sae, generator=gen), dim=0)
    path = folder / f"SAE-Res-random-W{d_sae // 1024}K-L0_{k}"
    path.mkdir(parents=True, exist_ok=True)
    torch.save({"W_enc": W_dec.T.contiguous(), "b_enc": torch.zeros(d_sae), "W_dec": W_dec,
                "b_dec": torch.zeros(d_in)}, path / f"layer{layer}.sae.pt")
    return path


def step_times(trainer, warmup: int = 1) -> list[float]:
    """TRL's per-step `step_time` of a finished run, without the first ``warmup`` steps (all if that is none)."""
    times = [e["step_time"] for e in trainer.state.log_history if "step_time" in e]
    return times[warmup:] if len(times) > warmup else times


def sae_weight_bytes(sae) -> int:
    """Bytes of the SAE's parameters (0 without an SAE)."""
    return sum(p.numel() * p.element_size() for p in sae.parameters()) if sae is not None else 0


def run_child(cmd: list[str], arm: str, env: dict | None = None) -> dict:
    """Run one arm's child process; its last stdout line is a JSON object. A failure shows the child's stderr."""
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"arm {arm} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
