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

Measured limit (2026-12-06, AMD EPYC, torch 2.13.0's MKL 2024.2): MKL honours `MKL_CBWR=AVX2` on Intel CPUs
only. On AMD it refuses the branch and runs its own dispatch (`mkl_branch()` reads "AUTO" back; MKL_VERBOSE
prints `CNR:AUTO`; AVX, AVX2, AVX512 and SSE4_2 all give the same bits there, COMPATIBLE other ones), so a world
built on an AMD CPU is not the world the same seed gives on an Intel one. `mkl_branch()` reads the branch MKL
really runs, and `kernels_in_use()` reports it, so a world's stats say which kind of world it is.
"""

from __future__ import annotations

import ctypes
import functools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import torch

PORTABLE_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
# MKL's CNR branch codes (mkl_service.h, MKL_CBWR_*): what `mkl_cbwr_get(MKL_CBWR_BRANCH)` returns
MKL_BRANCHES = {0: "OFF", 1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1", 8: "SSE4_2",
                9: "AVX", 10: "AVX2", 11: "AVX512_MIC", 12: "AVX512", 13: "AVX512_MIC_E1", 14: "AVX512_E1"}


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
    """Whether this process runs with the pinned settings (ATen reports AVX2 and `MKL_CBWR` asks for AVX2), i.e.
    whether a fresh process would do no better. Whether MKL obeys is `mkl_branch()`'s to say.

    ATen reads its setting at its first dispatched kernel, so an AVX2 report means the variables were set
    before the process computed anything; MKL reads `MKL_CBWR` at its first call, which comes later."""
    aten = torch.backends.cpu.get_cpu_capability().lower()
    mkl = os.environ.get("MKL_CBWR")
    return aten == PORTABLE_KERNELS["ATEN_CPU_CAPABILITY"] and mkl == PORTABLE_KERNELS["MKL_CBWR"]


@functools.cache
def _mkl_cbwr_get():
    """MKL's `mkl_cbwr_get`, from the MKL linked into torch (exported there as `mkl_serv_cbwr_get`); None where
    this torch has no MKL or does not export it."""
    if not torch.backends.mkl.is_available():
        return None
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
        path = os.path.join(os.path.dirname(torch.__file__), "lib", name)
        if not os.path.exists(path):
            continue
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            return None
        for symbol in ("mkl_cbwr_get", "mkl_serv_cbwr_get"):
            fn = getattr(lib, symbol, None)
            if fn is not None:
                fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int]
                return fn
    return None


def mkl_branch() -> str | None:
    """The CNR branch MKL runs in this process ("AVX2", "AUTO", "COMPATIBLE", "OFF", ...), read back from MKL
    itself rather than from `MKL_CBWR`: on a non-Intel CPU MKL refuses every branch but COMPATIBLE and runs "AUTO".
    None where it cannot be read (no MKL in this torch)."""
    get = _mkl_cbwr_get()
    if get is None:
        return None
    code = get(1)  # MKL_CBWR_BRANCH
    return MKL_BRANCHES.get(code, f"code {code}")


def kernels_in_use() -> str:
    """A one-line description for stats and reports, e.g. 'aten AVX2, mkl_cbwr AVX2, torch 2.13.0+cpu'; where MKL
    runs another branch than `MKL_CBWR` asks, both are named ('mkl_cbwr AUTO (AVX2 asked, refused by MKL)')."""
    asked = os.environ.get("MKL_CBWR")
    real = mkl_branch()
    if real is None:
        mkl = f"{asked or 'auto'} (unverified)"
    elif asked and real != asked.split(",")[0].removeprefix("BRANCH=").upper():
        mkl = f"{real} ({asked} asked, refused by MKL)"
    else:
        mkl = real
    return f"aten {torch.backends.cpu.get_cpu_capability()}, mkl_cbwr {mkl}, torch {torch.__version__}"


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
