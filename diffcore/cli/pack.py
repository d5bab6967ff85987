"""``diffcore pack FOLDER OUT``: resize an image folder once into tar shards or a memory-mapped array, for fast
training epochs (``diffcore train --data OUT``)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .common import UsageError, check_output_folder


def register(sub) -> None:
    """Add the ``pack`` subcommand to the subparsers ``sub``."""
    p = sub.add_parser("pack", help="pack an image folder into tar shards or a memory-mapped array",
                       description="Decode, resize and centre-crop every image of FOLDER once and write them to the "
                       "new (or empty) folder OUT: tar shards in the WebDataset layout (KEY.png + KEY.cls, the "
                       "default) or images.npy + labels.npy (memory-mapped when training: no decoding at all). "
                       "Order and labels are the folder's; training with --data OUT serves the same batches as "
                       "--data FOLDER --image-size SIZE. Nothing is written unless every image was packed.")
    p.add_argument("folder", type=Path, help="image folder (recursive; labels from sub-folders or labels.csv)")
    p.add_argument("out", type=Path, help="output folder to create (or an empty one)")
    p.add_argument("--image-size", type=int, required=True, help="resize and centre-crop to this many pixels")
    p.add_argument("--channels", type=int, choices=[1, 3], default=3, help="1 (grayscale) or 3 (RGB, default)")
    p.add_argument("--format", choices=["shards", "npy"], default="shards",
                   help="shards (WebDataset tar files, default) or npy (one memory-mapped uint8 array)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per tar shard (default 1000)")
    p.add_argument("--num-workers", type=int, default=0, help="worker processes decoding the folder (default 0)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Pack the folder and print what was written."""
    from ..data import pack_folder

    if not args.folder.is_dir():
        raise FileNotFoundError(f"folder: no such folder {args.folder}")
    if args.image_size < 1:
        raise UsageError(f"--image-size: expected a positive int, got {args.image_size}")
    if args.shard_size < 1:
        raise UsageError(f"--shard-size: expected a positive int, got {args.shard_size}")
    if args.num_workers < 0:
        raise UsageError(f"--num-workers: expected an int >= 0, got {args.num_workers}")
    check_output_folder(args.out, "out")
    if args.out.is_dir() and any(args.out.iterdir()):
        raise UsageError(f"out: {args.out} is not empty; pack into a new folder")
    started = time.perf_counter()
    paths = pack_folder(args.folder, args.out, args.image_size, channels=args.channels, format=args.format,
                        shard_size=args.shard_size, num_workers=args.num_workers)
    size = sum(p.stat().st_size for p in paths)
    print(f"diffcore pack: wrote {len(paths) - 1} {args.format} file(s) and pack.json to {args.out} "
          f"({size / 1e6:.1f} MB) in {time.perf_counter() - started:.1f} s; train with --data {args.out}")
    return 0
