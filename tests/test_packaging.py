"""The wheel puts exactly one top-level package into site-packages, and all three parts import from it."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_has_one_top_level_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("qscope_rl-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"qscope_rl"}
    for module in ("qscope_rl/__init__.py", "qscope_rl/trainers/__init__.py", "qscope_rl/rewards/__init__.py",
                   "qscope_rl/world/__init__.py"):
        assert module in names

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    code = ("import qscope_rl, qscope_rl.trainers, qscope_rl.rewards, qscope_rl.world;"
            "print('FILE', qscope_rl.__file__); print('FILE', qscope_rl.trainers.__file__)")
    # Put the installed wheel first and run from elsewhere, so the source tree cannot be imported.
    out = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
                         cwd=tmp_path, check=True, capture_output=True, text=True).stdout.splitlines()
    paths = [line.split(" ", 1)[1] for line in out if line.startswith("FILE ")]  # other libraries may print too
    assert len(paths) == 2 and all(path.startswith(str(target)) for path in paths), out


def test_editable_install_imports_all_three():
    import qscope_rl
    import qscope_rl.rewards
    import qscope_rl.trainers

    assert Path(qscope_rl.trainers.__file__).parent.name == "trainers"
    assert Path(qscope_rl.rewards.__file__).parent.name == "rewards"
    assert Path(qscope_rl.__file__).parent.name == "qscope_rl"


def test_cli_lists_releases():
    out = subprocess.run([sys.executable, "-m", "qscope_rl.cli", "releases"], capture_output=True, text=True,
                         check=True).stdout
    assert "Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50" in out and len(out.strip().splitlines()) == 15


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if line.startswith("TEST_COMMAND="))
    assert command.split("=", 1)[1].strip("'\"") in (ROOT / "README.md").read_text()


def test_version_is_one_number_everywhere():
    """pyproject's version, qscope_rl.__version__ and the README changelog's newest entry agree."""
    import re
    import tomllib

    import qscope_rl

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    changelog = (ROOT / "README.md").read_text().split("## Changelog", 1)[1]
    newest = re.search(r"^- (\d+\.\d+(?:\.\d+)?)", changelog, re.M).group(1)
    assert declared == qscope_rl.__version__ == newest
