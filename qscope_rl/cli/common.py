"""What the command modules share: reading texts, printing JSON, and the model-and-SAE arguments."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import check_writable, device, non_negative_int


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def read_records(path: str, field: str = "text") -> list[dict]:
    """Records from JSONL (objects with ``field``) or plain text (one ``{field: line}`` per line)."""
    file = Path(path)
    if file.is_dir():
        raise SystemExit(f"error: {path} is a folder; give a file of texts (JSONL or one per line)")
    if not file.is_file():
        raise SystemExit(f"error: file {path} does not exist")
    try:
        raw = file.read_bytes()
    except OSError as err:
        raise SystemExit(f"error: cannot read {path}: {err.strerror}") from err
    if b"\x00" in raw[:8192]:
        raise SystemExit(f"error: {path} is a binary file, not text (JSONL or one text per line)")
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SystemExit(f"error: {path} is not UTF-8 text (byte {err.start}); re-encode it as UTF-8") from err
    rows = []
    for n, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise SystemExit(f"error: {path}:{n} is not valid JSON ({err})") from err
            if not isinstance(record, dict) or field not in record:
                raise SystemExit(f"error: {path}:{n} has no {field!r} field")
            if not isinstance(record[field], str) or not record[field].strip():
                raise SystemExit(f"error: {path}:{n}: {field!r} must be a non-empty string")
            rows.append(record)
        else:
            rows.append({field: line})
    if not rows:
        raise SystemExit(f"error: {path} holds no texts")
    return rows


def add_model_and_sae_args(parser) -> None:
    """--world / --model / --sae / --layer / --device: the demo world by default, or a real model and its SAE."""
    group = parser.add_argument_group("model and SAE (default: the demo world)")
    group.add_argument("--world", default="test", help="demo world size when --model is not given (test / default)")
    group.add_argument("--model", default=None, help="HF model path or id (then --sae and --layer are needed)")
    group.add_argument("--sae", default=None, help="SAE folder / file / Hub repo (see `qscope-rl sae-info`)")
    group.add_argument("--layer", type=non_negative_int, default=None, help="decoder layer of the SAE (0-based)")
    group.add_argument("--device", type=device, default=None, help="torch device for model and SAE (default: cpu)")


def add_source_args(parser) -> None:
    add_model_and_sae_args(parser)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--plot", default=None, metavar="PNG", help="also draw a figure into this PNG file")


class LoadedSources:
    """model, tokenizer, sae and (demo only) the world."""

    def __init__(self, args):
        from qscope_rl.sae.loaders import load_sae

        check_writable(getattr(args, "plot", None), "--plot")  # before minutes of work, not after

        if args.model is None:
            from qscope_rl.world import load_world

            self.world = load_world(args.world)
            self.model, self.tokenizer = self.world.model, self.world.tokenizer
            self.sae = load_sae(self.world.sae_dir, layer=self.world.layer, device=args.device)
        else:
            if args.sae is None or args.layer is None:
                raise SystemExit("error: --model needs --sae and --layer")
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.world = None
            self.tokenizer = AutoTokenizer.from_pretrained(args.model)
            self.model = AutoModelForCausalLM.from_pretrained(args.model).eval()
            self.sae = load_sae(args.sae, layer=args.layer, device=args.device)
        if args.device:
            self.model = self.model.to(args.device)


def fail(err: Exception) -> SystemExit:
    return SystemExit(f"error: {err}")
