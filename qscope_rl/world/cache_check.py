"""Is a cached world whole? Cheap checks of its files before it is trusted, and cleanup of dead builds.

A world cache is shared, baked into containers, copied and interrupted in real life. A file cut off or
corrupted later (stats.json, the model's safetensors, the SAE's torch file) would otherwise fail deep in a
run, or not at all; here it is named, with the command that rebuilds the world. Each check reads only
headers (the safetensors header, the zip directory of the ``.pt``), so a cached load stays fast.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path


class WorldCacheError(ValueError):
    """A cached world file is missing or corrupt; the message names it and the command that rebuilds it."""


def rebuild_command(size: str) -> str:
    return f"qscope-rl world build --size {size} --force"


def check_world(path: Path, size: str) -> dict:
    """The world's stats, after checking stats.json, the model weights and the SAE file; else `WorldCacheError`."""
    fix = f"rebuild it with `{rebuild_command(size)}` (add --cache-dir if you use one)"
    stats_file = path / "stats.json"
    try:
        stats = json.loads(stats_file.read_bytes().decode("utf-8"))
        sae_files = list((path / stats["sae_folder"]).glob("layer*.sae.pt"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise WorldCacheError(f"the cached world's {stats_file} is corrupt ({type(err).__name__}: {err}); "
                              f"{fix}") from err
    weights = path / "model" / "model.safetensors"
    _check_safetensors(weights, fix)
    if not sae_files:
        raise WorldCacheError(f"the cached world {path} has no SAE file in {stats['sae_folder']}; {fix}")
    for file in sae_files:
        try:
            with zipfile.ZipFile(file) as archive:  # torch.save's format: a truncated file has no zip directory
                archive.namelist()
        except (OSError, zipfile.BadZipFile) as err:
            raise WorldCacheError(f"the cached world's SAE file {file} is corrupt ({err}); {fix}") from err
    return stats


def _check_safetensors(file: Path, fix: str) -> None:
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n).decode("utf-8")) if 0 < n < size else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WorldCacheError(f"the cached world's model weights {file} are unreadable ({err}); {fix}") from err
    ends = [t["data_offsets"][1] for k, t in (header or {}).items() if k != "__metadata__" and isinstance(t, dict)]
    if header is None or not ends or 8 + n + max(ends) != size:
        raise WorldCacheError(f"the cached world's model weights {file} are truncated or corrupt; {fix}")


def remove_dead_builds(parent: Path, name: str) -> None:
    """Delete ``.tmp-<name>-<pid>`` folders of builds whose process is gone (SIGKILL, a crash, a reboot)."""
    prefix = f".tmp-{name}-"
    for tmp in parent.glob(f"{prefix}*"):
        pid = tmp.name[len(prefix):]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover (an earlier, interrupted build in this process)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True
