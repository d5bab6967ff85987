"""The report's figures (matplotlib, written atomically as PNG). matplotlib is needed only here: install it with
``pip install matplotlib`` (it is in requirements-dev.txt)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

from diffcore.outputs import atomic_write_bytes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def line_plot(path: Path, series: Sequence[tuple[str, Sequence[float], Sequence[float], str]], *, xlabel: str,
              ylabel: str, title: str, logx: bool = False, logy: bool = False,
              hlines: Sequence[tuple[str, float]] = ()) -> Path:
    """One axes: ``series`` of (label, xs, ys, matplotlib format such as "o-", "s--" or "C1x--"), optional
    horizontal reference lines (label, y). A logarithmic x axis is labelled at the data's x values."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, xs, ys, style in series:
        ax.plot(list(xs), list(ys), style, label=label)
    for label, y in hlines:
        ax.axhline(y, color="gray", linestyle=":", label=label)
    if logx:
        ax.set_xscale("log")
        ticks = sorted({float(x) for _, xs, _, _ in series for x in xs})
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks])
        ax.minorticks_off()
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
