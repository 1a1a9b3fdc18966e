"""Which CNR branch MKL really runs on this CPU for each `MKL_CBWR` asked, and what COMPATIBLE would cost the world.

World builds pin `MKL_CBWR=AVX2` (`qscope_rl/world/kernels.py`) so that a world seed is one world. MKL honours that
on Intel CPUs only; this prints, for each branch asked, the branch MKL reads back (`mkl_branch()`) and a hash of
two float32 matmuls, each in a fresh process (MKL reads the variable once). Equal hashes for different asked
branches mean MKL ignored the request. Then the cost of the one branch MKL documents as the same on every vendor,
COMPATIBLE (SSE2): the world LM's training step (the default world's shape, one thread), AVX2 vs COMPATIBLE in
ABBA pairs of fresh processes.

    python benchmarks/mkl_branch.py [--pairs 2] [--steps 10]

Last line JSON: `branches` {asked: [read back, hash]}, `compatible_step_ratio` (COMPATIBLE / AVX2 step time),
the CPU's vendor and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

BRANCHES = ("AVX2", "AVX512", "AVX", "SSE4_2", "COMPATIBLE")

PROBE = """
import hashlib, json, torch
from qscope_rl.world.kernels import mkl_branch
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
a, b = torch.randn(257, 129, generator=g), torch.randn(129, 383, generator=g)
x, w = torch.randn(64, 128, generator=g), torch.randn(3072, 128, generator=g)
out = (a @ b).numpy().tobytes() + torch.nn.functional.linear(x, w).numpy().tobytes()
print(json.dumps([mkl_branch(), hashlib.sha256(out).hexdigest()[:12]]))
"""

STEP = """
import json, time, torch
from qscope_rl.world.model import LMSpec, make_model
torch.set_num_threads(1)
class Vocabulary:  # what make_model reads of the world's tokenizer: its size and special ids
    eos_token_id = pad_token_id = 0
    def __len__(self):
        return LMSpec().vocab_size
s = LMSpec()
model = make_model(s, Vocabulary())  # the world's own LM (tied embeddings), seeded as the build seeds it
opt = torch.optim.AdamW(model.parameters(), lr=s.lr)
ids = torch.randint(0, s.vocab_size, (s.batch_size, s.seq_len))
def step():
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
step()
t0 = time.perf_counter()
for _ in range({steps}):
    step()
print(json.dumps((time.perf_counter() - t0) / {steps}))
"""


def in_fresh_process(code: str, branch: str):
    env = {**os.environ, "MKL_CBWR": branch, "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"error: the probe failed with MKL_CBWR={branch}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "unknown")
    except OSError:
        return "unknown"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2, help="ABBA pairs of training-step timings")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per process")
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.steps < 1:
        parser.error("--pairs and --steps must be >= 1")
    vendor = cpu_vendor()
    print(f"CPU vendor: {vendor}")
    branches = {}
    for asked in BRANCHES:
        branches[asked] = in_fresh_process(PROBE, asked)
        print(f"MKL_CBWR={asked:<10} MKL runs {branches[asked][0]!s:<10} matmul hash {branches[asked][1]}", flush=True)
    step = STEP.replace("{steps}", str(args.steps))
    ratios = []
    for _ in range(args.pairs):
        a1, c1, c2, a2 = (in_fresh_process(step, b) for b in ("AVX2", "COMPATIBLE", "COMPATIBLE", "AVX2"))
        ratios.append((c1 + c2) / (a1 + a2))
        print(f"world LM training step: AVX2 {1000 * (a1 + a2) / 2:.0f} ms, COMPATIBLE {1000 * (c1 + c2) / 2:.0f} ms",
              flush=True)
    result = {"branches": branches, "compatible_step_ratio": round(statistics.median(ratios), 3), "vendor": vendor,
              "load_average": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
