"""The world cache as real life has it (issue 19): read-only, interrupted, corrupted."""

import json
import shutil
import subprocess
import sys

import pytest

from qscope_rl.features.feature_pack import FeaturePackError
from qscope_rl.world import build
from qscope_rl.world.cache_check import WorldCacheError
from qscope_rl.world.world import World

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def copy_world(world, tmp_path):
    """A private copy of the test world in a cache of its own, to corrupt."""
    target = tmp_path / "cache" / "world" / world.path.name
    shutil.copytree(world.path, target, ignore=shutil.ignore_patterns("*.lock"))
    return tmp_path / "cache", target


def test_a_complete_cache_serves_the_dry_run_and_utilities_without_writing(world, world_cache, pack_files, tmp_path,
                                                                          monkeypatch, capsys):
    from qscope_rl.cli import main
    from qscope_rl.trainers.launch.dry_run import plan
    from qscope_rl.trainers.launch.recipe import parse_recipe

    cache, _ = copy_world(world, tmp_path)
    monkeypatch.setenv("QSCOPE_RL_CACHE", str(cache))
    before = files_under(cache)
    recipe = parse_recipe(str(ROOT / "recipes" / "grpo_code_switch.yaml"),
                          ["--demo_world", "test", "--output_dir", str(tmp_path / "out")], dry_run=True)
    assert plan(recipe)["missing_files"] == []
    assert main(["steer", "--pack", "zh", "--strength=-medium", "-n", "2", "--max-new-tokens", "2",
                 "--json"]) == 0
    capsys.readouterr()
    assert files_under(cache) == before  # no lock, no pack, nothing written into a complete cache


def test_a_cache_that_cannot_be_written_is_a_clear_error_only_where_a_write_is_needed(tmp_path, monkeypatch):
    from qscope_rl.trainers.launch.recipe import RecipeError, parse_recipe

    (tmp_path / "blocker").write_text("a file where the cache folder should be")
    monkeypatch.setenv("QSCOPE_RL_CACHE", str(tmp_path / "blocker" / "cache"))
    with pytest.raises(RecipeError, match=r"demo world 'test' \(seed 0\) is not built yet, and .* cannot be written"):
        parse_recipe(str(ROOT / "recipes" / "grpo_code_switch.yaml"), ["--demo_world", "test"], dry_run=True)


def test_interrupted_builds_leave_no_temporary_folders(tmp_path, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    recipe = build.WorldRecipe.for_size("test")
    final = build.world_dir(recipe, tmp_path)
    final.parent.mkdir(parents=True)
    stale = final.parent / f".tmp-{final.name}-{dead.pid}"  # a SIGKILLed build's leftovers
    (stale / "corpus").mkdir(parents=True)

    def interrupted(recipe, out):
        (out / "corpus").mkdir(parents=True)
        raise KeyboardInterrupt  # Ctrl-C mid-build

    monkeypatch.setattr(build, "_build_into", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build.build_world("test", cache_dir=tmp_path)
    assert list(final.parent.iterdir()) == []  # neither the dead build's folder nor our own is left


def test_corrupt_cached_files_are_named_with_the_rebuild_command(world, tmp_path):
    def corrupted(name, mutate):
        cache, path = copy_world(world, tmp_path / name)
        mutate(path)
        with pytest.raises(WorldCacheError, match="qscope-rl world build --size test --force"):
            build.load_world("test", cache_dir=cache)

    corrupted("stats", lambda p: (p / "stats.json").write_text('{"size": "te'))
    corrupted("model", lambda p: (p / "model" / "model.safetensors").write_bytes(
        (p / "model" / "model.safetensors").read_bytes()[:5000]))
    sae_file = next(World(world.path).sae_dir.glob("layer*.sae.pt")).relative_to(world.path)
    corrupted("sae", lambda p: (p / sae_file).write_bytes((p / sae_file).read_bytes()[:3000]))


def test_a_corrupt_cached_pack_is_named(world, pack_files, tmp_path):
    from qscope_rl.world.packs import world_pack_files

    _, path = copy_world(world, tmp_path)
    pack = path / "packs" / "zh.json"
    pack.write_text(pack.read_text()[:100])
    with pytest.raises(FeaturePackError, match=r"zh.json is not valid JSON.*delete .*zh.json"):
        world_pack_files(World(path))
    json.loads((path / "packs" / "en.json").read_text())  # the others are left alone
