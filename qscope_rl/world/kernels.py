"""CPU kernels pinned to one instruction set, so that a world seed gives the same world on every machine.

A float32 matmul rounds differently depending on the kernel the library picks for the CPU at hand: MKL and
ATen run AVX-512 code where the CPU has it and AVX2 code elsewhere. Trained for hundreds of steps, the
rounding grows into a different model: the same recipe built on two machines gave two default worlds with
different regime measurements, and on one machine the test world's weights differ between ATen's AVX2 and
AVX-512 kernels. So world builds and the demo's runs pin the kernels to AVX2, which every x86-64 machine of the
last decade has: ATen's dispatch (`ATEN_CPU_CAPABILITY`), MKL's conditional numerical reproducibility branch
(`MKL_CBWR`) and oneDNN's ISA cap (`ONEDNN_MAX_CPU_ISA`). Thread counts are pinned separately (the world's
`WorldRecipe.threads`, one thread per demo worker), since MKL's reductions depend on them too.

These settings are read once, when a process first runs a kernel: set them later and nothing changes.
`pin_kernels()` pins a process that has computed nothing yet, `run_pinned(fn, ...)` runs a function in a
fresh process started with `portable_env()`, and `kernels_pinned()` says whether this process runs the pinned
kernels. An explicit setting of any of these variables is kept: a user who sets them knows why.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import torch

PORTABLE_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def portable_env(base: dict | None = None) -> dict:
    """`base` (default: this process's environment) with the pinned kernels, explicit settings kept."""
    env = dict(os.environ if base is None else base)
    for key, value in PORTABLE_KERNELS.items():
        env.setdefault(key, value)
    return env


def pin_kernels() -> bool:
    """Pin this process's kernels, if it has run none yet (call it first thing); returns `kernels_pinned()`."""
    os.environ.update(portable_env())
    return kernels_pinned()


def kernels_pinned() -> bool:
    """Whether this process runs the pinned kernels (ATen reports AVX2 and MKL's branch is AVX2).

    ATen reads its setting at its first dispatched kernel, so an AVX2 report means the variables were set
    before the process computed anything; MKL reads `MKL_CBWR` at its first call, which comes later."""
    aten = torch.backends.cpu.get_cpu_capability().lower()
    mkl = os.environ.get("MKL_CBWR")
    return aten == PORTABLE_KERNELS["ATEN_CPU_CAPABILITY"] and mkl == PORTABLE_KERNELS["MKL_CBWR"]


def kernels_in_use() -> str:
    """A one-line description for stats and reports, e.g. 'aten AVX2, mkl_cbwr AVX2, torch 2.13.0+cpu'."""
    return (f"aten {torch.backends.cpu.get_cpu_capability()}, mkl_cbwr {os.environ.get('MKL_CBWR', 'auto')}, "
            f"torch {torch.__version__}")


def run_pinned(fn, *args):
    """`fn(*args)` in a fresh interpreter started with the pinned kernels; its result, or its error raised here.
    `fn` and its arguments must pickle (a module-level function)."""
    saved = dict(os.environ)
    os.environ.update(portable_env())  # a spawned child starts with the parent's environment
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            future = pool.submit(fn, *args)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return future.result()
