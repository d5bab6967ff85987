"""``diffcore invert``: DDIM-invert images to latents x_T (``.npz``), optionally reconstructing them."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from ..images import grid_png, npz_bytes, read_images, require_finite
from ..outputs import write_together
from .common import (UsageError, add_batch_size_flag, add_model_flags, add_overwrite_flag, batch_size_of,
                     check_output_file, ddim_steps, load_model)


def register(sub) -> None:
    """Add the ``invert`` subcommand to the subparsers ``sub``."""
    p = sub.add_parser("invert", help="DDIM inversion of images to latents x_T",
                       description="Map images to DDIM latents (deterministic, eta = 0) and optionally "
                       "reconstruct them from the latents.")
    add_model_flags(p)
    p.add_argument("inputs", nargs="+", type=Path, help="image files, image folders or .npy/.npz files")
    p.add_argument("--out", type=Path, default=Path("latents.npz"), help=".npz to write ('latents' float32)")
    p.add_argument("--reconstruction", type=Path, help="reconstruct from the latents and write a PNG grid "
                   "(first row: inputs, second row: reconstructions); prints the MSE")
    add_batch_size_flag(p, "; inversion is deterministic, so the latents do not depend on it")
    add_overwrite_flag(p, "--out and --reconstruction")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Write the latents (and the reconstruction grid) together or not at all."""
    from ..pipelines.sample import check_fits_in_memory
    from ..runtime import batch_slices, default_batch_size
    from ..samplers import ddim_invert, ddim_sample

    batch_size = batch_size_of(args)
    check_output_file(args.out, "--out", args.overwrite, suffix=".npz")
    if args.reconstruction:
        check_output_file(args.reconstruction, "--reconstruction", args.overwrite, suffix=".png")
        if args.reconstruction.resolve() == args.out.resolve():
            raise UsageError("--reconstruction: must differ from --out")
    started = time.perf_counter()
    loaded = load_model(args)
    if loaded.num_classes is not None:
        raise UsageError("invert: class-conditional models are not supported by this command")
    model, diffusion = loaded.model, loaded.diffusion
    x0 = read_images(args.inputs, loaded.image_shape)
    check_fits_in_memory(x0.shape, diffusion.device, "inputs", "invert them in parts (fewer inputs per call)")
    x0 = x0.to(diffusion.device)
    steps, skip = ddim_steps(args, diffusion)
    batches = batch_slices(x0.shape[0], batch_size or default_batch_size(x0.shape[0], x0.device))
    inverted = [ddim_invert(model, diffusion, x0[rows], steps=steps, skip_type=skip, progress=args.progress)
                for rows in batches]
    latents, timesteps = torch.cat([part.sample for part in inverted]), list(inverted[0].timesteps)
    require_finite(latents, "the latents")
    files = {args.out: npz_bytes(latents=latents.float().cpu().numpy(),
                                 timesteps=np.asarray(timesteps, dtype=np.int64))}
    message = f"diffcore invert: wrote {args.out} ({x0.shape[0]} latents, {steps} DDIM steps)"
    if args.reconstruction:
        recon = torch.cat([ddim_sample(model, diffusion, x_T=latents[rows], steps=timesteps, eta=0.0,
                                       progress=args.progress).sample.float() for rows in batches])
        recon = require_finite(recon, "the reconstruction")
        mse = float(((recon - x0) ** 2).mean())
        files[args.reconstruction] = grid_png(torch.cat([x0, recon.clamp(-1, 1)]), nrow=x0.shape[0])
        message += f" and {args.reconstruction} (reconstruction MSE {mse:.3e} on [-1, 1] pixels)"
    write_together(files, replace=args.overwrite)
    print(f"{message} in {time.perf_counter() - started:.1f} s")
    return 0
