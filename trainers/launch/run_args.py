"""What a recipe holds besides the trainer config: the model, the data, rewards, callbacks, LoRA, the demo world.

`RunArguments` is parsed by `trl.TrlParser` next to the trainer's own config (`TRAINERS` picks it from the
recipe's ``trainer:`` key), so every field here, as every TRL field, can be set in the YAML or overridden on
the command line. Callbacks resolve by name through `CALLBACKS`, with a dotted-import-path fallback.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from typing import Literal

from transformers import EarlyStoppingCallback

from qscope_rl.registry import resolve

from ..config import SAEGRPOConfig, SAERLOOConfig, SASFTConfig
from ..grpo import SAEGRPOTrainer
from ..monitor import SAEMonitorCallback
from ..rloo import SAERLOOTrainer
from ..sasft import SASFTTrainer

# the recipe's `trainer:` key -> (config class, trainer class)
TRAINERS = {
    "grpo": (SAEGRPOConfig, SAEGRPOTrainer),
    "rloo": (SAERLOOConfig, SAERLOOTrainer),
    "sft": (SASFTConfig, SASFTTrainer),
}
RL_TRAINERS = ("grpo", "rloo")

CALLBACKS = {
    "sae_monitor": SAEMonitorCallback,
    "early_stopping": EarlyStoppingCallback,
}


@dataclass
class RunArguments:
    """The recipe fields that are not the trainer's: model, dataset, rewards, callbacks, LoRA, demo world."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Model to train: a local folder or a Hub id. Default with demo_world: "
                                "the world's model."})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "dtype the model's weights load in ('auto': as stored)."})
    attn_implementation: str | None = field(
        default=None, metadata={"help": "transformers attention backend (sdpa, flash_attention_2, eager)."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id or a local .json/.jsonl/.csv/.parquet file. Default with "
                                "demo_world: the world's training prompts (RL) or clean documents (sft)."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration (subset) name."})
    dataset_split: str = field(default="train", metadata={"help": "Dataset split to train on."})
    dataset_prompt_column: str = field(
        default="prompt", metadata={"help": "RL: the column holding the prompt (renamed to 'prompt' for TRL)."})
    prompt_format: Literal["text", "chat"] = field(
        default="text", metadata={"help": "RL: 'text' passes prompts as plain text (base models); 'chat' wraps "
                                  "each as a user message (with system_prompt), for chat-template models."})
    system_prompt: str | None = field(default=None, metadata={"help": "RL with prompt_format=chat: system message."})
    reward_funcs: list[str] = field(
        default_factory=list, metadata={"help": "RL: reward names (qscope_rl.rewards.REWARD_FUNCS) or dotted import "
                                        "paths; weights in TRL's reward_weights."})
    reward_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Settings of each reward by name: a YAML mapping, or JSON on the command "
                                "line, e.g. '{\"sae_code_switch\": {\"feature_pack\": \"zh\"}}'."})
    callbacks: list[str] = field(
        default_factory=list, metadata={"help": f"Callbacks by name ({sorted(CALLBACKS)}) or dotted import path."})
    callback_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Settings of each callback by name (YAML mapping or JSON)."})
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of the full model."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules that get adapters (default: all linear layers)."})
    demo_world: str | None = field(
        default=None, metadata={"help": "Run on the embedded demo world: a size ('test', 'default') or a built "
                                "world folder. Fills the model, SAE, layer, dataset and pack names (zh, en, "
                                "repetition, loop) that the recipe leaves unset."})
    demo_world_lang: str | None = field(
        default="en", metadata={"help": "Demo world: language of the prompts / documents trained on (None: all)."})
    demo_world_seed: int = field(
        default=0, metadata={"help": "Demo world: the world seed of the size named by demo_world (as `qscope-rl "
                             "world build --seed N`); ignored for a built world's folder."})

    def __post_init__(self):
        if self.demo_world_seed < 0:
            raise ValueError(f"demo_world_seed must be >= 0, got {self.demo_world_seed}")
        self.reward_kwargs = _settings_by_name("reward_kwargs", self.reward_kwargs, self.reward_funcs)
        self.callback_kwargs = _settings_by_name("callback_kwargs", self.callback_kwargs, self.callbacks)


def _settings_by_name(field_name: str, value, names: list[str]) -> dict[str, dict]:
    """``{name: {kwarg: value}}`` from a mapping or its JSON text; every name must be one of ``names``."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"{field_name} is not valid JSON ({err}): {value!r}") from err
    if not isinstance(value, dict) or not all(isinstance(v, dict | None) for v in value.values()):
        raise ValueError(f"{field_name} must map each name to its settings (a mapping), got {value!r}")
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ValueError(f"{field_name} has settings for {unknown}, which are not listed ({names})")
    return {name: dict(kwargs or {}) for name, kwargs in value.items()}


def resolve_callback(name: str):
    """The callback class a name stands for: a `CALLBACKS` name or a dotted import path."""
    return resolve(name, CALLBACKS, "callback")


def takes_trainer(callback_cls) -> bool:
    """Whether a callback is built around the trainer (its first argument is named ``trainer``)."""
    params = list(inspect.signature(callback_cls).parameters)
    return bool(params) and params[0] == "trainer"


def build_callback(callback_cls, trainer, kwargs: dict):
    return callback_cls(trainer, **kwargs) if takes_trainer(callback_cls) else callback_cls(**kwargs)
