"""qscope-rl: sparse-autoencoder features in TRL post-training (Qwen-Scope and friends)."""

import os

# Passive OpenMP waiting: the spinning threads of concurrent torch processes on a small CPU box slow each
# other down by orders of magnitude. Only effective before torch is first imported; a user's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import _moved  # noqa: E402

_moved.install()  # old flat module paths (qscope_rl.detection, ...) keep importing

from .hooks import (  # noqa: E402
    ForwardToLayer,
    ResidualCapture,
    ResidualEdit,
    add_to_residual,
    capture_residual,
    decoder_layer,
    decoder_layers,
    hidden_size,
    unwrap_model,
)
from .sae import QWEN_SCOPE_RELEASES, Release, SAELoadError, SparseActs, SparseAutoencoder, find_release, load_sae  # noqa: E402
from .tools.steering import steer  # noqa: E402

__version__ = "0.4.3"

__all__ = [
    "ForwardToLayer",
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
