"""The launcher: train from a recipe, ``python -m qscope_rl.trainers.launch --config recipes/grpo_code_switch.yaml``.

Under accelerate (``accelerate launch --config_file recipes/accelerate_configs/ddp.yaml -m
qscope_rl.trainers.launch --config ...``) every process runs this same main; ``qscope-rl train`` runs it in
process. Any field of the recipe can be overridden (``--learning_rate 1e-4``); ``--dry-run`` resolves and checks
everything without downloading or training (`qscope_rl.trainers.dry_run`).

The run writes the model to ``output_dir`` and, from the main process, ``qscope_run.json``: the recipe, the
number of processes that trained (accelerate's and torch.distributed's view), the steps, the final metrics and
the log history.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from .recipe import Recipe, RecipeError, parse_recipe
from .run_args import RL_TRAINERS, TRAINERS, RunArguments, build_callback, resolve_callback
from .world_defaults import world_dataset

RUN_FILE = "qscope_run.json"


def _launcher_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qscope-rl train", add_help=False, allow_abbrev=False,
        description="Train with an SAE trainer from a recipe YAML; any recipe field can be overridden as "
                    "--<field> <value> (e.g. --learning_rate 1e-4 --max_steps 10).")
    parser.add_argument("--config", help="recipe YAML (recipes/*.yaml)")
    parser.add_argument("--trainer", help=f"override the recipe's trainer: {' | '.join(TRAINERS)}")
    parser.add_argument("--dry-run", "--dry_run", action="store_true",
                        help="resolve and check everything, print the plan; no download, no training")
    parser.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    parser.add_argument("--processes", type=int, default=None,
                        help="with --dry-run: processes for the batch arithmetic (default: $WORLD_SIZE or 1)")
    parser.add_argument("-h", "--help", action="store_true", help="show this help and the recipe fields")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _launcher_parser()
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if args.help:
        _print_help(parser, args.trainer)
        return 0
    try:
        recipe = parse_recipe(args.config, overrides, args.trainer, dry_run=args.dry_run)
        if args.dry_run:
            return _dry_run(recipe, args)
        train(recipe)
    except RecipeError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ValueError, OSError, ImportError) as err:  # the trainers' own errors (ValueErrors), unreadable files
        if args.debug:
            raise
        text = f"{err.filename}: {err.strerror}" if isinstance(err, OSError) and err.filename else str(err)
        print(f"error: {' '.join(text.strip().splitlines()[:3])}", file=sys.stderr)
        return 1
    return 0


def _print_help(parser: argparse.ArgumentParser, trainer: str | None) -> None:
    from trl import TrlParser

    parser.print_help()
    config_cls = TRAINERS.get(trainer or "grpo", TRAINERS["grpo"])[0]
    print(f"\nrecipe fields (RunArguments, then {config_cls.__name__}; pick another with --trainer):")
    TrlParser([RunArguments, config_cls], prog="qscope-rl train").print_help()


def _dry_run(recipe: Recipe, args) -> int:
    from .dry_run import format_plan, plan

    processes = args.processes or int(os.environ.get("WORLD_SIZE", "1"))
    result = plan(recipe, processes)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(format_plan(result))
    return 1 if result["missing_files"] or result["offline_downloads"] else 0


# -- building and running the trainer ----------------------------------------------------------------------------


def load_train_dataset(recipe: Recipe):
    """The training data: the demo world's, a local file, or a Hub dataset; RL prompts in TRL's 'prompt' column."""
    from datasets import load_dataset

    run = recipe.run
    if run.dataset_name is None:
        return world_dataset(recipe.world, recipe.trainer, run.demo_world_lang)
    path = Path(run.dataset_name).expanduser()
    if path.is_file():
        builder = {".jsonl": "json"}.get(path.suffix, path.suffix.lstrip("."))
        data = load_dataset(builder, data_files=str(path), split=run.dataset_split)
    else:
        data = load_dataset(run.dataset_name, run.dataset_config, split=run.dataset_split)
    if recipe.trainer not in RL_TRAINERS:
        return data
    column = run.dataset_prompt_column
    if column not in data.column_names:
        raise RecipeError(f"dataset_prompt_column={column!r}: {run.dataset_name} has columns {data.column_names}")
    if column != "prompt":
        data = data.remove_columns([c for c in ["prompt"] if c in data.column_names]).rename_column(column, "prompt")
    if run.prompt_format == "chat":
        system = [{"role": "system", "content": run.system_prompt}] if run.system_prompt else []
        data = data.map(lambda row: {"prompt": [*system, {"role": "user", "content": row["prompt"]}]})
    return data


def load_model_and_tokenizer(recipe: Recipe):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = recipe.run
    tokenizer = AutoTokenizer.from_pretrained(run.model_name_or_path)
    if recipe.trainer in RL_TRAINERS:
        tokenizer.padding_side = "left"  # prompts are left-padded for generation
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = {"dtype": run.dtype}
    if run.attn_implementation:
        kwargs["attn_implementation"] = run.attn_implementation
    return AutoModelForCausalLM.from_pretrained(run.model_name_or_path, **kwargs), tokenizer


def lora_config(run: RunArguments):
    from peft import LoraConfig

    return LoraConfig(r=run.lora_r, lora_alpha=run.lora_alpha, lora_dropout=run.lora_dropout,
                      target_modules=run.lora_target_modules or "all-linear", task_type="CAUSAL_LM")


def build_trainer(recipe: Recipe):
    """The SAE trainer of a recipe, with its model, data, rewards (RL), LoRA and callbacks."""
    from qscope_rl.rewards import get_reward_func

    run = recipe.run
    model, tokenizer = load_model_and_tokenizer(recipe)
    kwargs = dict(model=model, args=recipe.config, train_dataset=load_train_dataset(recipe),
                  processing_class=tokenizer)
    if run.use_peft:
        kwargs["peft_config"] = lora_config(run)
    if recipe.trainer in RL_TRAINERS:
        kwargs["reward_funcs"] = [get_reward_func(name, **run.reward_kwargs.get(name, {}))
                                  for name in run.reward_funcs]
    trainer = recipe.trainer_class(**kwargs)
    for name in run.callbacks:
        trainer.add_callback(build_callback(resolve_callback(name), trainer, run.callback_kwargs.get(name, {})))
    return trainer


def use_offline_wandb_without_network(report_to) -> None:
    """wandb only runs when report_to names it; with no route to its server, log offline (unless WANDB_MODE is set)."""
    names = report_to if isinstance(report_to, list) else [report_to]
    if not ({"wandb", "all"} & set(names)) or "WANDB_MODE" in os.environ:
        return
    try:
        socket.create_connection(("api.wandb.ai", 443), timeout=3).close()
    except OSError:
        os.environ["WANDB_MODE"] = "offline"
        print("wandb: no network, logging offline (sync later with `wandb sync`)", file=sys.stderr)


def train(recipe: Recipe):
    """Train, save the model to output_dir and write `RUN_FILE` there; returns the trainer."""
    import torch.distributed as dist

    use_offline_wandb_without_network(recipe.config.report_to)
    trainer = build_trainer(recipe)
    result = trainer.train(resume_from_checkpoint=recipe.config.resume_from_checkpoint)
    trainer.save_model(recipe.config.output_dir)
    if trainer.accelerator.is_main_process:
        summary = {"recipe": recipe.source, "trainer": recipe.trainer,
                   "demo_world": str(recipe.world.path) if recipe.world is not None else None,
                   "num_processes": trainer.accelerator.num_processes,
                   "torch_distributed_world_size": dist.get_world_size() if dist.is_initialized() else 1,
                   "global_step": trainer.state.global_step, "metrics": result.metrics,
                   "log_history": trainer.state.log_history}
        (Path(recipe.config.output_dir) / RUN_FILE).write_text(json.dumps(summary, indent=2, default=str))
    return trainer

