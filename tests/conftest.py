import os

# Passive OpenMP waiting: on a busy 2-core CI box, spinning torch threads of concurrent processes
# slow each other down by orders of magnitude. Only effective if set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

from qscope_rl.world import load_world  # noqa: E402


@pytest.fixture(scope="session")
def world_cache(tmp_path_factory):
    """One cache root for the whole session, so the test world is built once."""
    return tmp_path_factory.mktemp("qscope-cache")


@pytest.fixture(scope="session")
def world(world_cache):
    """The test-size demo world, built once per session into a temporary cache."""
    return load_world("test", cache_dir=world_cache)
