"""The features wing: from SAE activations to named problem features and per-rollout scores.

Discovery finds features (language, repetition, contrastive) and saves them as feature packs; detection scores
rollouts with them; text features pool a text's activations; the classifier and the completion probe are fitted
on those; the auxiliary loss is SASFT's penalty on their pre-activations. Builds on `qscope_rl.sae` and
`qscope_rl.hooks` only.
"""

from .aux_loss import FeatureAuxLoss, residual_for_loss
from .classifier import ClassifierError, FeatureClassifier, macro_f1, sae_info
from .detection import (
    CompletionActivations,
    RepetitionScores,
    SwitchScores,
    calibrate_threshold,
    code_switch_scores,
    encode_completions,
    repetition_scores,
)
from .discovery import (
    discover_contrastive_features,
    discover_language_features,
    discover_repetition_features,
    find_repeats,
    make_loops,
)
from .feature_pack import Feature, FeaturePack, FeaturePackError, texts_sha256
from .probe import completion_probe_tail, fit_completion_probe, probe_scores, score_texts, tail_mean_activations
from .sparse_capture import SparseCapture, SparseCodes, SparseResidualCapture, capture_sparse
from .text_features import TextFeatures, check_texts, encode_texts, sae_fingerprint, sae_layer

__all__ = [
    "ClassifierError",
    "CompletionActivations",
    "Feature",
    "FeatureAuxLoss",
    "FeatureClassifier",
    "FeaturePack",
    "FeaturePackError",
    "RepetitionScores",
    "SwitchScores",
    "TextFeatures",
    "calibrate_threshold",
    "check_texts",
    "code_switch_scores",
    "completion_probe_tail",
    "discover_contrastive_features",
    "discover_language_features",
    "discover_repetition_features",
    "encode_completions",
    "encode_texts",
    "find_repeats",
    "fit_completion_probe",
    "macro_f1",
    "make_loops",
    "probe_scores",
    "repetition_scores",
    "residual_for_loss",
    "sae_fingerprint",
    "sae_info",
    "sae_layer",
    "score_texts",
    "SparseCapture",
    "SparseCodes",
    "SparseResidualCapture",
    "capture_sparse",
    "tail_mean_activations",
    "texts_sha256",
]
