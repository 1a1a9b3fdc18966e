"""Build the demo world from its recipe, cache it, and measure it.

A world lives in `<cache root>/world/<size>-<recipe hash>/`; the cache root is the `cache_dir`
argument, else `$QSCOPE_RL_CACHE`, else `$XDG_CACHE_HOME/qscope-rl` (`~/.cache/qscope-rl`). The hash
covers the whole recipe (a frozen dataclass) and `WORLD_VERSION`, so a world is rebuilt exactly when
its recipe or the builder's behaviour changes. A build runs in a temporary folder that is renamed into
place when complete (stats.json last), so an interrupted build never looks cached.

Determinism: torch's thread count is pinned and deterministic algorithms are on during the build,
every random draw is seeded from the recipe, and the build runs with CPU kernels pinned to AVX2
(`kernels`; in a fresh process unless this one already runs them), so the same recipe gives byte-identical
weights on Intel x86-64 machines with AVX2, not only on the one that built it. Not across CPU vendors: MKL
honours the AVX2 branch on Intel CPUs only, so an AMD-built world is another world of the same recipe (measured;
the build warns, and stats["cpu_kernels"] names the branch MKL really ran, e.g. "mkl_cbwr AUTO (AVX2 asked,
refused by MKL)"). Checked: two pinned builds on one machine are identical; unpinned builds with ATen's AVX-512
and AVX2 kernels on one machine are not. The world seed
(`WorldRecipe.seed`, `qscope-rl world build --seed N`) seeds the lexicon, the corpus, the LM, the SAE and
the measurement at once, so every claim can be checked on a world nobody tuned on.

What the world reproduces (each property measured by `measure.measure_samples`, kept in stats.json and
checked against claims fixed before the build, `measure.REGIME_CLAIMS` -> stats["regime_checks"]):
1. rare failures, as in real models (Qwen-Scope's SFT baseline code-switches in 0.81% of answers): the
   corpus switches in `switch_share` and loops in `loop_share` of documents; sampled at the world's decoding
   temperature (0.7, as a deployed model's recommended sampling), the model's own samples do both at a few
   percent (`code_switch_rate_*`, `loop_rate_*`). Two design choices make a 400-step LM's rates follow its
   corpus: tempered decoding (at 1.0 its tail leaks a foreign word into 17-20% of samples) and loops on a
   few formulaic phrases of their own words (per-topic phrases of topic words were never learned);
2. a task reward indifferent to the failures, as a verifier is (see `task`): failures start after the
   answer sentence, which ends with its own mark (∎, as a math answer ends in `\\boxed{}`) and is all the
   reward reads, and a foreign word names a concept its own-language counterpart names too
   (`task_reward_{clean,switch,loop}`, `switch_after_answer_share`, `loop_after_answer_share`). Without
   the mark a third of the LM's loops started inside the answer (where they earn 0), and the task reward
   alone removed loops;
3. a switch that script cannot see: English <-> Spanish beside English <-> Chinese, with the ground truth
   from the world's lexicon (`lexicon_judge`); how often lingua and the script judge agree with it is
   measured on the same samples (`lingua_*`, `script_*`);
4. an SAE wide enough for the utilities (`sae_fvu`, `sae_dead_fraction`, `d_sae`): 4,096 TopK latents,
   data-initialised with dead latents resampled (see `sae_training`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .cache_check import WorldCacheError, check_world, remove_dead_builds
from .corpus import CorpusSpec, build_lexicon, generate_documents
from .kernels import kernels_in_use, kernels_pinned, mkl_branch, run_pinned
from .measure import measure_samples, regime_checks
from .model import LMSpec, eval_loss, make_model, pack_documents, train_lm
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
from .sampling import torch_sampling
from .task import make_prompts
from .tokenizer import train_tokenizer
from .world import World

WORLD_VERSION = "9"  # bump when the builder changes what a recipe produces
SIZES = ("default", "test")


@dataclass(frozen=True)
class EvalSpec:
    """How the builder measures the world's failure modes on held-out prompts."""

    n_prompts_per_lang: int = 256
    samples_per_prompt: int = 2
    max_new_tokens: int = 48
    # The world's decoding temperature, as a deployed model's recommended sampling (Qwen3 non-thinking: 0.7):
    # recorded in the model's generation_config and used by the demo's rollouts and measurements. At 1.0 the
    # tiny LM's tail leaks a foreign word into 17-20% of its samples, ten times its corpus's switch share.
    temperature: float = 0.7
    seed: int = 1234


@dataclass(frozen=True)
class WorldRecipe:
    """Everything that determines a world. Presets: `WorldRecipe.for_size("default" | "test")`."""

    size: str = "default"
    seed: int = 0  # the world seed: seeds the lexicon, corpus, LM, SAE and measurement (see `for_size`)
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
    def for_size(cls, size: str, seed: int = 0) -> WorldRecipe:
        """The preset of `size`, every part seeded from the world seed `seed`."""
        if size == "default":
            recipe = cls()
        elif size == "test":  # smaller everything; still shows both failure modes, builds in about a minute
            recipe = cls(
                size="test",
                corpus=CorpusSpec(words_per_topic=16, n_train_docs=3600, n_heldout_docs=360, n_prompts=96,
                                  switch_share=0.06, loop_share=0.25),  # under-trained: loops need a big share
                # half-size batches: the same number of updates at half the compute
                lm=LMSpec(
                    vocab_size=2048,  # every world word a token or two: a tiny LM cannot also learn to spell
                    hidden_size=96,
                    num_hidden_layers=3,
                    head_dim=24,
                    intermediate_size=256,
                    batch_size=16,
                    steps=300,
                ),
                # sparsify's random init: data-initialised, this 384-latent SAE's language features were
                # token-specific (the zh pack flagged 29% of switched documents; 96% on the default world)
                sae=SAESpec(expansion_factor=4, k=16, epochs=4, data_init=False),
                # the test world is not in the regime: it only has to show every failure mode to the tests
                eval=EvalSpec(n_prompts_per_lang=96, samples_per_prompt=1, temperature=1.0),
            )
        else:
            raise ValueError(f"unknown world size {size!r}: choose one of {list(SIZES)}")
        return recipe.with_seed(seed)

    def with_seed(self, seed: int) -> WorldRecipe:
        """This recipe with every part seeded from `seed` (seed 0 keeps the presets' seeds)."""
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"the world seed must be an integer >= 0, got {seed!r}")
        return replace(self, seed=seed, corpus=replace(self.corpus, seed=seed), lm=replace(self.lm, seed=seed),
                       sae=replace(self.sae, seed=seed), eval=replace(self.eval, seed=EvalSpec.seed + seed))

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
    seed: int = 0,
) -> Path:
    """Build the world for `size` and world seed `seed` (or an explicit recipe) unless cached; returns its folder."""
    recipe = recipe or WorldRecipe.for_size(size, seed)
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
    if kernels_pinned():
        _build_here(recipe, final, force)
    else:  # this process's kernels depend on its CPU: build in one whose kernels do not
        run_pinned(_build_pinned_child, recipe, final, force)
    return final


def _build_here(recipe: WorldRecipe, final: Path, force: bool) -> None:
    """Build into a temporary folder in this process and rename it to `final`."""
    branch = mkl_branch()
    if kernels_pinned() and branch not in (None, "AVX2"):
        warnings.warn(f"MKL runs its {branch} branch on this CPU, not the pinned AVX2 one (it honours MKL_CBWR=AVX2 on "
                      f"Intel CPUs only): this world differs from the world its recipe gives on an Intel CPU, and "
                      f"reports made on one kind do not reproduce on the other", stacklevel=2)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with deterministic_torch(recipe.threads), torch_sampling():  # the world's samples: torch's sampler
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


def _build_into(recipe: WorldRecipe, out: Path) -> dict:
    t0, cpu0 = time.perf_counter(), time.process_time()
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
    model.generation_config.update(do_sample=True, temperature=recipe.eval.temperature, top_k=0, top_p=1.0)
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

    # 4. the regime, measured on the model's own samples by the independent judges and the ground truth
    rates = measure_samples(World(out, lexicon=lexicon), model, tokenizer, prompts["heldout"], recipe.eval, out)
    stage_done("eval")

    # 5. summary
    train_docs = docs["train"]
    stats = {
        "size": recipe.size,
        "recipe_hash": recipe.hash(),
        "version": recipe.version,
        **rates,
        **sae_stats,
        "lm_train_loss": sum(losses[-20:]) / len(losses[-20:]),
        "lm_heldout_loss": eval_loss(model, heldout_rows, tokenizer.pad_token_id),
        "seed": recipe.seed,
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
        "cpu_kernels": kernels_in_use(),
        **times,
    }
    stats["build_seconds"] = round(time.perf_counter() - t0, 2)
    # CPU time of the build's threads: on a busy machine, a better measure than wall time of what it costs
    stats["build_cpu_seconds"] = round(time.process_time() - cpu0, 2)
    stats["regime_checks"] = regime_checks(stats)
    stages.update()
    stages.close()
    (out / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2) + "\n")
    return stats


def _build_pinned_child(recipe: WorldRecipe, final: Path, force: bool) -> None:
    """`_build_here` in the process `run_pinned` started."""
    if not kernels_pinned():  # no AVX2 on this CPU, or a user's own setting: build with the kernels there are
        warnings.warn(f"the world is built with this CPU's own kernels ({kernels_in_use()}), not the pinned AVX2 "
                      f"ones: it may differ from the same seed's world on other machines", stacklevel=1)
    _build_here(recipe, final, force)


def load_world(size: str = "default", cache_dir: str | os.PathLike | None = None, force: bool = False,
               seed: int = 0) -> World:
    """The world for `size` and world seed `seed`: loaded from the cache, built first (with progress bars) if
    missing."""
    return World(build_world(size, cache_dir=cache_dir, force=force, seed=seed))
