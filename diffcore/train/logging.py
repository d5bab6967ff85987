"""Training logs: JSON lines (one record per logging interval), a loss-curve PNG, and optionally TensorBoard and
Weights & Biases.

The plot is drawn with matplotlib when it is installed and with Pillow otherwise (diffcore does not depend on
matplotlib). :class:`LossPlot` keeps the curves in memory (read from the log once, then one point per record, at
most :data:`MAX_PLOT_POINTS` per curve by merging neighbours), so redrawing costs the same at step 100 and at step
1,000,000. TensorBoard and W&B are used only when asked for (``TrainConfig.tensorboard`` / ``wandb_project``) and
installed; diffcore depends on neither.
"""
from __future__ import annotations

import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

from ..outputs import atomic_write_bytes, atomic_write_text

CURVES = (("loss", (31, 119, 180)), ("mse", (255, 127, 14)), ("vb", (44, 160, 44)))
MAX_PLOT_POINTS = 2048  #: points kept per curve of :class:`LossPlot` (neighbours are averaged beyond it)
#: The numbers of a log record sent to TensorBoard / W&B (as ``train/<name>``).
SCALARS = ("loss", "mse", "vb", "loss_q0", "loss_q1", "loss_q2", "loss_q3", "lr", "grad_norm", "images_per_s",
           "nonfinite_steps", "skipped_images")


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


class LossPlot:
    """The loss curves of a run, kept in memory and redrawn into ``path`` (atomically) after each record.

    ``LossPlot(path, records)`` starts from the records already logged (read once, e.g. when resuming);
    :meth:`add` appends one record and redraws. Each curve keeps at most ``max_points`` points: when it is full,
    neighbouring pairs are averaged (in step and value), so the drawing cost stays bounded.
    """

    def __init__(self, path: "str | os.PathLike", records: Sequence[dict[str, Any]] = (),
                 max_points: int = MAX_PLOT_POINTS):
        self.path, self.max_points = Path(path), max(2, int(max_points))
        self.curves: dict[str, list[tuple[float, float]]] = {key: [] for key, _ in CURVES}
        for record in records:
            self._append(record)

    def _append(self, record: dict[str, Any]) -> None:
        if "step" not in record:
            return
        for key, points in self.curves.items():
            points.extend(_series([record], key))
            if len(points) > self.max_points:
                pairs = zip(points[0:-1:2], points[1::2])
                merged = [((a[0] + b[0]) / 2, (a[1] + b[1]) / 2) for a, b in pairs]
                points[:] = merged + ([points[-1]] if len(points) % 2 else [])

    def add(self, record: dict[str, Any]) -> None:
        """Append ``record``'s loss, mse and vb and redraw the PNG."""
        self._append(record)
        self.draw()

    def draw(self) -> None:
        """Redraw the PNG from the kept points (nothing when there are none)."""
        records = _records_of(self.curves)
        if records:
            plot_loss_curves(records, self.path)


def _records_of(curves: dict[str, list[tuple[float, float]]]) -> list[dict[str, Any]]:
    """Curves back into pseudo-records, one per point, which the plotting functions draw."""
    return [{"step": step, key: value} for key, points in curves.items() for step, value in points]


class ExternalLoggers:
    """TensorBoard and/or Weights & Biases, for the numbers of each log record and the sample grids.

    Args:
        out_dir: TensorBoard events go to ``out_dir/tensorboard``.
        tensorboard: use ``torch.utils.tensorboard`` (needs the ``tensorboard`` package).
        wandb_project: log to this W&B project (needs ``wandb``).
        config: the run's configuration (a dict), given to W&B.
        start_step: the step a resumed run continues from: TensorBoard events of later steps (written by the
            interrupted run, which the resumed one redoes) are discarded (``SummaryWriter``'s ``purge_step``).
    A requested logger that is not installed is a RuntimeError saying how to install it or turn it off.
    """

    def __init__(self, out_dir: "str | os.PathLike", *, tensorboard: bool = False,
                 wandb_project: "str | None" = None, config: "dict[str, Any] | None" = None, start_step: int = 0):
        self.tensorboard = self.wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError("tensorboard: the tensorboard package is not installed; `pip install tensorboard`, "
                                  "or train without --tensorboard (log.jsonl and loss.png are always "
                                  "written)") from None
            self.tensorboard = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"),
                                             purge_step=start_step if start_step > 0 else None)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("wandb_project: the wandb package is not installed; `pip install wandb`, or train "
                                  "without --wandb-project (log.jsonl and loss.png are always written)") from None
            self.wandb = wandb.init(project=wandb_project, config=config, dir=str(out_dir))

    @property
    def active(self) -> bool:
        """True when at least one logger is in use."""
        return self.tensorboard is not None or self.wandb is not None

    def log(self, record: dict[str, Any]) -> None:
        """Send the numbers of :data:`SCALARS` in ``record`` at ``record["step"]`` (None values are left out)."""
        step = int(record["step"])
        values = {f"train/{k}": float(record[k]) for k in SCALARS if isinstance(record.get(k), (int, float))}
        if self.tensorboard is not None:
            for tag, value in values.items():
                self.tensorboard.add_scalar(tag, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def image(self, tag: str, png: "str | os.PathLike", step: int) -> None:
        """Send the PNG file ``png`` (e.g. a sample grid) as image ``tag`` at ``step``."""
        if not self.active:
            return
        import numpy as np
        from PIL import Image

        with Image.open(png) as picture:
            pixels = np.asarray(picture.convert("RGB"))
        if self.tensorboard is not None:
            self.tensorboard.add_image(tag, pixels, step, dataformats="HWC")
            self.tensorboard.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(pixels)}, step=step)

    def close(self) -> None:
        """Flush and close the loggers."""
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
