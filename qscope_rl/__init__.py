"""qscope-rl: sparse-autoencoder features in TRL post-training (Qwen-Scope and friends)."""

from .hooks import (
    ResidualCapture,
    ResidualEdit,
    add_to_residual,
    capture_residual,
    decoder_layer,
    decoder_layers,
    hidden_size,
    unwrap_model,
)
from .loaders import SAELoadError, load_sae
from .releases import QWEN_SCOPE_RELEASES, Release, find_release
from .sae import SparseActs, SparseAutoencoder
from .steering import steer

__version__ = "0.1.0"

__all__ = [
    "QWEN_SCOPE_RELEASES",
    "Release",
    "ResidualCapture",
    "ResidualEdit",
    "SAELoadError",
    "SparseActs",
    "SparseAutoencoder",
    "add_to_residual",
    "capture_residual",
    "decoder_layer",
    "decoder_layers",
    "find_release",
    "hidden_size",
    "load_sae",
    "steer",
    "unwrap_model",
]
