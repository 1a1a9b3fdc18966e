"""The wings import one way (README, Layout): a module never imports from a wing above its own."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Each wing, with the wings it may import from (besides itself). hooks, judges, registry, plots and _moved are
# the ground floor: anyone may import them.
GROUND = {"hooks", "judges", "registry", "plots", "_moved"}
ALLOWED = {
    "sae": set(),
    "features": {"sae"},
    "tools": {"sae", "features"},
    "world": {"sae", "features", "tools"},
    "rewards": {"sae", "features", "tools", "world"},
    "trainers": {"sae", "features", "tools", "rewards"},
    "demo": {"sae", "features", "tools", "world", "rewards", "trainers"},
    "launch": {"sae", "features", "tools", "world", "rewards", "trainers"},
    "cli": {"sae", "features", "tools", "world", "rewards", "trainers", "launch", "demo"},
}


def wing_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "qscope_rl" or len(parts) < 2:
        return None
    if parts[1] == "trainers":
        return "launch" if len(parts) > 2 and parts[2] == "launch" else "trainers"
    return None if parts[1] in GROUND or parts[1] == "__init__" else parts[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    parts = (["qscope_rl"] + parts) if parts[0] in ("trainers", "rewards") else parts
    return ".".join(p for p in parts if p != "__init__")


def imported_modules(path: Path) -> set[str]:
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            target = node.module or "" if node.level == 0 else ".".join(filter(None, [base, node.module]))
            out.add(target)
            out |= {f"{target}.{alias.name}" for alias in node.names}  # `from . import judges`
    return out


FILES = sorted(p for d in ("qscope_rl", "trainers", "rewards") for p in (ROOT / d).rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_one_way(path):
    own = wing_of(module_name(path))
    if own is None:
        return  # the ground floor and the package's own __init__
    upward = sorted(m for m in imported_modules(path)
                    if (w := wing_of(m)) is not None and w != own and w not in ALLOWED[own])
    assert not upward, f"{path.relative_to(ROOT)} ({own}) imports from above its wing: {upward}"


def test_ground_floor_imports_no_wing():
    for name in GROUND - {"_moved"}:
        path = ROOT / "qscope_rl" / f"{name}.py"
        wings = sorted(m for m in imported_modules(path) if wing_of(m) is not None)
        assert not wings, f"{name}.py is on the ground floor but imports {wings}"


def test_no_module_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in FILES if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"modules over 400 lines: {long}"


def test_old_module_paths_still_import():
    import importlib
    import warnings

    from qscope_rl._moved import MOVED_MODULES

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for old, new in MOVED_MODULES.items():
            assert importlib.import_module(old) is importlib.import_module(new), old


def test_old_module_path_warns_with_the_new_one():
    import subprocess
    import sys

    code = ("import warnings; warnings.simplefilter('error'); import qscope_rl\n"
            "try:\n    import qscope_rl.detection\nexcept DeprecationWarning as w:\n    print(w)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "qscope_rl.detection moved to qscope_rl.features.detection" in out
