"""Feature packs of the demo world, discovered once from its training documents and cached beside it.

- ``en`` / ``zh`` / ``es``: language features by monolinguality score (SASFT), from clean monolingual
  documents; the packs of the languages a prompt is NOT in are the unwanted-language packs (``zh`` and
  ``es`` for English prompts).
- ``repetition``: features of "this span repeats" by the Qwen-Scope method (a repeated token's last vs
  first occurrence), from loops built out of the same documents;
- ``loop``: features of the world's own loops, contrastive (tokens from a loop's start to the end of its
  document vs clean documents, by mean activation).

Amplifying the top features of either makes the untrained policy loop; the demo chooses the pack and the
strength on training prompts (`qscope_rl.demo_amplify`), the Qwen-Scope ``repetition`` pack first.
"""

from __future__ import annotations

from pathlib import Path

from qscope_rl.features.discovery import (
    discover_contrastive_features,
    discover_language_features,
    discover_repetition_features,
)
from qscope_rl.features.feature_pack import FeaturePack, FeaturePackError
from qscope_rl.sae.loaders import load_sae

from .corpus import LANGS
from .world import World

PACK_NAMES = (*LANGS, "repetition", "loop")
# documents read per discovery: enough for stable rankings, a fraction of the default world's 9,000
MAX_TEXTS_PER_LANG = 800
MAX_REPETITION_TEXTS = 3000


def world_pack_files(world: World, top_k: int = 16, force: bool = False,
                     discover: bool = True) -> dict[str, Path] | None:
    """Paths of the world's feature packs, discovering and caching them on first use (``discover=False``: None
    instead of discovering). A cached pack that does not load is an error naming it and the fix."""
    folder = world.path / "packs"
    paths = {name: folder / f"{name}.json" for name in PACK_NAMES}
    if not force and all(path.exists() for path in paths.values()):
        for path in paths.values():
            _check_cached(path)
        return paths
    if not discover:
        return None
    sae = load_sae(world.sae_dir, layer=world.layer)
    clean = [d for d in world.documents("train") if d.switch_char is None and d.loop_char is None]
    texts_by_lang = {lang: [d.text for d in clean if d.lang == lang][:MAX_TEXTS_PER_LANG] for lang in LANGS}
    model_name = f"qscope-rl demo world ({world.path.name})"
    packs = discover_language_features(world.model, world.tokenizer, sae, texts_by_lang, top_k=top_k,
                                       model_name=model_name)
    # Every loop document, then others: the loop documents' own repeated n-grams give better repetition
    # features than synthetic loops built from clean text (measured in benchmarks/detection.py).
    train = world.documents("train")
    looped = [d for d in train if d.loop_char is not None]
    texts = ([d.text for d in looped] + [d.text for d in train if d.loop_char is None])[:MAX_REPETITION_TEXTS]
    packs["repetition"] = discover_repetition_features(world.model, world.tokenizer, sae, texts,
                                                       top_k=top_k, model_name=model_name)
    packs["loop"] = discover_contrastive_features(world.model, world.tokenizer, sae,
                                                  [d.text[d.loop_char:] for d in looped],
                                                  [d.text for d in clean][: len(LANGS) * MAX_TEXTS_PER_LANG],
                                                  top_k=top_k, rank_by="mean_diff", model_name=model_name)
    for name, path in paths.items():
        packs[name].save(path)
    return paths


def _check_cached(path: Path) -> None:
    try:
        FeaturePack.load(path)
    except FeaturePackError as err:
        raise FeaturePackError(f"{err}; this cached world pack is rediscovered on next use once you delete {path} "
                               f"(or rebuild the world: qscope-rl world build --force)") from err


def world_packs(world: World, top_k: int = 16) -> dict[str, FeaturePack]:
    """The world's feature packs, loaded (see `world_pack_files`)."""
    return {name: FeaturePack.load(path) for name, path in world_pack_files(world, top_k).items()}
