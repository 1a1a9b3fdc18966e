"""What a recipe with ``demo_world`` gets from the world: model, SAE, layer, feature packs, prompts, documents.

Only fields the recipe leaves unset are filled, and a pack field given as a bare pack name ("zh", "en",
"repetition", "loop") becomes the path of the world's pack (discovered once and cached beside the world).
Building the world and discovering its packs run under a file lock: with several processes (accelerate,
torchrun) one builds and the others wait and read the cache.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from filelock import FileLock

from .run_args import RunArguments

MONITOR_PROBES = 32  # held-out prompts an `sae_monitor` callback samples when the recipe gives none


def load_demo_world(spec: str, seed: int = 0):
    """A world from a size ("test", "default": built into the cache if missing, world seed `seed`) or a built
    world's folder."""
    from qscope_rl.world import SIZES, World, WorldRecipe, cache_root, load_world, world_dir

    if Path(spec).is_dir():
        if not (Path(spec) / "stats.json").is_file():
            raise ValueError(f"demo_world={spec!r} is a folder but not a built world (no stats.json)")
        return World(spec)
    if spec not in SIZES:
        raise ValueError(f"demo_world={spec!r}: expected a world size {list(SIZES)} or a built world's folder")
    if (world_dir(WorldRecipe.for_size(spec, seed)) / "stats.json").is_file():
        return load_world(spec, seed=seed)  # built: nothing to write, so no lock (the cache may be read-only)
    lock = cache_root() / "world" / f".{spec}-{seed}.lock"
    with _lock(lock, f"the demo world {spec!r} (seed {seed}) is not built yet"):
        return load_world(spec, seed=seed)


def world_pack_paths(world) -> dict[str, Path]:
    from qscope_rl.world.packs import world_pack_files

    cached = world_pack_files(world, discover=False)
    if cached is not None:
        return cached  # all cached: nothing written, no lock (the cache may be read-only)
    with _lock(world.path / ".packs.lock", "the world's feature packs are not discovered yet"):
        return world_pack_files(world)


@contextlib.contextmanager
def _lock(path: Path, why: str):
    """A file lock for work that writes into the cache; a read-only cache is a clear error, not a traceback."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path))
        lock.acquire()
    except OSError as err:
        raise ValueError(f"{why}, and {path.parent} cannot be written ({err.strerror or err}): build it once "
                         f"where the cache is writable (`qscope-rl world build`, or a dry run), or point "
                         f"QSCOPE_RL_CACHE at a writable folder") from err
    try:
        yield
    finally:
        lock.release()


def fill_from_world(world, run: RunArguments, config_values: dict) -> None:
    """Fill unset model / SAE fields from the world and turn bare pack names into the world's pack files."""
    from qscope_rl.world.packs import PACK_NAMES

    run.model_name_or_path = run.model_name_or_path or str(world.model_dir)
    if config_values.get("sae_source") is None:
        config_values["sae_source"] = str(world.sae_dir)
    if config_values.get("sae_layer") is None and config_values.get("sae_id") is None \
            and config_values["sae_source"] == str(world.sae_dir):  # a sae_id names the layer itself
        config_values["sae_layer"] = world.layer
    settings = [config_values, *run.reward_kwargs.values(), *run.callback_kwargs.values()]
    if any(key.endswith("pack") and value in PACK_NAMES for kw in settings for key, value in kw.items()):
        packs = world_pack_paths(world)
        for kw in settings:
            for key, value in kw.items():
                if key.endswith("pack") and value in PACK_NAMES:
                    kw[key] = str(packs[value])
    if "world_topic" in run.reward_funcs:
        run.reward_kwargs.setdefault("world_topic", {}).setdefault("world", str(world.path))
    if "sae_monitor" in run.callbacks:
        monitor = run.callback_kwargs.setdefault("sae_monitor", {})
        if "prompts" not in monitor and "texts" not in monitor:
            monitor["prompts"] = [p.text for p in world.prompts("heldout", lang=run.demo_world_lang)[:MONITOR_PROBES]]


def world_dataset(world, trainer: str, lang: str | None):
    """RL: the world's training prompts (columns prompt, lang, topic); sft: its clean training documents (text)."""
    from datasets import Dataset

    if trainer == "sft":
        docs = [d for d in world.documents("train") if (lang is None or d.lang == lang)
                and d.switch_char is None and d.loop_char is None]
        return Dataset.from_dict({"text": [d.text for d in docs]})
    prompts = world.prompts("train", lang=lang)
    return Dataset.from_dict({"prompt": [p.text for p in prompts], "lang": [p.lang for p in prompts],
                              "topic": [p.topic for p in prompts]})
