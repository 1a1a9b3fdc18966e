"""Look-up by name, as open-r1 does it: a plain dict of known names, and a dotted import path for your own."""

from __future__ import annotations

import importlib


def resolve(name: str, known: dict, what: str):
    """``known[name]``, or the object at a dotted path (``"my_pkg.mod:Obj"`` or ``"my_pkg.mod.Obj"``).

    ``what`` names the kind of thing in errors ("reward", "callback"); an unknown plain name lists the known ones.
    """
    if name in known:
        return known[name]
    if "." not in name and ":" not in name:
        raise ValueError(f"unknown {what} {name!r}; known {what}s: {sorted(known)} (or a dotted import path)")
    module_name, _, attr = name.replace(":", ".").rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {what} {name!r}: {err}") from err
