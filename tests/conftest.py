import os

# Passive OpenMP waiting: on a busy 2-core CI box, spinning torch threads of concurrent processes
# slow each other down by orders of magnitude. Only effective if set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

from qscope_rl.world import load_world  # noqa: E402
from qscope_rl.world.kernels import pin_kernels  # noqa: E402

# The pinned CPU kernels (qscope_rl.world.kernels), before any test computes: the test world is built in this
# process (so tests can patch the builder) and every machine builds the same one.
pin_kernels()


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


@pytest.fixture
def user_model_and_sae(tmp_path):
    """A user's set-up on disk, as the CLI reads it: a Qwen3 model folder (a BPE tokenizer of EN + ZH inside) and a
    Qwen-Scope-layout SAE folder holding `tiny_models.random_sae()`. Returns (model_dir, sae_dir)."""
    import torch
    import transformers as tf
    from tiny_models import EN, HIDDEN, LAYER, ZH, random_sae

    from qscope_rl.world.tokenizer import train_tokenizer

    tok = train_tokenizer(EN * 5 + ZH * 5, vocab_size=300)
    torch.manual_seed(0)
    model = tf.Qwen3ForCausalLM(tf.Qwen3Config(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=64,
                                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=8))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    sae = random_sae()
    sae_dir = tmp_path / "SAE-Res-tiny-W80-L0_6"
    sae_dir.mkdir()
    torch.save({n: getattr(sae, n).detach() for n in ("W_enc", "b_enc", "W_dec", "b_dec")},
               sae_dir / f"layer{LAYER}.sae.pt")
    return tmp_path / "model", sae_dir
