"""The main job, `qscope-rl demo`: can the demo world tell a method that works from one that does nothing?

The world (v2, see `qscope_rl.world.build`) reproduces the regime Qwen-Scope's methods are claimed for:
rare failures (a few percent), a task reward indifferent to them (a verifier that reads the answer only),
and a switch a script cannot see (English -> Spanish) beside one it can (English -> Chinese).

1. build or load the world and its feature packs; calibrate the SAE penalty on training documents and
   choose the amplification (features, strength) on training prompts;
2. measure the untrained policy on held-out English prompts (ground-truth lexicon judge, loop detector,
   task reward), and the loop rate of amplified samples of it;
3. train GRPO under arms with the same seeds and budget:
   (a) task reward only; (b) + DeepSeek-R1 language-consistency reward (script for Chinese, lingua for Spanish);
   (c) + SAE code-switch penalty; (d) + SAE penalty and SASFT auxiliary loss; (e) + amplified repetition-feature
   sampling (Qwen-Scope RL); (f) + n-gram repetition penalty (open-r1); (g) + the SASFT auxiliary loss alone (is it
   the aux loss or the penalty that works?); (h) (e) without the importance correction of the amplified rollouts
   (is it the correction that makes (e) train?);
4. fine-tune the world model with plain SFT and with SASFT on data with a rare share of switched documents (`sft`);
5. measure every policy on the same held-out prompts; `demo_report` writes the report with 95% bootstrap
   intervals over prompts and seeds (`demo_stats`).

The ground-truth judges ride along as weight-0 rewards, so TRL logs the judged rates of each step's rollouts (the
report's curves). Each run is a worker process: pinned kernels, one thread, `qscope_rl.world.sampling`'s sampler.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import transformers
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PrinterCallback

from qscope_rl.world import World, load_world
from qscope_rl.world.kernels import portable_env
from qscope_rl.world.packs import world_pack_files
from qscope_rl.world.sampling import install_cpu_sampler

from .amplify import amplified_loop_rate, choose_amplification
from .calibration import SWITCH_TARGETS, sae_penalty_calibration
from .policy_measure import measure_policy

ARMS = {
    "a": "task reward only",
    "b": "+ language-consistency reward (DeepSeek-R1; script for zh, lingua for es)",
    "c": "+ SAE code-switch penalty",
    "d": "+ SAE penalty + SASFT auxiliary loss",
    "e": "+ amplified repetition-feature sampling (Qwen-Scope RL)",
    "f": "+ n-gram repetition penalty (open-r1)",
    "g": "+ SASFT auxiliary loss alone",
    "h": "(e) without the importance correction (amplified rollouts as on-policy samples)",
    "i": "(e) with each group's baseline from its normal rollouts only (amplify_baseline='normal')",
}
# What `qscope-rl demo` runs unless --arms says otherwise: (i) answers a question about (e)'s task cost and runs
# on request (`--arms aei`), so the committed reports stay what the default command prints.
DEFAULT_ARMS = tuple("abcdefgh")
SAE_ARMS = ("c", "d", "e", "g")  # the arms whose method reads the SAE
CURVES = {"code_switch_rate_zh": "rewards/judge_switch_zh/mean", "code_switch_rate_es": "rewards/judge_switch_es/mean",
          "loop_rate": "rewards/judge_loop/mean", "task_reward": "rewards/world_topic/mean"}


@dataclass(frozen=True)
class DemoSettings:
    """Budget and method settings shared by every arm (`quick()` is the smoke-test preset)."""

    size: str = "default"  # a world size, or a built world's folder
    world_seed: int = 0  # which world of that size (`qscope-rl world build --seed N`)
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = DEFAULT_ARMS
    max_steps: int = 60
    prompts_per_step: int = 4
    num_generations: int = 8
    max_completion_length: int = 48
    learning_rate: float = 1e-3
    temperature: float | None = None  # None: the world's decoding temperature (`World.temperature`)
    eval_prompts: int = 256  # held-out English prompts
    eval_samples_per_prompt: int = 8  # 2048 samples per policy: a 1% rate is 20 events
    language_weight: float = 1.0  # (b): split evenly between the script and the lingua reward
    sae_penalty_weight: float = 1.0  # (c), (d): per target, on the penalty's own scale (`sae_penalty_calibration`)
    aux_loss_weight: float = 0.05  # (d), (g)
    amplify_top_ns: tuple[int, ...] = (1, 2, 4, 8)  # (e), (h): how many top features the grid tries
    amplify_target: float = 0.8  # (e): the amplified samples of the untrained policy must loop this often
    amplify_calibration_prompts: int = 64  # training prompts used to choose the amplification
    ngram_weight: float = 1.0  # (f)
    sft: bool = True  # the SFT table (plain SFT vs SASFT)
    sft_steps: int = 150
    sft_lr: float = 5e-4
    sft_batch_size: int = 16
    sft_docs: int = 2400
    sasft_lambda: float = 0.1  # SASFTConfig's default
    bootstrap: int = 2000
    workers: int = 2  # runs side by side, one thread each
    cache_dir: str | None = None
    notes: dict = field(default_factory=dict)

    @classmethod
    def quick(cls, **overrides) -> DemoSettings:
        quick = cls(size="test", seeds=(0,), max_steps=3, prompts_per_step=2, num_generations=4,
                    max_completion_length=24, eval_prompts=32, eval_samples_per_prompt=1,
                    amplify_calibration_prompts=16, amplify_top_ns=(2,), sft_steps=3, sft_docs=64, bootstrap=200)
        return replace(quick, **overrides)

    def __post_init__(self):
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or not self.arms:
            raise ValueError(f"unknown arms {unknown or '(none given)'}: choose from {list(ARMS)}")
        if not self.seeds:
            raise ValueError("the demo needs at least one seed")
        if self.max_steps < 1 or self.eval_prompts < 1 or self.workers < 1 or self.eval_samples_per_prompt < 1:
            raise ValueError("max_steps, eval_prompts, eval_samples_per_prompt and workers must be >= 1")
        if self.world_seed < 0:
            raise ValueError(f"world_seed must be >= 0, got {self.world_seed}")
        if not 0 < self.amplify_target <= 1:
            raise ValueError(f"amplify_target must be in (0, 1], got {self.amplify_target}")


def arm_setup(arm: str, world, packs: dict, settings: DemoSettings) -> tuple[list, list[float], dict]:
    """(reward functions, their weights, SAE config fields) of one arm."""
    from qscope_rl.rewards import (
        LanguageConsistencyReward,
        LoopJudge,
        NgramRepetitionPenalty,
        SAECodeSwitchPenalty,
        WorldSwitchJudge,
        WorldTopicReward,
    )

    rewards = [WorldTopicReward(world.path), WorldSwitchJudge(world.path, "zh"), WorldSwitchJudge(world.path, "es"),
               LoopJudge()]
    weights = [1.0, 0.0, 0.0, 0.0]  # the judges only watch
    # every arm encodes rollouts with the SAE, so the logged sae/* metrics are comparable across arms
    sae = dict(sae_source=str(world.sae_dir), sae_layer=world.layer, code_switch_pack=packs["unwanted"],
               repetition_pack=packs["repetition"])
    if arm == "b":
        rewards += [LanguageConsistencyReward(), LanguageConsistencyReward(judge="lingua")]
        weights += [settings.language_weight / 2] * 2
    if arm in ("c", "d"):
        for target in SWITCH_TARGETS:
            calibration = settings.notes["sae_penalty"][target]
            penalty = SAECodeSwitchPenalty(packs[target], weight=1.0 / calibration["scale"],
                                           threshold=calibration["threshold"])
            penalty.__name__ = f"sae_code_switch_{target}"  # two penalties side by side in TRL's logs
            rewards.append(penalty)
            weights.append(settings.sae_penalty_weight)
    if arm in ("d", "g"):
        sae.update(aux_loss_weight=settings.aux_loss_weight, aux_loss_pack=packs["unwanted"])
    if arm in ("e", "h", "i"):
        choice = settings.notes["amplify"]
        sae.update(amplify_pack=packs[choice["pack"]], amplify_top_n=choice["top_n"], amplify_alpha=choice["alpha"])
    if arm == "h":
        sae.update(amplify_importance_cap=None)
    if arm == "i":
        sae.update(amplify_baseline="normal")
    if arm == "f":
        rewards.append(NgramRepetitionPenalty())
        weights.append(settings.ngram_weight)
    return rewards, weights, sae


def train_arm(arm: str, seed: int, world, packs: dict, dataset: Dataset, settings: DemoSettings):
    """Train one arm with one seed; returns the trained model and TRL's log history."""
    from qscope_rl.trainers import SAEGRPOConfig, SAEGRPOTrainer

    rewards, weights, sae = arm_setup(arm, world, packs, settings)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as out:
        args = SAEGRPOConfig(
            output_dir=out, seed=seed, max_steps=settings.max_steps, learning_rate=settings.learning_rate,
            per_device_train_batch_size=settings.prompts_per_step * settings.num_generations,
            num_generations=settings.num_generations, max_completion_length=settings.max_completion_length,
            temperature=settings.temperature, reward_weights=weights, bf16=False, use_cpu=True,
            activation_checkpointing=False, report_to="none", logging_steps=1, save_strategy="no",
            disable_tqdm=True, **sae,
        )
        trainer = SAEGRPOTrainer(model=copy.deepcopy(world.model), reward_funcs=rewards, args=args,
                                 train_dataset=dataset, processing_class=world.tokenizer)
        trainer.remove_callback(PrinterCallback)  # the demo shows its own progress, not every log dict
        trainer.train()
    return trainer.model.eval(), trainer.state.log_history


def _english_dataset(world) -> Dataset:
    train = world.prompts("train", lang="en")
    return Dataset.from_dict({"prompt": [p.text for p in train], "lang": [p.lang for p in train],
                              "topic": [p.topic for p in train]})


def _measure(world, model, settings: DemoSettings, seed: int) -> dict:
    heldout = world.prompts("heldout", lang="en")[: settings.eval_prompts]
    return measure_policy(world, model, heldout, settings.eval_samples_per_prompt, settings.max_completion_length,
                          settings.temperature, seed=10_000 + seed)


def run_one(arm: str, seed: int, world_path: str, packs: dict, settings: DemoSettings) -> dict:
    """Train and measure one (arm, seed); runs in a worker process."""
    t0 = time.perf_counter()
    world = World(world_path)
    model, history = train_arm(arm, seed, world, packs, _english_dataset(world), settings)
    seconds_train = time.perf_counter() - t0
    measured = _measure(world, model, settings, seed)
    curves = {name: [e[key] for e in history if key in e] for name, key in CURVES.items()}
    during = {}
    # arms (e), (h): are the amplified rollouts the negatives, and how much of them does the correction keep?
    for key in ("reward_amplified", "reward_normal", "amplified_importance_weight"):
        logged = [e[f"sae/{key}"] for e in history if f"sae/{key}" in e]
        if logged:
            during[key] = statistics.fmean(logged)
    return {"kind": "arm", "arm": arm, "seed": seed, "measured": measured, "curves": curves, **during,
            "seconds_train": round(seconds_train, 1), "seconds": round(time.perf_counter() - t0, 1)}


def run_sft_one(method: str, seed: int, world_path: str, pack_file: str, settings: DemoSettings) -> dict:
    """Fine-tune and measure one (SFT method, seed); runs in a worker process."""
    from .sft import heldout_perplexity, sft_texts, train_sft

    t0 = time.perf_counter()
    world = World(world_path)
    texts = sft_texts(world, settings.sft_docs, seed=world.corpus_spec.seed + 100 + seed)
    model = train_sft(world, method, seed, texts, pack_file, settings)
    measured = _measure(world, model, settings, seed)
    return {"kind": "sft", "method": method, "seed": seed, "measured": measured,
            "perplexity": heldout_perplexity(world, model), "seconds": round(time.perf_counter() - t0, 1)}


def _single_thread_worker() -> None:
    # The model is tiny: a step is bound by Python and dispatch, not by matmuls, so two single-threaded
    # runs side by side finish sooner than two runs one after another with two threads each.
    torch.set_num_threads(1)
    install_cpu_sampler()  # torch's CPU sampler draws a variate per vocab entry: 40% of measuring a policy
    transformers.logging.set_verbosity_error()


def prepare(settings: DemoSettings, progress: bool = True) -> tuple[World, dict, DemoSettings]:
    """World, packs (file paths), and the settings with their calibrations (SAE penalty, amplification)."""
    from .sft import merged_pack

    if Path(settings.size).is_dir():
        world = World(settings.size)
    else:
        world = load_world(settings.size, settings.cache_dir, seed=settings.world_seed)
    if settings.temperature is None:
        settings = replace(settings, temperature=world.temperature)
    packs = {k: str(v) for k, v in world_pack_files(world).items()}
    packs["unwanted"] = merged_pack([packs[t] for t in SWITCH_TARGETS], str(world.path / "packs" / "unwanted-en.json"))
    calibration = sae_penalty_calibration(world, packs)
    n_cal = settings.amplify_calibration_prompts
    train_prompts = world.prompts("train", lang="en")[:n_cal]
    choice = choose_amplification(world, train_prompts, packs, settings.amplify_top_ns,
                                  max_new_tokens=settings.max_completion_length, target=settings.amplify_target,
                                  temperature=settings.temperature, seed=1)
    settings = replace(settings, notes={**settings.notes, "sae_penalty": calibration, "amplify": choice})
    return world, packs, settings


def _prepare_job(settings: DemoSettings) -> tuple[str, dict, DemoSettings]:
    """`prepare` in a worker process (with the pinned kernels); the world travels as its folder."""
    torch.set_num_threads(2)  # the only job running at that time; the worker then goes back to one thread
    try:
        world, packs, settings = prepare(settings)
    finally:
        torch.set_num_threads(1)
    return str(world.path), packs, settings


def run_untrained_one(seed: int, world_path: str, settings: DemoSettings) -> dict:
    """The untrained policy measured with one seed's sampling draws; runs in a worker process."""
    t0 = time.perf_counter()
    world = World(world_path)
    return {"kind": "untrained", "seed": seed, "measured": _measure(world, world.model, settings, seed),
            "seconds": round(time.perf_counter() - t0, 1)}


def run_amplified_one(world_path: str, packs: dict, settings: DemoSettings) -> dict:
    """Amplified samples of the untrained policy on held-out prompts (arm (e)'s choice); in a worker process."""
    t0 = time.perf_counter()
    world, choice = World(world_path), settings.notes["amplify"]
    heldout = world.prompts("heldout", lang="en")[: settings.eval_prompts]
    repeats = max(1, settings.eval_samples_per_prompt // 2)
    measured = amplified_loop_rate(world, heldout * repeats, packs[choice["pack"]], choice["top_n"], choice["alpha"],
                                   max_new_tokens=settings.max_completion_length, temperature=settings.temperature,
                                   seed=2)
    return {"kind": "amplified", "seed": None, "measured": measured, "seconds": round(time.perf_counter() - t0, 1)}


def run_demo(settings: DemoSettings, progress: bool = True, runs_log: str | Path | None = None) -> dict:
    """Run every arm, seed and SFT method (`settings.workers` at a time); returns the raw numbers (per seed and
    prompt), which `demo_report.analyse` turns into the report. Each finished run is also appended to
    `runs_log` (JSON lines), so an interrupted job keeps what it measured."""
    t0 = time.perf_counter()
    # Every run, the preparation too, in worker processes with the pinned CPU kernels and fixed thread counts,
    # so the numbers are the same on every machine (`qscope_rl.world.kernels`); workers inherit this environment.
    os.environ.update(portable_env())
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch thread pools
    pool = ProcessPoolExecutor(settings.workers, mp_context=context, initializer=_single_thread_worker)
    try:
        world_path, packs, settings = pool.submit(_prepare_job, settings).result()
    except BaseException:
        pool.shutdown(cancel_futures=True)
        raise
    world = World(world_path)
    seconds_prepare = time.perf_counter() - t0
    if runs_log is not None:
        Path(runs_log).parent.mkdir(parents=True, exist_ok=True)
        with open(runs_log, "w") as log:
            log.write(json.dumps({"kind": "prepare", "settings": asdict(settings), "world_path": str(world.path),
                                  "seconds_prepare": seconds_prepare},
                                 default=float) + "\n")
    from .sft import METHODS

    jobs = [(run_amplified_one, str(world.path), packs, settings)]
    for seed in settings.seeds:
        # seed-major: an interrupted job has whole seeds of every arm (see `raw_from_log`)
        jobs.append((run_untrained_one, seed, str(world.path), settings))
        jobs += [(run_one, arm, seed, str(world.path), packs, settings) for arm in settings.arms]
        if settings.sft:
            jobs += [(run_sft_one, method, seed, str(world.path), packs["unwanted"], settings) for method in METHODS]
    rows = []
    bar = tqdm(total=len(jobs), desc=f"demo: {len(settings.arms)} arms x {len(settings.seeds)} seeds + SFT",
               unit="run", disable=not progress)
    with pool:
        futures = [pool.submit(*job) for job in jobs]
        for future in as_completed(futures):
            row = future.result()
            rows.append(row)
            if runs_log is not None:
                with open(runs_log, "a") as log:
                    log.write(json.dumps(row, default=float) + "\n")
            bar.update()
            m = row["measured"]
            name = {"arm": f"arm {row.get('arm')}", "sft": row.get("method"), "untrained": "untrained",
                    "amplified": "amplified"}[row["kind"]]
            if row["kind"] == "amplified":
                bar.write(f"amplified samples of the untrained policy: loop rate {m['loop_rate']:.3f} of {m['n']}",
                          file=sys.stderr)
                continue
            bar.write(f"{name} seed {row['seed']}: switch zh {statistics.fmean(m['code_switch_rate_zh']):.4f}, "
                      f"es {statistics.fmean(m['code_switch_rate_es']):.4f}, "
                      f"loop {statistics.fmean(m['loop_rate']):.4f}, "
                      f"task {statistics.fmean(m['task_reward']):.3f} ({row['seconds']:.0f} s)", file=sys.stderr)
    bar.close()
    return assemble(world, settings, rows, time.perf_counter() - t0, seconds_prepare)


def assemble(world, settings: DemoSettings, rows: list[dict], seconds: float, seconds_prepare: float) -> dict:
    """The raw result of `run_demo` from the finished runs (untrained, amplified, arms, SFT; any order)."""
    untrained = sorted((r for r in rows if r["kind"] == "untrained"), key=lambda r: r["seed"])
    amplified = next((r["measured"] for r in rows if r["kind"] == "amplified"), None)
    arm_rows = {arm: sorted((r for r in rows if r["kind"] == "arm" and r["arm"] == arm), key=lambda r: r["seed"])
                for arm in settings.arms}
    sft_rows = {}
    for r in sorted((r for r in rows if r["kind"] == "sft"), key=lambda r: r["seed"]):
        sft_rows.setdefault(r["method"], []).append(r)
    stats_keys = [k for k in world.stats if k.startswith(("code_switch_rate", "loop_rate", "task_reward_", "lingua_",
                                                          "script_", "sae_", "topic_reward", "switch_after",
                                                          "loop_after"))]
    return {
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()},
        "world": {"path": str(world.path), "seed": world.seed,
                  **{k: world.stats.get(k) for k in ("size", "recipe_hash", "d_sae", "layer", "build_seconds",
                                                     "cpu_kernels")},
                  "regime": {k: world.stats[k] for k in stats_keys}},
        "untrained": [r["measured"] for r in untrained],
        "amplified_heldout": amplified,
        "arms": {arm: {"label": ARMS[arm], "runs": r} for arm, r in arm_rows.items()},
        "sft": sft_rows,
        "seconds": round(seconds, 1),
        "seconds_prepare": round(seconds_prepare, 1),
    }


def raw_from_log(path: str | Path) -> dict:
    """The raw result from a `runs.jsonl` that `run_demo` wrote, keeping only the seeds every arm and SFT method
    finished (an interrupted job reports what it completed, and says so in `settings.seeds`)."""
    lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines or lines[0].get("kind") != "prepare":
        raise ValueError(f"{path} is not a demo runs log (its first line must be the 'prepare' record)")
    head, rows = lines[0], lines[1:]
    fields = {k: tuple(v) if k in ("seeds", "arms", "amplify_top_ns") else v for k, v in head["settings"].items()}
    settings = DemoSettings(**fields)
    groups = [("untrained", None)] + [("arm", a) for a in settings.arms]
    groups += [("sft", m) for m in ("sft", "sasft")] if settings.sft else []
    done = [s for s in settings.seeds if all(any(r["kind"] == kind and r.get("arm", r.get("method")) == name
                                                 and r["seed"] == s for r in rows) for kind, name in groups)]
    if not done:
        raise ValueError(f"{path}: no seed has finished every arm yet")
    settings = replace(settings, seeds=tuple(done))
    world = World(head["world_path"])
    rows = [r for r in rows if r["seed"] in done or r["kind"] == "amplified"]
    return assemble(world, settings, rows, sum(r["seconds"] for r in rows) / settings.workers, head["seconds_prepare"])
