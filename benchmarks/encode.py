"""Throughput and peak memory of `encode_sparse` against a bare matmul and a dense encode + scatter.

Same shapes for every path, measured side by side in one run (random SAE, Qwen3-1.7B-sized by default:
d_in 2048, d_sae 32768, k 50, N = 16,384 tokens), the paths interleaved in every repeat. Paths: `matmul` (the
bare ``x @ W_enc.T``, the floor of any encoder), `dense` (`encode`: top-k scattered into (N, d_sae)), `sparse`
(`encode_sparse`, with the blocked CPU top-k of `topk_codes`), `sparse_plain` (the same with torch.topk) and
`sparse_trainer_chunk` (blocked, in the chunk the trainers use, `memory_bounded_chunk()`: 102 tokens at 1.7B).
Peak memory is each path's growth of the process's peak RSS (CPU) or of `torch.cuda.max_memory_allocated`,
measured in a fresh subprocess per path so that one path's allocations cannot hide another's. On CUDA the SAE
is fp32 (`--dtype bfloat16` for bf16) and the timings synchronise.

    python benchmarks/encode.py [--tokens 16384] [--d-in 2048] [--d-sae 32768] [--k 50] [--repeats 3]

The last line is one JSON object with `sparse_vs_matmul` (throughput ratio, higher is better; goal >= 0.95),
`blocked_topk_speedup` (encode_sparse with / without the blocked top-k) and `sparse_mem_vs_dense` (peak-memory
ratio, lower is better; target < 0.1). It also times the top-k alone on one chunk's pre-activations (1,024 tokens),
as a share of that chunk's matmul: torch.topk, `topk_codes` at block widths 32 / 64 / 128, and threshold-then-select
(the k-th largest block maximum is a threshold at least k entries reach; keep the entries above it, top-k those):
`topk_share_of_matmul` is what any faster top-k could still win.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from qscope_rl import SparseAutoencoder
from qscope_rl.sae.autoencoder import DEFAULT_CHUNK_TOKENS, topk_codes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(tokens: int, d_in: int, d_sae: int, k: int, dtype: str = "float32"):
    torch.manual_seed(0)
    sae = SparseAutoencoder(d_in, d_sae, architecture="topk", k=k, device=DEVICE, dtype=getattr(torch, dtype))
    with torch.no_grad():
        sae.W_enc.normal_(std=d_in**-0.5)
        sae.W_dec.copy_(sae.W_enc.T)
    return sae, torch.randn(tokens, d_in, device=DEVICE, dtype=sae.W_enc.dtype)


def run_path(name: str, sae: SparseAutoencoder, x: torch.Tensor):
    if name == "matmul":
        out = F.linear(x, sae.W_enc)  # the bare x @ W_enc.T: the cost floor of any encoder
    elif name == "dense":
        out = sae.encode(x)  # dense pre-activations, top-k, scatter into a dense (N, d_sae) tensor
    elif name == "sparse_trainer_chunk":  # the chunk the trainers encode rollouts in (5% of the SAE's weights)
        sae.topk_block = SparseAutoencoder.topk_block
        out = sae.encode_sparse(x, chunk_tokens=sae.memory_bounded_chunk())
    else:
        sae.topk_block = None if name == "sparse_plain" else SparseAutoencoder.topk_block
        out = sae.encode_sparse(x)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return out


def threshold_select(pre: torch.Tensor, k: int, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by threshold-then-select: every entry of the top k is >= the k-th largest block maximum."""
    rows = pre.shape[0]
    maxima = pre.view(rows, -1, block).amax(-1)
    threshold = maxima.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    row, col = (pre >= threshold).nonzero(as_tuple=True)  # row-major: each row's survivors are contiguous
    counts = torch.bincount(row, minlength=rows)
    slot = torch.arange(len(row), device=pre.device) - (counts.cumsum(0) - counts)[row]
    candidates = pre.new_full((rows, int(counts.max())), float("-inf"))
    where = torch.zeros(candidates.shape, dtype=torch.long, device=pre.device)
    candidates[row, slot], where[row, slot] = pre[row, col], col
    values, picked = candidates.topk(k, dim=-1, sorted=False)
    return values, where.gather(1, picked)


def topk_alone(sae: SparseAutoencoder, x: torch.Tensor, repeats: int) -> dict:
    """Best-of-`repeats` seconds of each top-k on one chunk's pre-activations, and of that chunk's matmul."""
    chunk = x[:DEFAULT_CHUNK_TOKENS]
    pre = sae.pre_acts(chunk)
    reference = pre.topk(sae.k, dim=-1).values.sort(-1).values
    paths = {"matmul_chunk": lambda: F.linear(chunk, sae.W_enc), "torch_topk": lambda: pre.topk(sae.k, dim=-1,
                                                                                                sorted=False)}
    paths.update({f"blocked_{b}": (lambda b=b: topk_codes(pre, sae.k, b)) for b in (32, 64, 128)})
    paths["threshold_select"] = lambda: threshold_select(pre, sae.k)
    for name, run in paths.items():  # all exact: the same values as torch.topk
        if name != "matmul_chunk" and not torch.equal(run()[0].sort(-1).values, reference):
            raise AssertionError(f"{name} is not an exact top-k")
    times = {name: [] for name in paths}
    for _ in range(repeats):
        for name, run in paths.items():
            start = time.perf_counter()
            run()
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def peak_rss_bytes() -> int:
    if DEVICE == "cuda":
        return torch.cuda.max_memory_allocated()
    # VmHWM is this process's own high-water mark; ru_maxrss would inherit the parent's across fork.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory needs Linux")


def measure_memory(args) -> None:
    """Child process: set up, then report the growth of peak RSS caused by one path."""
    sae, x = make_inputs(args.tokens, args.d_in, args.d_sae, args.k, args.dtype)
    run_path(args.path, sae, x[:64])  # warm up kernels and thread pools outside the measurement
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = peak_rss_bytes()
    with torch.no_grad():
        out = run_path(args.path, sae, x)
    print(json.dumps({"peak_growth_bytes": peak_rss_bytes() - before}))
    del out


def memory_of(path: str, args) -> int:
    cmd = [sys.executable, __file__, "--child", path, "--tokens", str(args.tokens), "--d-in", str(args.d_in),
           "--d-sae", str(args.d_sae), "--k", str(args.k), "--dtype", args.dtype]
    result = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_growth_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--d-in", type=int, default=2048)
    parser.add_argument("--d-sae", type=int, default=32768)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the SAE's dtype")
    parser.add_argument("--child", dest="path", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.path:
        return measure_memory(args)

    sae, x = make_inputs(args.tokens, args.d_in, args.d_sae, args.k, args.dtype)
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"shapes: N={args.tokens} tokens, d_in={args.d_in}, d_sae={args.d_sae}, k={args.k}, {args.dtype} SAE; "
          f"{device}; load average {os.getloadavg()[0]:.1f}")
    paths = ("matmul", "dense", "sparse", "sparse_plain", "sparse_trainer_chunk")
    times = {p: [] for p in paths}
    with torch.no_grad():
        for p in paths:
            run_path(p, sae, x[:256])
        for r in range(args.repeats):  # interleave paths so that machine noise hits all of them
            for p in paths:
                start = time.perf_counter()
                out = run_path(p, sae, x)
                times[p].append(time.perf_counter() - start)
                del out
            print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{p} {times[p][-1]:.2f}s" for p in paths),
                  flush=True)
    best = {p: min(t) for p, t in times.items()}
    memory = {p: memory_of(p, args) for p in paths if p in ("matmul", "dense", "sparse")}  # the others: chunking
    print(f"{'path':<13} {'best s':>8} {'ktok/s':>8} {'peak MiB':>9}")
    for p in paths:
        peak = memory.get(p, float("nan")) / 2**20
        print(f"{p:<13} {best[p]:>8.3f} {args.tokens / best[p] / 1e3:>8.2f} {peak:>9.0f}")
    with torch.no_grad():
        alone = topk_alone(sae, x, max(args.repeats, 5))
    print(f"top-k alone on {min(len(x), DEFAULT_CHUNK_TOKENS)} tokens, share of their matmul: " + ", ".join(
        f"{name} {alone[name] / alone['matmul_chunk']:.3f}" for name in alone if name != "matmul_chunk"))
    result = {
        "sparse_vs_matmul": round(best["matmul"] / best["sparse"], 3),
        "sparse_vs_dense": round(best["dense"] / best["sparse"], 3),
        "blocked_topk_speedup": round(best["sparse_plain"] / best["sparse"], 3),
        "sparse_plain_vs_matmul": round(best["matmul"] / best["sparse_plain"], 3),
        "sparse_trainer_chunk_vs_matmul": round(best["matmul"] / best["sparse_trainer_chunk"], 3),
        "sparse_mem_vs_dense": round(memory["sparse"] / max(memory["dense"], 1), 4),
        "topk_share_of_matmul": round(alone["blocked_64"] / alone["matmul_chunk"], 3),
        "topk_alone_vs_matmul": {n: round(t / alone["matmul_chunk"], 3) for n, t in alone.items()
                                 if n != "matmul_chunk"},
        "peak_mib": {p: round(m / 2**20, 1) for p, m in memory.items()},
        "tokens": args.tokens, "d_in": args.d_in, "d_sae": args.d_sae, "k": args.k, "device": DEVICE,
        "dtype": args.dtype, "load_average": round(os.getloadavg()[0], 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
