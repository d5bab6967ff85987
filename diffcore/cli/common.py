"""What the ``diffcore`` subcommands share: the usage error, ``--device``, the model flags and model loading,
step counts, class labels, and the checks on output paths that run before any work is done."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

__all__ = ["UsageError", "LoadedModel", "add_model_flags", "add_speed_flags", "add_precision_flags", "apply_threads",
           "add_batch_size_flag", "batch_size_of", "resolve_device", "load_model", "ddim_steps", "class_labels", "add_overwrite_flag", "refuse_existing",
           "check_suffix", "check_output_file", "check_output_folder"]


class UsageError(ValueError):
    """A bad command-line value: printed as one line, exit status 2."""


@dataclass(frozen=True)
class LoadedModel:
    """What a sampling command needs: ``model(x, t, **kwargs)`` on the device, its ``diffusion``, the
    ``image_shape`` (C, H, W) and ``num_classes`` (None for an unconditional model)."""

    model: Any
    diffusion: Any
    image_shape: tuple[int, ...]
    num_classes: Optional[int]


def add_model_flags(parser: argparse.ArgumentParser,
                    steps_help: str = "DDIM steps (default 50, at most T)") -> None:
    """The flags of every command that runs a model: ``--checkpoint``, ``--raw-weights``, ``--device``,
    ``--steps``, ``--no-progress``."""
    parser.add_argument("--checkpoint", "--model", dest="checkpoint", type=Path,
                        help="a diffcore checkpoint directory, a folder of checkpoints, a run's --out-dir, a "
                        "converted model or a diffusers UNet2DModel/DDPMPipeline folder (default: the packaged "
                        "model)")
    parser.add_argument("--raw-weights", action="store_true",
                        help="use the trained weights instead of the EMA ones")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--steps", type=int, help=steps_help)
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--threads", type=int, help="torch threads (default: $DIFFCORE_THREADS, else the physical "
                        "cores this process may use, diffcore.runtime.default_threads; pass 1 on a machine shared "
                        "with other jobs)")


def add_precision_flags(parser: argparse.ArgumentParser, what: str = "the model",
                        default: Optional[str] = None) -> None:
    """``--precision`` (default ``default``, else :data:`diffcore.runtime.DEFAULT_PRECISION`) and ``--compile``: the
    compute precision of ``what`` and whether to torch.compile it."""
    from ..runtime import DEFAULT_PRECISION, PRECISIONS

    default = DEFAULT_PRECISION if default is None else default
    parser.add_argument("--precision", choices=PRECISIONS, default=default,
                        help=f"compute precision of {what} (default {default}; fp32: the same results on every "
                        "machine up to float rounding; auto: bf16 on GPUs and on CPUs where it is fast, AMX or AMD "
                        "AVX512-BF16, else fp32; bf16 on other CPUs is slower than fp32)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (graphs cached under ~/.cache/diffcore; the first run compiles "
                        "for minutes on a CPU)")


def add_speed_flags(parser: argparse.ArgumentParser) -> None:
    """``--precision`` (default :data:`diffcore.runtime.SAMPLE_PRECISION`), ``--compile``, ``--batch-size``: how a
    sampling command runs its model."""
    from ..runtime import SAMPLE_PRECISION

    add_precision_flags(parser, default=SAMPLE_PRECISION)
    add_batch_size_flag(parser)


def add_batch_size_flag(parser: argparse.ArgumentParser, note: str = "") -> None:
    """``--batch-size``: images per model call (default :func:`diffcore.runtime.default_batch_size`); ``note`` is
    appended to the help. Check it with :func:`batch_size_of`."""
    parser.add_argument("--batch-size", type=int, help=f"images per model call (default 64 on a CPU, all on a "
                        f"GPU{note})")


def batch_size_of(args: argparse.Namespace) -> Optional[int]:
    """``--batch-size`` checked (an int >= 1, else a UsageError), or None for the default."""
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size: expected >= 1, got {args.batch_size}")
    return args.batch_size


def resolve_device(name: Optional[str]) -> torch.device:
    """``--device`` as a torch.device (default: :func:`diffcore.train.distributed.default_device`); a device this
    torch cannot use is a UsageError, not a crash later."""
    from ..pipelines.common import as_device
    from ..train.distributed import default_device

    if not name:
        return default_device()
    try:
        return as_device(name, "--device")
    except ValueError as error:
        raise UsageError(str(error)) from None


def apply_threads(threads: Optional[int]) -> None:
    """Set torch's thread count from ``--threads`` (default :func:`diffcore.runtime.default_threads`); a count
    :func:`diffcore.runtime.set_threads` refuses (outside 1 .. the CPUs this process may use) is a UsageError
    naming ``--threads``."""
    from ..runtime import set_threads

    try:
        set_threads(threads, name="--threads")
    except ValueError as error:
        raise UsageError(str(error)) from None


def load_model(args: argparse.Namespace) -> LoadedModel:
    """The model of ``--checkpoint`` (or the packaged one), on ``--device``, with the EMA weights unless
    ``--raw-weights``. ``--checkpoint`` may be a diffcore checkpoint (or run folder), a converted model or a diffusers
    ``UNet2DModel`` / ``DDPMPipeline`` folder (:func:`diffcore.convert.load_model`)."""
    device = resolve_device(args.device)
    apply_threads(getattr(args, "threads", None))
    if args.checkpoint is None:
        from ..pretrained import load_default

        trained = load_default(device=device)
    else:
        from ..convert import load_model as load_any_model

        if not args.checkpoint.exists():
            raise FileNotFoundError(f"--checkpoint: no such file or folder {args.checkpoint}")
        trained = load_any_model(args.checkpoint, use_ema=not args.raw_weights, device=device)
    return LoadedModel(trained.model, trained.diffusion.to(device), tuple(trained.image_shape),
                       trained.config.model.num_classes)


def ddim_steps(args: argparse.Namespace, diffusion) -> tuple[int, str]:
    """``(--steps or min(50, T), spacing)``: "uniform" when the steps divide T, else "even"."""
    steps = args.steps if args.steps is not None else min(50, diffusion.num_timesteps)
    if steps < 1 or steps > diffusion.num_timesteps:
        raise UsageError(f"--steps: expected 1..{diffusion.num_timesteps} (the model's T), got {steps}")
    return steps, ("uniform" if diffusion.num_timesteps % steps == 0 else "even")


def class_labels(label: Optional[int], n: int, num_classes: Optional[int], device: torch.device
                 ) -> Optional[dict]:
    """``model_kwargs`` for ``n`` images: None for an unconditional model, else ``{"y": labels}`` with ``label``
    for all or labels cycling through the classes."""
    if num_classes is None:
        if label is not None:
            raise UsageError("--label: the model is not class-conditional")
        return None
    if label is not None and not 0 <= label <= num_classes:
        raise UsageError(f"--label: expected 0..{num_classes} ({num_classes} = unconditional), got {label}")
    y = torch.full((n,), label, device=device) if label is not None else torch.arange(n, device=device) % num_classes
    return {"y": y}


def _nearest_existing(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path(".")


def add_overwrite_flag(parser: argparse.ArgumentParser, what: str = "--out") -> None:
    """``--overwrite``: allow replacing existing output files (default: an existing file is an error)."""
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace {what} if it exists (default: an existing file is an error and is left as it "
                        "was; diffcore never replaces a file unless told to)")


def refuse_existing(paths: Sequence[Path], flag: str, overwrite: bool) -> None:
    """A UsageError when any of ``paths`` exists and ``overwrite`` is False: a command never replaces a file it was
    not told to replace (a user's file, or an earlier run's that the user may want to keep)."""
    if overwrite:
        return
    existing = [path for path in paths if os.path.lexists(path)]
    if existing:
        shown = ", ".join(str(path) for path in existing[:3]) + (f" and {len(existing) - 3} more"
                                                                 if len(existing) > 3 else "")
        raise UsageError(f"{flag}: {shown} exist{'s' if len(existing) == 1 else ''} already; diffcore never replaces "
                         f"a file unless told to: pass --overwrite to replace "
                         f"{'it' if len(existing) == 1 else 'them'}, or choose another {flag}")


#: Suffixes that name another kind of file than the one written: a PNG grid saved as "x.jpg" or an .npz as
#: "x.png" would be a file that lies about its content.
OTHER_KINDS = (".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".png", ".npz", ".npy", ".json")


def check_suffix(path: Path, expected: str, flag: str) -> None:
    """A UsageError when ``path``'s suffix names another file kind than ``expected`` (other suffixes, or none,
    are accepted as given)."""
    suffix = path.suffix.lower()
    if suffix != expected and suffix in OTHER_KINDS:
        raise UsageError(f"{flag}: this writes a {expected} file, got a path ending in {path.suffix!r}: {path}")


def check_output_file(path: Path, flag: str, overwrite: bool = False, suffix: Optional[str] = None) -> None:
    """Fail before any work when ``path`` cannot be written as a file: no file name, an existing folder, a parent
    that is a file, a folder without write permission, (unless ``overwrite``) an existing file, or a suffix that
    names another kind of file than ``suffix`` (:func:`check_suffix`)."""
    if suffix is not None:
        check_suffix(path, suffix, flag)
    if path.name in ("", ".", ".."):
        raise UsageError(f"{flag}: expected a file path, got {str(path)!r} (a folder)")
    if path.is_dir():
        raise UsageError(f"{flag}: {path} is a folder; expected a file path")
    if os.path.lexists(path) and not path.is_file():
        raise UsageError(f"{flag}: {path} exists and is not a regular file (a device, a socket or a broken link); "
                         f"diffcore writes only regular files")
    refuse_existing([path], flag, overwrite)
    parent = _nearest_existing(path)
    if not parent.is_dir():
        raise UsageError(f"{flag}: cannot create {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}: cannot write {path}: no write permission in {parent}")


def check_output_folder(path: Path, flag: str) -> None:
    """Fail before any work when ``path`` cannot be used as an output folder: an existing file, a parent that is a
    file, or no write permission."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag}: {path} exists and is not a folder")
    parent = path if path.is_dir() else _nearest_existing(path)
    if not parent.is_dir():
        raise UsageError(f"{flag}: cannot create {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}: cannot write into {path}: no write permission in {parent}")
