"""The SAE wing: the module itself, its loaders and the Qwen-Scope release table.

Nothing here imports from the rest of qscope_rl: every other wing builds on these three files.
"""

from .autoencoder import ARCHITECTURES, DEFAULT_CHUNK_TOKENS, SparseActs, SparseAutoencoder
from .loaders import HubSAE, SAELoadError, load_sae, resolve_hub_sae, sae_source_kind
from .releases import QWEN_SCOPE_RELEASES, Release, find_release, parse_repo_name, release_for_repo

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_CHUNK_TOKENS",
    "HubSAE",
    "QWEN_SCOPE_RELEASES",
    "Release",
    "SAELoadError",
    "SparseActs",
    "SparseAutoencoder",
    "find_release",
    "load_sae",
    "parse_repo_name",
    "release_for_repo",
    "resolve_hub_sae",
    "sae_source_kind",
]
