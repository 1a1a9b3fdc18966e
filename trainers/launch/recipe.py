"""Read a recipe: one flat YAML file (open-r1 style) plus command-line overrides, into a `Recipe`.

Parsing is `trl.TrlParser`'s: YAML keys become the parser's defaults and the command line overrides them, so
``--learning_rate 1e-4`` beats the file. What differs from `TrlParser.parse_args_and_config`: the ``trainer:``
key picks the config class first; every YAML value is checked against its field's type before it becomes a
default (argparse never converts non-string defaults), so a typo or a wrong type is an error that names the key;
and the demo world fills what the recipe leaves unset before the config is validated.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch
import yaml
from trl import TrlParser

from .run_args import TRAINERS, RunArguments
from .world_defaults import fill_from_world, load_demo_world


class RecipeError(ValueError):
    """A recipe or override that cannot run; the message names the key and the value."""


@dataclass
class Recipe:
    trainer: str  # a key of TRAINERS
    run: RunArguments
    config: typing.Any  # SAEGRPOConfig / SAERLOOConfig / SASFTConfig
    source: str | None = None  # the YAML file
    world: typing.Any = None  # the demo world, when run.demo_world is set
    notes: list[str] = field(default_factory=list)
    given: dict = field(default_factory=dict)  # the config's values before its __post_init__ derived others

    @property
    def config_class(self):
        return TRAINERS[self.trainer][0]

    @property
    def trainer_class(self):
        return TRAINERS[self.trainer][1]


def parse_recipe(config_path: str | None, overrides: Sequence[str] = (), trainer: str | None = None,
                 dry_run: bool = False) -> Recipe:
    """Parse a recipe file and overrides (``["--max_steps", "2"]``) into validated arguments.

    ``dry_run``: on a machine without a bf16 GPU, validate a GPU recipe as if ``use_cpu`` were set (noted)."""
    values = _read_yaml(config_path) if config_path else {}
    where = config_path or "the command line"
    yaml_given = not config_path and any(str(o).endswith((".yaml", ".yml")) for o in overrides)
    trainer = _pick_trainer(trainer, values.pop("trainer", None), where, yaml_given)
    _apply_env(values.pop("env", None), where)
    config_cls = TRAINERS[trainer][0]
    parser = TrlParser([RunArguments, config_cls], prog="qscope-rl train", allow_abbrev=False, exit_on_error=False)
    parser.set_defaults_with_config(**_checked_yaml_values(parser, values, where))
    try:
        namespace, unknown = parser.parse_known_args(list(overrides))
    except argparse.ArgumentError as err:
        raise RecipeError(f"command line: {err}") from err
    if unknown:
        raise RecipeError(f"command line: unknown arguments {unknown} for trainer {trainer!r}")
    run_values, config_values = (_values_of(namespace, cls) for cls in (RunArguments, config_cls))
    try:
        run = RunArguments(**run_values)
    except ValueError as err:
        raise RecipeError(f"{where}: {err}") from err
    world = None
    if run.demo_world:
        try:
            world = load_demo_world(run.demo_world, run.demo_world_seed)
        except ValueError as err:
            raise RecipeError(f"{where}: {err}") from err
        fill_from_world(world, run, config_values)
    notes = []
    if dry_run and _needs_gpu(config_values) and not torch.cuda.is_available():
        config_values["use_cpu"] = True  # only so the check passes here; the run itself needs the GPU
        notes.append("no GPU on this machine: validated as if use_cpu were set; the run needs a bf16/fp16 GPU")
    try:
        config = config_cls(**config_values)
    except (ValueError, TypeError) as err:
        raise RecipeError(f"{where}: {config_cls.__name__}: {err}") from err
    if trainer == "sft" and run.reward_funcs:
        raise RecipeError(f"{where}: reward_funcs={run.reward_funcs}: the sft trainer takes no rewards")
    return Recipe(trainer, run, config, config_path, world, notes, given=config_values)


def _pick_trainer(override: str | None, in_file: str | None, where: str, yaml_given: bool = False) -> str:
    trainer = override or in_file
    if trainer is None:
        hint = " (a YAML file is on the command line: to read a recipe file, pass --config FILE)" if yaml_given else ""
        raise RecipeError(f"{where} does not say which trainer: add `trainer: {' | '.join(TRAINERS)}` "
                          f"or pass --trainer{hint}")
    if trainer not in TRAINERS:
        raise RecipeError(f"trainer={trainer!r} in {where}: expected one of {sorted(TRAINERS)}")
    return trainer


def _read_yaml(path: str) -> dict:
    if not Path(path).is_file():
        raise RecipeError(f"recipe {path} " + ("is a folder, not a YAML file" if Path(path).is_dir() else
                                               "does not exist"))
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise RecipeError(f"cannot read recipe {path}: {err.strerror}") from err
    if b"\x00" in raw[:8192]:
        raise RecipeError(f"recipe {path} is a binary file, not YAML")
    try:
        values = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise RecipeError(f"recipe {path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from err
    except yaml.YAMLError as err:
        raise RecipeError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(values, dict):
        raise RecipeError(f"{path} must hold a YAML mapping of field: value, got {type(values).__name__}")
    return values


def _apply_env(env, where: str) -> None:
    """TrlParser's ``env:`` mapping: environment variables set before anything is built."""
    if env is None:
        return
    if not isinstance(env, dict):
        raise RecipeError(f"env in {where} must be a mapping of variable: value")
    for key, value in env.items():
        os.environ[str(key)] = str(value)


def _needs_gpu(config_values: dict) -> bool:
    return bool(config_values.get("bf16") or config_values.get("fp16")) and not config_values.get("use_cpu")


def _values_of(namespace: argparse.Namespace, cls) -> dict:
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return {k: v for k, v in vars(namespace).items() if k in names}


# -- checking YAML values against the fields' types ------------------------------------------------------------


def _checked_yaml_values(parser: TrlParser, values: dict, where: str) -> dict:
    actions = {}
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            actions.setdefault(action.dest, action)  # the field's own option comes before its --no_ twin
    hints = {}
    for cls in parser.dataclass_types:
        hints.update(typing.get_type_hints(cls))
    unknown = [key for key in values if key not in actions]
    if unknown:
        raise RecipeError("; ".join(_unknown_key_message(key, actions, where) for key in unknown))
    return {key: _checked(key, value, actions[key], hints.get(key), where) for key, value in values.items()}


def _unknown_key_message(key, actions, where: str) -> str:
    close = difflib.get_close_matches(str(key), list(actions), n=3)
    hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
    return f"unknown key {key!r} in {where}{hint}"


def _checked(key: str, value, action: argparse.Action, hint, where: str):
    def bad(expected: str) -> RecipeError:
        quote = " (YAML reads bare no/yes/on/off as booleans: quote them)" if isinstance(value, bool) else ""
        return RecipeError(f"{key}={value!r} in {where}: expected {expected}{quote}")

    if action.choices is not None:
        converted = action.type(value) if isinstance(value, str) and action.type else value
        if converted not in action.choices:
            raise bad(f"one of {list(action.choices)}")
        return converted
    if action.nargs in ("+", "*") and value is not None:
        items = value if isinstance(value, list) else [value]
        return [_converted(item, action.type, hint and _item_hint(hint), bad) for item in items]
    if value is None:
        if hint is not None and not _allows(hint, None):
            raise bad(f"a value ({_describe(hint)}), not null")
        return None
    return _converted(value, action.type, hint, bad)


def _converted(value, to_type, hint, bad):
    """A YAML value as the field's type: strings through argparse's converter, others checked as they are."""
    if isinstance(value, str) and to_type is not None and to_type is not str:
        try:
            return to_type(value)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
            raise bad(_describe(hint) if hint is not None else getattr(to_type, "__name__", "another type")) from err
    if hint is not None and not _allows(hint, value):
        raise bad(_describe(hint))
    return value


def _item_hint(hint):
    for arg in typing.get_args(hint) or ():
        if typing.get_origin(arg) is list:
            return typing.get_args(arg)[0]
    return typing.get_args(hint)[0] if typing.get_origin(hint) is list else None


def _allows(hint, value) -> bool:
    """Whether ``value`` (as YAML gives it) fits the type annotation ``hint``."""
    origin = typing.get_origin(hint)
    if hint is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_allows(arg, value) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (list, tuple) or hint in (list, tuple):
        args = typing.get_args(hint)
        return isinstance(value, list) and (not args or all(_allows(args[0], v) for v in value))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if isinstance(hint, type) and issubclass(hint, Enum):
        return isinstance(value, hint) or value in [m.value for m in hint]
    return True  # other classes (e.g. ParallelismConfig) are parsed by the config itself


def _describe(hint) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("NoneType", "None")
