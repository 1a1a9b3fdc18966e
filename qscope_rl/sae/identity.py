"""An SAE's identity: a short digest of its weights, recorded by feature packs, probes and checkpoint sidecars.

Two SAEs of the same shape (the Qwen3-1.7B and Qwen3.5-2B releases are both 2048 x 32768) differ here, so a
pack found on one is refused on the other. The digest is taken when `load_sae` reads the weights, before any
``dtype=`` cast, so the same SAE loaded in bfloat16 keeps the identity it has in float32.
"""

from __future__ import annotations

import hashlib

_ATTR = "_qscope_digest"


def compute_digest(sae) -> str:
    """A digest of the SAE's config, biases and first encoder / decoder column (cheap; tells SAEs apart)."""
    digest = hashlib.sha256(f"{sae.architecture}:{sae.d_in}:{sae.d_sae}:{sae.k}".encode())
    for t in (sae.b_enc, sae.b_dec, sae.W_enc[:, 0], sae.W_dec[:, 0]):
        digest.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def remember_digest(sae):
    """Store the digest of the SAE's weights as loaded (before dtype casts) on the module; returns the SAE."""
    setattr(sae, _ATTR, compute_digest(sae))
    return sae


def sae_digest(sae) -> str:
    """The SAE's identity digest: the one taken at load time, else computed from its current weights."""
    return getattr(sae, _ATTR, None) or compute_digest(sae)
