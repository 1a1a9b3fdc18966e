"""The SAE wing: the module itself, its loaders, where SAEs live on the Hub, and the Qwen-Scope release table.

Nothing here imports from the rest of qscope_rl: every other wing builds on these files.
"""

from .autoencoder import ARCHITECTURES, DEFAULT_CHUNK_TOKENS, SparseActs, SparseAutoencoder
from .loaders import HubSAE, SAELoadError, load_sae, resolve_hub_sae, sae_source_kind
from .releases import (
    QWEN_SCOPE_RELEASES,
    Release,
    find_release,
    parse_repo_name,
    parse_sae_id,
    release_for_repo,
    release_for_saelens_name,
)

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
    "parse_sae_id",
    "release_for_repo",
    "release_for_saelens_name",
    "resolve_hub_sae",
    "sae_source_kind",
]
