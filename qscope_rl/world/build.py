"""Build the demo world from its recipe, cache it, and measure it.

A world lives in `<cache root>/world/<size>-<recipe hash>/`; the cache root is the `cache_dir`
argument, else `$QSCOPE_RL_CACHE`, else `$XDG_CACHE_HOME/qscope-rl` (`~/.cache/qscope-rl`). The hash
covers the whole recipe (a frozen dataclass) and `WORLD_VERSION`, so a world is rebuilt exactly when
its recipe or the builder's behaviour changes. A build runs in a temporary folder that is renamed into
place when complete (stats.json last), so an interrupted build never looks cached.

Determinism: torch's thread count is pinned and deterministic algorithms are on during the build,
every random draw is seeded from the recipe, so the same recipe gives byte-identical weights on the
same machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import judges
from .cache_check import WorldCacheError, check_world, remove_dead_builds
from .corpus import LANGS, CorpusSpec, build_lexicon, generate_documents
from .model import LMSpec, eval_loss, make_model, pack_documents, sample, train_lm
from .sae_training import (
    SAESpec,
    evaluate_sae,
    parity_error,
    residual_activations,
    sae_folder_name,
    save_qwen_scope,
    to_qwen_scope,
    train_sae,
)
from .task import make_prompts
from .tokenizer import train_tokenizer
from .world import World

WORLD_VERSION = "5"  # bump when the builder changes what a recipe produces
SIZES = ("default", "test")


@dataclass(frozen=True)
class EvalSpec:
    """How the builder measures the world's failure modes on held-out prompts."""

    n_prompts_per_lang: int = 256
    max_new_tokens: int = 48
    temperature: float = 1.0
    seed: int = 1234


@dataclass(frozen=True)
class WorldRecipe:
    """Everything that determines a world. Presets: `WorldRecipe.for_size("default" | "test")`."""

    size: str = "default"
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    lm: LMSpec = field(default_factory=LMSpec)
    sae: SAESpec = field(default_factory=SAESpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    threads: int = 2  # torch threads during the build: results depend on the reduction order
    version: str = WORLD_VERSION

    def __post_init__(self):
        if self.eval.n_prompts_per_lang > self.corpus.n_prompts:
            raise ValueError("eval.n_prompts_per_lang must be <= corpus.n_prompts")

    @classmethod
    def for_size(cls, size: str) -> WorldRecipe:
        if size == "default":
            return cls()
        if size == "test":  # smaller everything; still shows both failure modes, builds in about a minute
            return cls(
                size="test",
                corpus=CorpusSpec(words_per_topic=16, n_train_docs=3000, n_heldout_docs=300, n_prompts=96),
                # half-size batches: the same number of updates at half the compute
                lm=LMSpec(
                    vocab_size=1024,
                    hidden_size=96,
                    num_hidden_layers=3,
                    head_dim=24,
                    intermediate_size=256,
                    batch_size=16,
                    steps=300,
                ),
                sae=SAESpec(expansion_factor=4, k=16, epochs=4),
                eval=EvalSpec(n_prompts_per_lang=96),
            )
        raise ValueError(f"unknown world size {size!r}: choose one of {list(SIZES)}")

    def hash(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def layer(self) -> int:
        return self.lm.num_hidden_layers // 2 if self.sae.layer is None else self.sae.layer


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("QSCOPE_RL_CACHE"):
        return Path(os.environ["QSCOPE_RL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qscope-rl"


def world_dir(recipe: WorldRecipe, cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_root(cache_dir) / "world" / f"{recipe.size}-{recipe.hash()}"


@contextlib.contextmanager
def deterministic_torch(threads: int):
    """Pin torch's thread count and turn on deterministic algorithms; restore both afterwards."""
    prev_threads, prev_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)


def _write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def build_world(
    size: str = "default",
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    recipe: WorldRecipe | None = None,
) -> Path:
    """Build the world for `size` (or an explicit recipe) unless cached; returns its folder."""
    recipe = recipe or WorldRecipe.for_size(size)
    final = world_dir(recipe, cache_dir)
    if (final / "stats.json").exists() and not force:
        check_world(final, recipe.size)  # a corrupt cached file is named with the command that rebuilds it
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WorldCacheError(f"the world {recipe.size} is not in the cache and cannot be built there: "
                              f"{final.parent}: {err.strerror}; set --cache-dir or QSCOPE_RL_CACHE to a writable "
                              f"folder") from err
    remove_dead_builds(final.parent, final.name)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with deterministic_torch(recipe.threads):
            stats = _build_into(recipe, tmp)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    except BaseException:  # Ctrl-C or a failure: leave nothing half-built behind (SIGKILL: the next build cleans)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if force:
        shutil.rmtree(final, ignore_errors=True)
    try:
        tmp.rename(final)
    except OSError:  # a concurrent build won the race: its world is identical, keep it
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _build_into(recipe: WorldRecipe, out: Path) -> dict:
    t0 = time.perf_counter()
    times, spec = {}, recipe.corpus
    stages = tqdm(total=5, desc=f"world {recipe.size}", unit="stage")

    def stage_done(name: str) -> None:
        times[f"seconds_{name}"] = round(time.perf_counter() - t0 - sum(times.values()), 2)
        stages.update()

    # 1. corpus, prompts and their labels
    (out / "corpus").mkdir(parents=True)
    lexicon = build_lexicon(spec)
    docs = {
        "train": generate_documents(lexicon, spec, spec.n_train_docs, spec.seed + 1),
        "heldout": generate_documents(lexicon, spec, spec.n_heldout_docs, spec.seed + 2),
    }
    prompts = {
        "train": make_prompts(lexicon, spec, spec.n_prompts, spec.seed + 3),
        "heldout": make_prompts(lexicon, spec, spec.n_prompts, spec.seed + 4),
    }
    (out / "lexicon.json").write_text(json.dumps(lexicon.to_dict(), ensure_ascii=False, indent=1))
    for split in docs:
        _write_jsonl(out / "corpus" / f"{split}.jsonl", (d.to_dict() for d in docs[split]))
        _write_jsonl(out / "corpus" / f"prompts_{split}.jsonl", (p.to_dict() for p in prompts[split]))
    stage_done("corpus")

    # 2. tokenizer and LM
    tokenizer = train_tokenizer([d.text for d in docs["train"]], recipe.lm.vocab_size)
    rows = pack_documents(tokenizer, [d.text for d in docs["train"]], recipe.lm.seq_len)
    heldout_rows = pack_documents(tokenizer, [d.text for d in docs["heldout"]], recipe.lm.seq_len)
    model = make_model(recipe.lm, tokenizer)
    losses = train_lm(model, rows, recipe.lm, tokenizer.pad_token_id)
    model.generation_config.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    stage_done("lm")

    # 3. SAE at the middle layer: layer-L activations collected once, trained on train, judged on held-out
    layer, eos = recipe.layer, tokenizer.eos_token_id
    sae_rows = pack_documents(tokenizer, [d.text for d in docs["train"]], recipe.sae.seq_len)
    train_acts = residual_activations(model, sae_rows, layer, eos)  # (N, d_model)
    sae = train_sae(train_acts, recipe.sae)
    state = to_qwen_scope(sae)
    sae_dir = out / sae_folder_name(f"qscope-world-{recipe.size}", state["W_enc"].shape[0], recipe.sae.k)
    save_qwen_scope(state, sae_dir, layer)
    heldout_acts = residual_activations(model, heldout_rows, layer, eos)
    sae_stats = evaluate_sae(state, heldout_acts, recipe.sae.k)
    # "dead" as in sparsify / Gao et al.: never fires over the training tokens as well (a rare latent can
    # miss a small held-out set); the held-out-only share is kept alongside
    sae_stats["sae_dead_fraction_heldout"] = sae_stats.pop("sae_dead_fraction")
    all_acts = torch.cat([heldout_acts, train_acts])
    sae_stats["sae_dead_fraction"] = evaluate_sae(state, all_acts, recipe.sae.k)["sae_dead_fraction"]
    sae_stats["sae_parity_max_abs_err"] = parity_error(sae, state, heldout_acts[:2048])
    del train_acts, all_acts
    stage_done("sae")

    # 4. the failure modes, measured on the model's own samples by the independent judges
    ev = recipe.eval
    by_lang = {lang: [p for p in prompts["heldout"] if p.lang == lang] for lang in LANGS}
    eval_prompts = [p for lang in LANGS for p in by_lang[lang][: ev.n_prompts_per_lang]]
    texts = [p.text for p in eval_prompts]
    completions = sample(model, tokenizer, texts, ev.max_new_tokens, ev.temperature, ev.seed, batch_size=128)
    judged = [
        {**p.to_dict(), "completion": c, "code_switch": judges.script_code_switch(c, p.lang)}
        | {"loop": judges.has_loop(c)}
        for p, c in zip(eval_prompts, completions)
    ]
    _write_jsonl(out / "samples.jsonl", judged)
    world = World(out, lexicon=lexicon)
    rates = {}
    for lang in LANGS:
        mine = [j for j in judged if j["lang"] == lang]
        rates[f"code_switch_rate_{lang}"] = sum(j["code_switch"] for j in mine) / len(mine)
        rates[f"loop_rate_{lang}"] = sum(j["loop"] for j in mine) / len(mine)
    rates["loop_rate"] = sum(j["loop"] for j in judged) / len(judged)
    rewards = [world.task_reward(j["completion"], j["topic"]) for j in judged]
    rates["topic_reward_mean"] = sum(rewards) / len(rewards)
    stage_done("eval")

    # 5. summary
    train_docs = docs["train"]
    stats = {
        "size": recipe.size,
        "recipe_hash": recipe.hash(),
        "version": recipe.version,
        **rates,
        **sae_stats,
        "n_samples_per_lang": ev.n_prompts_per_lang,
        "lm_train_loss": sum(losses[-20:]) / len(losses[-20:]),
        "lm_heldout_loss": eval_loss(model, heldout_rows, tokenizer.pad_token_id),
        "corpus_switch_share": sum(d.switch_char is not None for d in train_docs) / len(train_docs),
        "corpus_loop_share": sum(d.loop_char is not None for d in train_docs) / len(train_docs),
        "n_train_docs": len(train_docs),
        "n_train_tokens": int((rows >= 0).sum()),
        "vocab_size": len(tokenizer),
        "n_params": sum(p.numel() for p in model.parameters()),
        "d_model": recipe.lm.hidden_size,
        "d_sae": state["W_enc"].shape[0],
        "k": recipe.sae.k,
        "layer": layer,
        "sae_folder": sae_dir.name,
        "threads": recipe.threads,
        "torch_version": torch.__version__,
        **times,
    }
    stats["build_seconds"] = round(time.perf_counter() - t0, 2)
    stages.update()
    stages.close()
    (out / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2) + "\n")
    return stats


def load_world(size: str = "default", cache_dir: str | os.PathLike | None = None, force: bool = False) -> World:
    """The world for `size`: loaded from the cache, built first (with progress bars) if missing."""
    return World(build_world(size, cache_dir=cache_dir, force=force))
