"""``diffcore sample``: generate images and write them as a PNG grid (and optionally an ``.npz``)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..images import grid_png, npz_bytes, to_uint8
from ..outputs import write_together
from .common import UsageError, add_model_flags, add_speed_flags, check_output_file, class_labels, ddim_steps, load_model


def register(sub) -> None:
    """Add the ``sample`` subcommand to the subparsers ``sub``."""
    p = sub.add_parser("sample", help="generate images (PNG grid and/or .npz)",
                       description="Generate images with DDIM (default) or ancestral sampling.")
    add_model_flags(p)
    add_speed_flags(p)
    p.add_argument("--n", type=int, default=16, help="number of images (default 16)")
    p.add_argument("--fast", action="store_true", help="DDIM with few steps (the default; kept for clarity)")
    p.add_argument("--ancestral", action="store_true", help="ancestral DDPM sampling instead of DDIM (all T "
                   "steps, or a respaced process with --steps)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (0: deterministic)")
    p.add_argument("--seed", type=int, default=0, help="seed of all noise (default 0)")
    p.add_argument("--label", type=int, help="class label for a class-conditional model (default: cycle)")
    p.add_argument("--out", type=Path, default=Path("samples.png"), help="PNG grid to write")
    p.add_argument("--npz", type=Path, help="also write the images as uint8 [N, H, W, C] ('images') to .npz")
    p.add_argument("--nrow", type=int, help="images per grid row (default: square grid)")
    p.set_defaults(run=run)


def _check(args: argparse.Namespace) -> None:
    if args.n < 1:
        raise UsageError(f"--n: expected >= 1, got {args.n}")
    if args.fast and args.ancestral:
        raise UsageError("--fast and --ancestral exclude each other")
    if not 0 <= args.eta < float("inf"):
        raise UsageError(f"--eta: expected a finite value >= 0, got {args.eta}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size: expected >= 1, got {args.batch_size}")
    if args.nrow is not None and args.nrow < 1:
        raise UsageError(f"--nrow: expected >= 1, got {args.nrow}")
    check_output_file(args.out, "--out")
    if args.npz:
        check_output_file(args.npz, "--npz")
        if args.npz.resolve() == args.out.resolve():
            raise UsageError("--npz: must differ from --out")


def run(args: argparse.Namespace) -> int:
    """Write the PNG grid (and the .npz) of ``--n`` generated images, together or not at all."""
    from ..pipelines.sample import sample

    _check(args)
    started = time.perf_counter()
    loaded = load_model(args)
    device = loaded.diffusion.device
    kwargs = class_labels(args.label, args.n, loaded.num_classes, device)
    if args.ancestral:
        steps = args.steps
        if steps is not None and not 1 <= steps <= loaded.diffusion.num_timesteps:
            raise UsageError(f"--steps: expected 1..{loaded.diffusion.num_timesteps}, got {steps}")
        what = f"ancestral, {steps or loaded.diffusion.num_timesteps} steps"
    else:
        steps, _ = ddim_steps(args, loaded.diffusion)
        what = f"DDIM, {steps} steps, eta {args.eta}"
    images = sample(loaded.model, n=args.n, fast=not args.ancestral, steps=steps, eta=args.eta, seed=args.seed,
                    device=device, diffusion=loaded.diffusion, image_shape=loaded.image_shape,
                    progress=args.progress, model_kwargs=kwargs, precision=args.precision, compile=args.compile,
                    batch_size=args.batch_size)
    files = {args.out: grid_png(images, nrow=args.nrow)}
    if args.npz:
        extra = {"labels": kwargs["y"].cpu().numpy()} if kwargs else {}
        files[args.npz] = npz_bytes(images=to_uint8(images).permute(0, 2, 3, 1).cpu().numpy(), **extra)
    write_together(files)
    wrote = f"{args.out}" + (f" and {args.npz}" if args.npz else "")
    print(f"diffcore sample: wrote {wrote} ({args.n} images, {what}, seed {args.seed}) in "
          f"{time.perf_counter() - started:.1f} s on {device}")
    return 0
