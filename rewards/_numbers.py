"""Reward settings are multiplied into every reward: a NaN or infinite one would make them all NaN, unseen."""

from __future__ import annotations

import math


def checked_number(name: str, value, *, at_least: float | None = None, at_most: float | None = None,
                   above: float | None = None) -> float:
    """``value`` as a float, or a ValueError naming ``name`` if it is not a finite number in the bounds
    (a Python or NumPy number, or a one-element tensor; never a bool or a string)."""
    bounds = [f">= {at_least:g}" if at_least is not None else "", f"<= {at_most:g}" if at_most is not None else "",
              f"> {above:g}" if above is not None else ""]
    number = None
    if not isinstance(value, bool | str | bytes):
        try:
            number = float(value)
        except (TypeError, ValueError):
            pass
    if number is None or not math.isfinite(number) or (at_least is not None and number < at_least) \
            or (at_most is not None and number > at_most) or (above is not None and number <= above):
        raise ValueError(f"{name} must be a finite number{''.join(' ' + b for b in bounds if b)}, got {value!r}")
    return number
