"""``diffcore eval``: FID, KID, precision and recall of a model's samples with the real-against-real floor, and
optionally bits/dim (see :mod:`diffcore.pipelines.evaluate`)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from ..outputs import write_together
from .common import (UsageError, add_model_flags, add_overwrite_flag, add_precision_flags, check_output_file,
                     load_model)


def register(sub) -> None:
    """Add the ``eval`` subcommand to the subparsers ``sub``."""
    p = sub.add_parser("eval", help="FID/KID/precision/recall (with the real floor) and bits/dim of a model",
                       description="Sample --n images and score them against Fashion-MNIST test images in the "
                       "feature space of diffcore's shipped Fashion-MNIST classifier (not Inception: the numbers "
                       "compare within this project only, at equal sample counts). The real-against-real floor "
                       "(two disjoint halves of the test images, --n each) is reported beside each metric. With "
                       "--bpd-batches, also the variational bound in bits/dim on test images.")
    add_model_flags(p, steps_help="sampling steps (default 50, at most T): DDIM steps, or the respaced process of "
                 "--sampler ddpm")
    add_precision_flags(p, "the model (samples and bits/dim; the scoring classifier stays fp32)")
    p.add_argument("--n", type=int, default=1000, help="number of samples, and of real images per floor half "
                   "(default 1000; at most half the real images)")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim", help="DDIM (default) or ancestral")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples (batch k uses seed + k), the real "
                   "split and the bits/dim noise (default 0)")
    p.add_argument("--batch-size", type=int, default=250, help="images per sampling batch (default 250; the "
                   "samples depend on it)")
    p.add_argument("--bpd-batches", type=int, default=0, metavar="K", help="also measure bits/dim on K batches of "
                   "test images (all T timesteps per batch; default 0: skip)")
    p.add_argument("--bpd-batch-size", type=int, default=64, help="images per bits/dim batch (default 64)")
    p.add_argument("--real", default="fashion_mnist", help="real images: 'fashion_mnist' (the test split of "
                   "Debian's dataset-fashion-mnist), a folder of IDX files (its test split) or a .npy/.npz file of "
                   "1x28x28 images (default fashion_mnist)")
    p.add_argument("--out", type=Path, default=Path("metrics.json"), help="JSON file to write (default "
                   "metrics.json)")
    add_overwrite_flag(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print a table of the metrics and write them as JSON to --out (atomically)."""
    from ..pipelines.evaluate import evaluate_model, format_report, load_real_images

    for flag in ("n", "batch_size", "bpd_batch_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')}: expected >= 1, got {getattr(args, flag)}")
    if args.bpd_batches < 0:
        raise UsageError(f"--bpd-batches: expected >= 0, got {args.bpd_batches}")
    if not 0 <= args.eta < float("inf"):
        raise UsageError(f"--eta: expected a finite value >= 0, got {args.eta}")
    if args.eta != 0 and args.sampler != "ddim":
        raise UsageError("--eta: applies to --sampler ddim")
    check_output_file(args.out, "--out", args.overwrite, suffix=".json")
    started = time.perf_counter()
    try:
        real = load_real_images(args.real)
    except (OSError, ValueError) as error:
        raise UsageError(f"--real {args.real}: {error}") from None
    if real.shape[0] < 2 * args.n:
        raise UsageError(f"--n: the real-against-real floor needs 2n = {2 * args.n} real images, {args.real} has "
                         f"{real.shape[0]} (use --n {real.shape[0] // 2} or less)")
    if tuple(real.shape[1:]) != (1, 28, 28):
        raise UsageError(f"--real: expected 1x28x28 images, {args.real} has {'x'.join(map(str, real.shape[1:]))}")
    if args.bpd_batches * args.bpd_batch_size > real.shape[0]:
        raise UsageError(f"--bpd-batches: {args.bpd_batches} x {args.bpd_batch_size} images exceed the "
                         f"{real.shape[0]} real images")
    loaded = load_model(args)
    model, diffusion, shape = loaded.model, loaded.diffusion, loaded.image_shape
    if loaded.num_classes is not None:
        raise UsageError("eval: class-conditional models are not supported by this command")
    steps = args.steps if args.steps is not None else min(50, diffusion.num_timesteps)
    if not 1 <= steps <= diffusion.num_timesteps:
        raise UsageError(f"--steps: expected 1..{diffusion.num_timesteps} (the model's T), got {steps}")
    report = evaluate_model(model, diffusion, shape, n=args.n, steps=steps, eta=args.eta, sampler=args.sampler,
                            seed=args.seed, batch_size=args.batch_size, real=real, bpd_batches=args.bpd_batches,
                            bpd_batch_size=args.bpd_batch_size, device=diffusion.device, progress=args.progress,
                            precision=args.precision, compile=args.compile)
    payload = report.to_dict()
    payload["checkpoint"] = str(args.checkpoint) if args.checkpoint else "packaged"
    payload["real"] = args.real
    try:
        text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
    except ValueError:
        raise FloatingPointError("eval: a metric is NaN or infinite (the samples diverged?); nothing was written")
    write_together({args.out: text.encode("utf-8")}, replace=args.overwrite)
    print(format_report(report))
    print(f"diffcore eval: wrote {args.out} in {time.perf_counter() - started:.1f} s")
    return 0
