"""``diffcore export``: write a checkpoint's (EMA) weights and config as a small sampling-only checkpoint."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    """Add the ``export`` subcommand to the subparsers ``sub``."""
    p = sub.add_parser("export", help="write a checkpoint's EMA weights as a small sampling-only checkpoint",
                       description="Copy the (EMA) weights and config of a checkpoint, without optimizer state, into "
                       "a new checkpoint directory (what the packaged model ships). An existing OUT is never "
                       "replaced unless it is a diffcore checkpoint and --overwrite is given.")
    p.add_argument("checkpoint", type=Path, help="checkpoint directory, folder of checkpoints or run folder")
    p.add_argument("out", type=Path, help="directory to create")
    p.add_argument("--raw-weights", action="store_true", help="export the trained weights instead of the EMA")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is an existing diffcore checkpoint")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Write the sampling-only checkpoint and print its size."""
    from ..train import export_model

    if not args.checkpoint.exists():
        raise FileNotFoundError(f"checkpoint: no such file or folder {args.checkpoint}")
    path = export_model(args.checkpoint, args.out, use_ema=not args.raw_weights, overwrite=args.overwrite)
    size = sum(p.stat().st_size for p in path.iterdir())
    print(f"diffcore export: wrote {path} ({size / 1e6:.1f} MB)")
    return 0
