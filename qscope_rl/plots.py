"""Figures: matplotlib without a display, every PNG saved the same way."""

from __future__ import annotations

import os
from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed), imported only when a plot is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, **tight_layout) -> Path:
    """Lay out, write ``path`` as a 120-dpi PNG (making its folder), and close ``fig``."""
    fig.tight_layout(**tight_layout)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path
