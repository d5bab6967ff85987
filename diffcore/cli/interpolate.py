"""``diffcore interpolate``: decode a slerp path between the x_T of two seeds into a PNG strip."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..images import grid_png, require_finite
from ..outputs import write_together
from .common import (UsageError, add_batch_size_flag, add_model_flags, add_overwrite_flag, batch_size_of,
                     check_output_file, class_labels, ddim_steps, load_model)


def register(sub) -> None:
    """Add the ``interpolate`` subcommand to the subparsers ``sub``."""
    p = sub.add_parser("interpolate", help="slerp between two latents and decode",
                       description="Spherical interpolation between the x_T of two seeds, decoded with DDIM.")
    add_model_flags(p)
    p.add_argument("--seeds", type=int, nargs=2, default=[0, 1], metavar=("A", "B"), help="the two seeds")
    p.add_argument("--num", type=int, default=8, help="images along the path, ends included (default 8)")
    p.add_argument("--label", type=int, help="class label for a class-conditional model")
    p.add_argument("--out", type=Path, default=Path("interpolation.png"), help="PNG strip to write")
    add_batch_size_flag(p, "; decoding is deterministic, so the images do not depend on it")
    add_overwrite_flag(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Write the PNG strip of ``--num`` images from seed A to seed B."""
    from ..pipelines.sample import check_fits_in_memory
    from ..runtime import batch_slices, default_batch_size, slice_rows
    from ..samplers import ddim_sample, initial_noise, slerp_path

    if args.num < 2:
        raise UsageError(f"--num: expected >= 2, got {args.num}")
    batch_size = batch_size_of(args)
    check_output_file(args.out, "--out", args.overwrite, suffix=".png")
    started = time.perf_counter()
    loaded = load_model(args)
    device, shape = loaded.diffusion.device, loaded.image_shape
    check_fits_in_memory((args.num, *shape), device, "--num", "ask for fewer images along the path")
    z0, z1 = (initial_noise((1, *shape), seed, device=device)[0] for seed in args.seeds)
    steps, skip = ddim_steps(args, loaded.diffusion)
    kwargs = class_labels(args.label, args.num, loaded.num_classes, device)
    if kwargs is not None and args.label is None:
        kwargs["y"].fill_(0)
    path = slerp_path(z0, z1, args.num)
    images = torch.cat([ddim_sample(loaded.model, loaded.diffusion, x_T=path[rows], steps=steps, skip_type=skip,
                                    eta=0.0, model_kwargs=slice_rows(kwargs, rows, args.num), clip_denoised=True,
                                    progress=args.progress).sample
                        for rows in batch_slices(args.num, batch_size or default_batch_size(args.num, device))])
    images = require_finite(images, "the decoded images")
    write_together({args.out: grid_png(images.float().clamp(-1, 1), nrow=args.num)}, replace=args.overwrite)
    print(f"diffcore interpolate: wrote {args.out} ({args.num} images from seed {args.seeds[0]} to "
          f"{args.seeds[1]}, {steps} DDIM steps) in {time.perf_counter() - started:.1f} s")
    return 0
