"""The launch wing: from a recipe YAML to a running trainer.

``python -m qscope_rl.trainers.launch --config recipes/grpo_code_switch.yaml`` (or ``accelerate launch ... -m
qscope_rl.trainers.launch``, or ``qscope-rl train``). `recipe` parses and checks a recipe, `run_args` holds the
launcher's own fields and the trainer table, `world_defaults` fills demo-world paths, `dry_run` checks a recipe
without downloading or training, `launcher` builds the trainer and runs it. Builds on the trainer subclasses
one floor down (`qscope_rl.trainers`), never the other way.
"""

from .dry_run import format_plan, plan
from .launcher import RUN_FILE, build_trainer, load_model_and_tokenizer, load_train_dataset, lora_config, main, train
from .recipe import Recipe, RecipeError, parse_recipe
from .run_args import RL_TRAINERS, TRAINERS, RunArguments

__all__ = [
    "RL_TRAINERS",
    "RUN_FILE",
    "TRAINERS",
    "Recipe",
    "RecipeError",
    "RunArguments",
    "build_trainer",
    "format_plan",
    "load_model_and_tokenizer",
    "load_train_dataset",
    "lora_config",
    "main",
    "parse_recipe",
    "plan",
    "train",
]
