import os

# Passive OpenMP waiting: on a busy 2-core CI box, spinning torch threads of concurrent processes
# slow each other down by orders of magnitude. Only effective if set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

from qscope_rl.world import load_world  # noqa: E402


@pytest.fixture(scope="session")
def world_cache(tmp_path_factory):
    """One cache root for the whole session, so the test world is built once.

    QSCOPE_RL_TEST_CACHE keeps it across sessions (for development; CI builds from scratch).
    """
    keep = os.environ.get("QSCOPE_RL_TEST_CACHE")
    return keep if keep else tmp_path_factory.mktemp("qscope-cache")


@pytest.fixture(scope="session")
def world(world_cache):
    """The test-size demo world, built once per session into a temporary cache."""
    return load_world("test", cache_dir=world_cache)


@pytest.fixture(scope="session")
def pack_files(world):
    """Paths of the test world's feature packs ("en", "zh", "repetition"), discovered once and cached."""
    from qscope_rl.world.packs import world_pack_files

    return world_pack_files(world)


@pytest.fixture(scope="session")
def packs(pack_files):
    from qscope_rl.features.feature_pack import FeaturePack

    return {name: FeaturePack.load(path) for name, path in pack_files.items()}
