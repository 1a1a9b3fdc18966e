"""The main job, `qscope-rl demo`: does SAE-guided GRPO fix code-switching and looping on the demo world?

1. build or load the world and its feature packs;
2. measure the untrained policy on held-out English prompts (script judge, loop detector, task reward);
3. train GRPO under six arms, same seeds, same budget:
   (a) task reward only; (b) + DeepSeek-R1 language-consistency reward; (c) + SAE code-switch penalty;
   (d) + SAE penalty and SASFT auxiliary loss; (e) + amplified repetition-feature sampling (Qwen-Scope RL);
   (f) + n-gram repetition penalty;
4. measure every trained policy on the same held-out prompts; `demo_report` writes the report.

The judges (`judge_code_switch`, `judge_loop`) ride along as weight-0 rewards, so TRL logs the judged
rates of each step's rollouts: the curves of the report's plots.
"""

from __future__ import annotations

import copy
import multiprocessing
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

from qscope_rl import judges
from qscope_rl.world import World, load_world
from qscope_rl.world.model import sample
from qscope_rl.world.packs import world_pack_files

ARMS = {
    "a": "task reward only",
    "b": "+ language-consistency reward (DeepSeek-R1)",
    "c": "+ SAE code-switch penalty",
    "d": "+ SAE penalty + SASFT auxiliary loss",
    "e": "+ amplified repetition-feature sampling (Qwen-Scope RL)",
    "f": "+ n-gram repetition penalty (open-r1)",
}
MEASURES = ("code_switch_rate", "loop_rate", "task_reward", "rollout_code_switch_rate", "rollout_loop_rate",
            "reward_amplified", "reward_normal")
CURVES = {"code_switch_rate": "rewards/judge_code_switch/mean", "loop_rate": "rewards/judge_loop/mean",
          "task_reward": "rewards/world_topic/mean"}


@dataclass(frozen=True)
class DemoSettings:
    """Budget and method settings shared by every arm (`quick()` is the smoke-test preset)."""

    size: str = "default"  # a world size, or a built world's folder
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = tuple(ARMS)
    max_steps: int = 60
    prompts_per_step: int = 4
    num_generations: int = 8
    max_completion_length: int = 48
    learning_rate: float = 1e-3
    temperature: float = 1.0
    eval_prompts: int = 256  # held-out English prompts
    eval_samples_per_prompt: int = 2
    language_weight: float = 1.0  # (b)
    sae_penalty_weight: float = 1.0  # (c), (d): on the penalty's own scale, see `sae_penalty_calibration`
    aux_loss_weight: float = 0.05  # (d)
    amplify_top_n: int = 2  # (e)
    amplify_alpha: float = 20.0  # top-2 repetition features at 20: loop rate 0.26 -> 0.43 (untrained policy)
    ngram_weight: float = 1.0  # (f)
    workers: int = 2  # runs side by side, one thread each
    cache_dir: str | None = None
    notes: dict = field(default_factory=dict)

    @classmethod
    def quick(cls, **overrides) -> DemoSettings:
        quick = cls(size="test", seeds=(0,), max_steps=3, prompts_per_step=2, num_generations=4,
                    max_completion_length=24, eval_prompts=32, eval_samples_per_prompt=1)
        return replace(quick, **overrides)

    def __post_init__(self):
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or not self.arms:
            raise ValueError(f"unknown arms {unknown or '(none given)'}: choose from {list(ARMS)}")
        if not self.seeds:
            raise ValueError("the demo needs at least one seed")
        if self.max_steps < 1 or self.eval_prompts < 1 or self.workers < 1:
            raise ValueError("max_steps, eval_prompts and workers must be >= 1")


def evaluate(world, model, prompts, settings: DemoSettings, seed: int) -> dict:
    """Judged rates and task reward of `model`'s samples on `prompts` (each sampled n times)."""
    texts = [p.text for p in prompts] * settings.eval_samples_per_prompt
    completions = sample(model, world.tokenizer, texts, settings.max_completion_length, settings.temperature,
                         seed=10_000 + seed)
    meta = prompts * settings.eval_samples_per_prompt
    n = len(completions)
    return {
        "code_switch_rate": sum(judges.script_code_switch(c, p.lang) for c, p in zip(completions, meta)) / n,
        "loop_rate": sum(judges.has_loop(c) for c in completions) / n,
        "task_reward": sum(world.task_reward(c, p.topic) for c, p in zip(completions, meta)) / n,
    }


def arm_setup(arm: str, world, packs: dict, settings: DemoSettings) -> tuple[list, list[float], dict]:
    """(reward functions, their weights, SAE config fields) of one arm."""
    from qscope_rl.rewards import (
        CodeSwitchJudge,
        LanguageConsistencyReward,
        LoopJudge,
        NgramRepetitionPenalty,
        SAECodeSwitchPenalty,
        WorldTopicReward,
    )

    rewards = [WorldTopicReward(world.path), CodeSwitchJudge(), LoopJudge()]
    weights = [1.0, 0.0, 0.0]  # the judges only watch
    # every arm encodes rollouts with the SAE, so the logged sae/* metrics are comparable across arms
    sae = dict(sae_source=str(world.sae_dir), sae_layer=world.layer, code_switch_pack=str(packs["zh"]),
               repetition_pack=str(packs["repetition"]))
    if arm == "b":
        rewards.append(LanguageConsistencyReward())
        weights.append(settings.language_weight)
    if arm in ("c", "d"):
        calibration = settings.notes["sae_penalty"]
        rewards.append(SAECodeSwitchPenalty(packs["zh"], weight=1.0 / calibration["scale"],
                                            threshold=calibration["threshold"]))
        weights.append(settings.sae_penalty_weight)
    if arm == "d":
        sae["aux_loss_weight"] = settings.aux_loss_weight
    if arm == "e":
        sae.update(amplify_pack=str(packs["repetition"]), amplify_top_n=settings.amplify_top_n,
                   amplify_alpha=settings.amplify_alpha)
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


def sae_penalty_calibration(world, packs: dict) -> dict:
    """Threshold and scale of the SAE code-switch penalty, from the world's TRAINING documents only.

    threshold: the per-token score that 0.1% of clean English tokens exceed (clean rollouts cost ~0);
    scale: the median excess of switched English documents, so a typical switch costs `sae_penalty_weight`.
    """
    from qscope_rl.features.detection import calibrate_threshold, code_switch_scores, encode_completions
    from qscope_rl.features.feature_pack import FeaturePack
    from qscope_rl.hooks import capture_residual
    from qscope_rl.sae.loaders import load_sae

    sae, pack = load_sae(world.sae_dir, layer=world.layer), FeaturePack.load(packs["zh"])
    english = [d for d in world.documents("train") if d.lang == "en" and d.loop_char is None]

    def activations(texts):
        enc = world.tokenizer(texts, return_tensors="pt", padding=True)
        with torch.no_grad(), capture_residual(world.model, world.layer) as capture:
            world.model(**enc)
        return encode_completions(sae, capture.last, enc.attention_mask, prompt_length=0)

    threshold = calibrate_threshold(activations([d.text for d in english if d.switch_char is None][:256]), pack)
    switched = code_switch_scores(activations([d.text for d in english if d.switch_char is not None][:64]), pack)
    excess = (switched.per_token - threshold).clamp(min=0).amax(1)
    return {"threshold": threshold, "scale": max(float(excess.median()), 1e-6)}


def run_one(arm: str, seed: int, world_path: str, packs: dict, settings: DemoSettings) -> dict:
    """Train and measure one (arm, seed); runs in a worker process."""
    world = World(world_path)
    train = world.prompts("train", lang="en")
    dataset = Dataset.from_dict({"prompt": [p.text for p in train], "lang": [p.lang for p in train],
                                 "topic": [p.topic for p in train]})
    model, history = train_arm(arm, seed, world, packs, dataset, settings)
    measured = evaluate(world, model, world.prompts("heldout", lang="en")[: settings.eval_prompts], settings, seed)
    curves = {name: [e[key] for e in history if key in e] for name, key in CURVES.items()}
    # the judged rates of the rollouts averaged over training: how fast an arm got there
    during = {f"rollout_{k}": statistics.fmean(curves[k]) for k in ("code_switch_rate", "loop_rate")}
    # arm (e): the reward of the amplified rollouts vs the normal ones, over training (are they the negatives?)
    for key in ("reward_amplified", "reward_normal"):
        logged = [e[f"sae/{key}"] for e in history if f"sae/{key}" in e]
        if logged:
            during[key] = statistics.fmean(logged)
    return {"arm": arm, "seed": seed, **measured, **during, "curves": curves}


def _single_thread_worker() -> None:
    # The model is tiny: a step is bound by Python and dispatch, not by matmuls, so two single-threaded
    # runs side by side finish sooner than two runs one after another with two threads each.
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()


def run_demo(settings: DemoSettings, progress: bool = True) -> dict:
    """Run every arm and seed (`settings.workers` at a time); returns all numbers (the report's JSON)."""
    t0 = time.perf_counter()
    world = World(settings.size) if Path(settings.size).is_dir() else load_world(settings.size, settings.cache_dir)
    packs = {k: str(v) for k, v in world_pack_files(world).items()}
    settings = replace(settings, notes={**settings.notes, "sae_penalty": sae_penalty_calibration(world, packs)})
    heldout = world.prompts("heldout", lang="en")[: settings.eval_prompts]
    untrained = [evaluate(world, world.model, heldout, settings, seed) for seed in settings.seeds]

    runs = [(arm, seed) for arm in settings.arms for seed in settings.seeds]
    rows = []
    bar = tqdm(total=len(runs), desc=f"demo: {len(settings.arms)} arms x {len(settings.seeds)} seeds", unit="run",
               disable=not progress)
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch thread pools
    with ProcessPoolExecutor(settings.workers, mp_context=context, initializer=_single_thread_worker) as pool:
        futures = [pool.submit(run_one, arm, seed, str(world.path), packs, settings) for arm, seed in runs]
        for future in as_completed(futures):
            row = future.result()
            rows.append(row)
            bar.update()
            bar.write(f"arm {row['arm']} seed {row['seed']}: " + ", ".join(
                f"{k} {row[k]:.3f}" for k in ("code_switch_rate", "loop_rate", "task_reward")),
                file=sys.stderr)  # progress, like the bar: stdout is the report (`--json` prints it there)
    bar.close()
    by_arm = {arm: sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["seed"]) for arm in settings.arms}
    return {
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()},
        "world": {"path": str(world.path), **{k: world.stats[k] for k in ("size", "recipe_hash", "d_sae", "layer")}},
        "untrained": summarize(untrained),
        "arms": {arm: {"label": ARMS[arm], **summarize(arm_rows), "curves": [r["curves"] for r in arm_rows]}
                 for arm, arm_rows in by_arm.items()},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def summarize(rows: list[dict]) -> dict:
    """Mean, standard deviation and per-seed values of each measure."""
    out = {}
    for key in [k for k in MEASURES if k in rows[0]]:
        values = [r[key] for r in rows]
        out[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "per_seed": values}
    return out
