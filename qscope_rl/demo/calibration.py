"""The SAE code-switch penalty's calibration on the demo world: a threshold and a scale per switch target,
from training documents only, so that clean rollouts cost about 0 and a typical switch costs 1."""

from __future__ import annotations

import torch

SWITCH_TARGETS = ("zh", "es")


def sae_penalty_calibration(world, packs: dict) -> dict:
    """Per switch target: threshold and scale of the SAE code-switch penalty, from TRAINING documents only.

    threshold: the per-token score that 0.1% of clean English tokens exceed (clean rollouts cost ~0);
    scale: the median excess of English documents switched into that target, so a typical switch costs
    `sae_penalty_weight`.
    """
    from qscope_rl.features.detection import calibrate_threshold, code_switch_scores, encode_completions
    from qscope_rl.features.feature_pack import FeaturePack
    from qscope_rl.hooks import capture_residual
    from qscope_rl.sae.loaders import load_sae

    sae = load_sae(world.sae_dir, layer=world.layer)
    english = [d for d in world.documents("train") if d.lang == "en" and d.loop_char is None]

    def activations(texts):
        enc = world.tokenizer(texts, return_tensors="pt", padding=True)
        with torch.no_grad(), capture_residual(world.model, world.layer) as capture:
            world.model(**enc)
        return encode_completions(sae, capture.last, enc.attention_mask, prompt_length=0)

    clean = activations([d.text for d in english if d.switch_char is None][:256])
    out = {}
    for target in SWITCH_TARGETS:
        pack = FeaturePack.load(packs[target])
        threshold = calibrate_threshold(clean, pack)
        switched = [d.text for d in english if d.switch_lang == target][:64]
        excess = (code_switch_scores(activations(switched), pack).per_token - threshold).clamp(min=0).amax(1)
        out[target] = {"threshold": threshold, "scale": max(float(excess.median()), 1e-6), "n_switched": len(switched)}
    return out
