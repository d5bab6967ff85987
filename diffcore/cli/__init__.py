"""The ``diffcore`` command line: one module per command, each with ``register(subparsers)`` and ``run(args)``.

    diffcore train --data fashion_mnist --steps 20000 --out-dir runs/fmnist
    torchrun --nproc_per_node 4 -m diffcore.cli train ...        (DDP: NCCL on GPUs, gloo on CPUs)
    diffcore sample --checkpoint runs/fmnist --n 64 --out samples.png --npz samples.npz
    diffcore sample --fast                                         (the packaged default model)
    diffcore invert --checkpoint runs/fmnist images/ --out latents.npz --reconstruction recon.png
    diffcore interpolate --checkpoint runs/fmnist --seeds 0 1 --num 10 --out interp.png
    diffcore export runs/fmnist exported_model/
    diffcore restore --task sr4 --input shirt.png --out restored/ --steps 250   (DPS; the packaged model)
    diffcore eval --checkpoint runs/fmnist --n 1000 --bpd-batches 2 --out metrics.json
    diffcore info
    diffcore pack images/ packed/ --image-size 64 --num-workers 2   (then: diffcore train --data packed/ ...)

Every subcommand has ``--help``. Any error (missing files, bad values, incompatible checkpoints, a folder that
cannot be written, a result that is NaN) prints one line ``diffcore <command>: error: ...`` and exits with status 2
(1 for an unexpected internal error, 130 after Ctrl-C); ``--traceback`` shows the Python traceback. Outputs are
validated before the work starts and written all together or not at all; an output file that exists is an error
unless ``--overwrite`` is given (diffcore never replaces a file it was not told to replace).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from .common import UsageError

__all__ = ["build_parser", "main", "COMMANDS", "UsageError"]

#: The subcommands, in the order ``--help`` lists them: each is the module ``diffcore.cli.<module>``.
COMMANDS = {"train": "train", "sample": "sample", "invert": "invert", "interpolate": "interpolate",
            "export": "export", "convert": "convert", "restore": "restore", "eval": "evaluate", "info": "info",
            "pack": "pack"}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``diffcore`` command, with every subcommand of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(prog="diffcore", description="Denoising diffusion models (DDPM, I-DDPM, DDIM) "
                                     "on fused kernels: train, sample, invert, interpolate, restore (DPS), evaluate, "
                                     "convert models from other libraries.")
    parser.add_argument("--traceback", action="store_true", help="show Python tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS.values():
        importlib.import_module(f"{__name__}.{module}").register(sub)
    return parser


def _message(error: BaseException) -> str:
    if isinstance(error, KeyError):
        return f"missing entry {error}"
    if isinstance(error, OSError) and error.errno is not None and error.strerror:  # no "[Errno 28]" prefix
        names = [str(name) for name in (error.filename, error.filename2) if name is not None]
        return error.strerror + (f": {' -> '.join(names)}" if names else "")
    return str(error) or type(error).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``diffcore`` console script; returns the exit status (0 ok, 2 bad input or a failed
    write, 1 an unexpected internal error, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"diffcore {args.command}: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, TypeError, OSError, ArithmeticError, RuntimeError, LookupError,
            MemoryError) as error:
        if args.traceback:
            raise
        print(f"diffcore {args.command}: error: {_message(error)}", file=sys.stderr)
        return 2
    except Exception as error:  # a bug: still one line, with the way to see more
        if args.traceback:
            raise
        print(f"diffcore {args.command}: internal error ({type(error).__name__}): {_message(error)} (run with "
              f"--traceback and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
