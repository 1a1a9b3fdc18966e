"""How the command line fails: one ``error: ...`` line and a non-zero exit, the traceback only with ``--debug``.

Known errors are the project's own (`SAELoadError`, `FeaturePackError`, `RecipeError`, ... all ValueErrors),
files that cannot be read or written (named with their path), text that is not UTF-8, unavailable devices and
missing optional packages. Arguments are checked by their argparse types (`positive_int`, `non_negative_float`,
`counts`, `device`) and output paths by `check_writable`, before any model is loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

DEBUG_FLAG = "--debug"
DEBUG_ENV = "QSCOPE_RL_DEBUG"
KNOWN = (ValueError, OSError, ImportError, RuntimeError)  # a bug elsewhere keeps its traceback


def run(func, args, debug: bool) -> int:
    """``func(args)``; a known error becomes ``SystemExit("error: ...")`` (one line on stderr, exit status 1, as
    the commands' own checks raise it), with its traceback printed first under ``debug``."""
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except KNOWN as err:
        if debug:
            traceback.print_exc()
        raise SystemExit(f"error: {describe(err)}") from err


def describe(err: BaseException) -> str:
    """One line naming the problem: OSErrors with their path, decoding errors as "not UTF-8 text"."""
    if isinstance(err, UnicodeDecodeError):
        return f"input is not UTF-8 text (a binary or mis-encoded file?): {err.reason} at byte {err.start}"
    if isinstance(err, OSError) and err.filename is not None:
        what = {FileNotFoundError: "no such file or folder", IsADirectoryError: "is a folder, not a file",
                PermissionError: "permission denied", NotADirectoryError: "a path part is not a folder"}
        return f"{err.filename}: {what.get(type(err), err.strerror or str(err))}"
    if isinstance(err, ImportError):
        return f"{err} (an optional dependency is missing: see the README's install extras)"
    text = str(err).strip() or type(err).__name__
    return " ".join(text.splitlines()[:3])


def split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """argv without ``--debug`` (accepted anywhere on the line), and whether it was there (or $QSCOPE_RL_DEBUG)."""
    debug = os.environ.get(DEBUG_ENV, "0") not in ("", "0", "false")
    if DEBUG_FLAG in argv:
        return [a for a in argv if a != DEBUG_FLAG], True
    return argv, debug


# -- argparse types: out-of-range sizes fail before any work, naming the flag -------------------------------


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (0 = greedy), got {text!r}")
    return value


def counts(text: str) -> list[int]:
    """A comma-separated list of positive integers (``4,16,64``)."""
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return [positive_int(t.strip()) for t in items]


def device(text: str) -> str:
    """A torch device that exists on this machine (checked before anything loads onto it)."""
    import torch

    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:1, mps)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device on this machine (torch "
                                             f"{torch.__version__}); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine; use --device cpu")
    return text


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def check_writable(path: str | None, flag: str, folder: bool = False) -> None:
    """Fail now, naming the flag, if ``path`` (a file, or with ``folder`` a folder) could not be written later."""
    if path is None:
        return
    target = Path(path).expanduser()
    if target.exists():
        if folder and not target.is_dir():
            raise SystemExit(f"error: {flag} {path}: exists and is not a folder")
        if not folder and target.is_dir():
            raise SystemExit(f"error: {flag} {path}: is a folder; give a file name")
        writable = os.access(target, os.W_OK)
    else:
        parent = target.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise SystemExit(f"error: {flag} {path}: {parent} is not a folder")
        writable = os.access(parent, os.W_OK | os.X_OK)
    if not writable:
        raise SystemExit(f"error: {flag} {path}: cannot write there (permission denied)")
