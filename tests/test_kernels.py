"""The pinned CPU kernels: set before the first kernel they hold, a fresh process gets them, explicit settings win."""

import json
import os
import re
import subprocess
import sys

import pytest

from qscope_rl.world.kernels import PORTABLE_KERNELS, kernels_in_use, mkl_branch, portable_env

AVX2 = "avx2" in open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else False
UNPINNED = {k: v for k, v in os.environ.items() if k not in PORTABLE_KERNELS}


def run(code: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_portable_env_adds_the_pins_and_keeps_explicit_settings():
    env = portable_env({"ATEN_CPU_CAPABILITY": "default", "PATH": "/bin"})
    assert env["ATEN_CPU_CAPABILITY"] == "default"  # the user's own
    assert env["MKL_CBWR"] == "AVX2" and env["ONEDNN_MAX_CPU_ISA"] == "AVX2" and env["PATH"] == "/bin"


@pytest.mark.skipif(not AVX2, reason="the pinned kernels need an x86-64 CPU with AVX2")
def test_a_process_that_computed_first_is_unpinned_and_run_pinned_starts_a_pinned_one():
    code = """
import json, torch
from qscope_rl.world.kernels import kernels_in_use, kernels_pinned, pin_kernels, run_pinned
torch.ones(3).sum()  # a kernel ran: the dispatch is fixed from here on
before = torch.backends.cpu.get_cpu_capability()
print(json.dumps({"before": before, "pin_after_compute": pin_kernels() if before != "AVX2" else None,
                  "child": run_pinned(kernels_in_use)}))
"""
    got = run(code, UNPINNED)
    assert got["child"].startswith("aten AVX2, mkl_cbwr ")
    assert got["child"].split(", ")[1] == kernels_in_use().split(", ")[1]  # MKL's branch: as in this pinned process
    if got["before"] != "AVX2":  # an AVX-512 machine: setting the variables after computing changes nothing
        assert got["pin_after_compute"] is False


@pytest.mark.skipif(not AVX2, reason="the pinned kernels need an x86-64 CPU with AVX2")
def test_pinned_and_unpinned_matmuls_agree_with_their_own_kind():
    """Within a process kind the result is bit-stable; this is what the world's determinism rests on."""
    code = """
import hashlib, json, torch
from qscope_rl.world.kernels import pin_kernels
pinned = pin_kernels()
g = torch.Generator().manual_seed(0)
a, b = torch.randn(300, 517, generator=g), torch.randn(517, 129, generator=g)
print(json.dumps({"pinned": pinned, "hash": hashlib.sha256((a @ b).numpy().tobytes()).hexdigest()}))
"""
    first, second = run(code, UNPINNED), run(code, UNPINNED)
    assert first == second and first["pinned"] is True


def mkl_verbose_branch(mkl_cbwr: str) -> tuple[str, str | None, str]:
    """(the CNR branch MKL_VERBOSE prints for a matmul, mkl_branch(), kernels_in_use()) in a process started with
    MKL_CBWR=mkl_cbwr: MKL's own log is the reference, independent of how mkl_branch() reads it."""
    code = """
import json, torch
from qscope_rl.world.kernels import kernels_in_use, mkl_branch
torch.ones(8, 8) @ torch.ones(8, 8)
print(json.dumps({"branch": mkl_branch(), "kernels": kernels_in_use()}))
"""
    out = subprocess.run([sys.executable, "-c", code], env={**UNPINNED, "MKL_CBWR": mkl_cbwr, "MKL_VERBOSE": "1"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    logged = re.findall(r"CNR:([A-Z0-9_]+)", out.stdout)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return (logged[0] if logged else None), got["branch"], got["kernels"]


@pytest.mark.skipif(mkl_branch() is None, reason="this torch has no readable MKL")
@pytest.mark.parametrize("asked", ["AVX2", "COMPATIBLE"])
def test_mkl_branch_is_the_branch_mkl_really_runs(asked):
    """On an Intel CPU MKL runs the AVX2 branch asked for; on others it refuses it and runs AUTO, which the world's
    stats must say rather than echo MKL_CBWR. COMPATIBLE is honoured everywhere."""
    logged, branch, kernels = mkl_verbose_branch(asked)
    if logged is None:
        pytest.skip("this MKL prints no CNR field in its verbose log")
    assert branch == logged
    if asked == "COMPATIBLE":
        assert branch == "COMPATIBLE" and "mkl_cbwr COMPATIBLE," in kernels
    elif branch == "AVX2":
        assert "mkl_cbwr AVX2," in kernels
    else:
        assert f"mkl_cbwr {branch} (AVX2 asked, refused by MKL)" in kernels


def test_the_test_world_records_its_kernels(world):
    assert world.stats["cpu_kernels"] == kernels_in_use() or not AVX2
    if AVX2:
        assert world.stats["cpu_kernels"].startswith("aten AVX2, mkl_cbwr ")
