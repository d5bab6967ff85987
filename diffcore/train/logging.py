"""Training logs: JSON lines (one record per logging interval) and a loss-curve PNG.

The plot is drawn with matplotlib when it is installed and with Pillow otherwise (diffcore does not depend on
matplotlib).
"""
from __future__ import annotations

import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

from ..checkpoint import atomic_write_bytes, atomic_write_text

CURVES = (("loss", (31, 119, 180)), ("mse", (255, 127, 14)), ("vb", (44, 160, 44)))


class JsonlLog:
    """Append-only JSON-lines log at ``path``: one object per line, flushed and fsync'ed on every write."""

    def __init__(self, path: "str | os.PathLike"):
        self.path = Path(path)

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (JSON-serialisable) as one line."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read(self) -> list[dict[str, Any]]:
        """All records; a final partial line (the process was killed mid-write) is ignored."""
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records

    def truncate_after(self, step: int) -> None:
        """Drop the records of steps after ``step`` (those a resumed run will redo), atomically."""
        kept = [r for r in self.read() if int(r.get("step", 0)) <= step]
        if self.path.is_file():
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def plot_loss_curves(records: Sequence[dict[str, Any]], path: "str | os.PathLike") -> None:
    """Draw loss, mse and vb against the step (log-scale y) into the PNG ``path`` (written atomically)."""
    records = [r for r in records if "step" in r]
    if not records:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        atomic_write_bytes(path, _plot_pillow(records))
        return
    try:
        atomic_write_bytes(path, _plot_matplotlib(records))
    except Exception as error:  # never let plotting stop a training run
        warnings.warn(f"matplotlib plot failed ({error}); drawing with Pillow")
        atomic_write_bytes(path, _plot_pillow(records))


def _series(records: Sequence[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(float(r["step"]), float(r[key])) for r in records
            if isinstance(r.get(key), (int, float)) and r[key] > 0 and math.isfinite(r[key])]


def _plot_matplotlib(records: Sequence[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, colour in CURVES:
        points = _series(records, key)
        if points:
            ax.plot(*zip(*points), label=key, color=tuple(c / 255 for c in colour))
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend()
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _plot_pillow(records: Sequence[dict[str, Any]], width: int = 700, height: int = 400) -> bytes:
    from PIL import Image, ImageDraw

    left, right, top, bottom = 60, 20, 20, 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    series = {key: _series(records, key) for key, _ in CURVES}
    points = [p for values in series.values() for p in values]
    if not points:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
    y_lo, y_hi = math.log10(min(p[1] for p in points)), math.log10(max(p[1] for p in points))
    x_hi, y_hi = (x_hi if x_hi > x_lo else x_lo + 1), (y_hi if y_hi > y_lo else y_lo + 1)

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x_lo) / (x_hi - x_lo) * (width - left - right)
        py = height - bottom - (math.log10(y) - y_lo) / (y_hi - y_lo) * (height - top - bottom)
        return px, py

    draw.rectangle((left, top, width - right, height - bottom), outline="black")
    for decade in range(math.floor(y_lo), math.ceil(y_hi) + 1):
        if y_lo <= decade <= y_hi:
            _, py = to_pixel(x_lo, 10.0**decade)
            draw.line((left, py, width - right, py), fill=(220, 220, 220))
            draw.text((5, py - 6), f"1e{decade}", fill="black")
    draw.text((left, height - bottom + 8), f"step {int(x_lo)}", fill="black")
    draw.text((width - right - 90, height - bottom + 8), f"step {int(x_hi)}", fill="black")
    for i, (key, colour) in enumerate(CURVES):
        pixels = [to_pixel(x, y) for x, y in series[key]]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        elif pixels:
            draw.ellipse((pixels[0][0] - 2, pixels[0][1] - 2, pixels[0][0] + 2, pixels[0][1] + 2), fill=colour)
        draw.text((width - right - 60, top + 5 + 14 * i), key, fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
