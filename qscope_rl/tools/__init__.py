"""The tools wing: the lifecycle utilities of Qwen-Scope, each usable on any HF causal LM with its SAE.

steer (points 1: add or clamp features while generating; dense DiffMean vectors, `steering_vectors`, as its
yardstick), classify (2: few-shot classification from seed texts), synthesize (3: data aimed at features a
dataset never activates), redundancy (6: footprint overlap of evaluation sets). Builds on `qscope_rl.features`,
`qscope_rl.sae` and `qscope_rl.hooks`.
"""

from .classify import few_shot_curve, fit_classifier, plot_curve
from .redundancy import (
    RedundancyReport,
    compare_benchmarks,
    compare_footprints,
    coverage_curve,
    footprints,
    overlap,
    performance_redundancy,
    redundancy_score,
)
from .steered_generation import generate, merge_strengths, parse_strength, perplexity, relative_strengths
from .steering import steer
from .steering_vectors import diff_mean, mean_residual, steer_vector
from .synthesize import SynthesisResult, feature_coverage, synthesize, target_features, top_contexts, unguided

__all__ = [
    "RedundancyReport",
    "SynthesisResult",
    "compare_benchmarks",
    "compare_footprints",
    "coverage_curve",
    "diff_mean",
    "feature_coverage",
    "few_shot_curve",
    "fit_classifier",
    "footprints",
    "generate",
    "mean_residual",
    "merge_strengths",
    "overlap",
    "parse_strength",
    "performance_redundancy",
    "perplexity",
    "plot_curve",
    "redundancy_score",
    "relative_strengths",
    "steer",
    "steer_vector",
    "synthesize",
    "target_features",
    "top_contexts",
    "unguided",
]
