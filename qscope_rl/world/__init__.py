"""The embedded demo world: a tiny trilingual (English/Chinese/Spanish) Qwen3 that code-switches and loops,
with its own TopK SAE in the Qwen-Scope format, built offline and deterministically.

    from qscope_rl.world import load_world
    w = load_world("test")  # builds into the cache on first use
"""

from .build import SIZES, WORLD_VERSION, EvalSpec, WorldRecipe, build_world, cache_root, load_world, world_dir
from .corpus import CorpusSpec, Document, Lexicon
from .model import LMSpec
from .sae_training import SAESpec
from .task import Prompt
from .world import World

__all__ = [
    "SIZES",
    "WORLD_VERSION",
    "CorpusSpec",
    "Document",
    "EvalSpec",
    "LMSpec",
    "Lexicon",
    "Prompt",
    "SAESpec",
    "World",
    "WorldRecipe",
    "build_world",
    "cache_root",
    "load_world",
    "world_dir",
]
