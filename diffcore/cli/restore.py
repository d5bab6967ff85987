"""``diffcore restore``: degrade one image with a task's operator and restore it by DPS and by the task's baseline
(see :mod:`diffcore.pipelines.restore`)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..images import load_image
from ..pipelines.restore import RESTORATION_FILES, RESTORE_TASKS, restore, write_restoration
from .common import (UsageError, add_batch_size_flag, add_model_flags, add_overwrite_flag, add_precision_flags,
                     batch_size_of, check_output_folder, load_model, refuse_existing)

_BLUR_TASKS = ("deblur-gauss", "deblur-motion")
_DEFAULT_STEPS = 250


def register(sub) -> None:
    """Add the ``restore`` subcommand to the subparsers ``sub``."""
    p = sub.add_parser("restore", help="restore a degraded image with DPS (inpainting, SR, deblurring, CT)",
                       description="Measure y = A(x) + noise from a clean image x with a task's operator, then "
                       "restore x from y with Diffusion Posterior Sampling and with the task's baseline (naive "
                       "replacement for the inpainting tasks; pseudo-inverse, damped least squares or filtered "
                       "back-projection otherwise). Writes DIR/degraded.png (the masked image, the up-sampled "
                       "low-resolution image, the blurred image, or the CT sinogram), DIR/restored.png, "
                       "DIR/baseline.png and DIR/metrics.json (PSNR and SSIM against the input).")
    add_model_flags(p, steps_help=f"reverse steps of a respaced process (default {_DEFAULT_STEPS}, at most T; DPS "
                 "works best with many)")
    add_precision_flags(p, "the model's calls (the operator and the DPS step stay fp32)")
    add_batch_size_flag(p, "; the same restorations for every batch size up to float rounding, which DPS may "
                        "amplify")
    p.add_argument("--task", required=True, metavar="TASK",
                   help=f"the degradation: one of {', '.join(RESTORE_TASKS)}")
    p.add_argument("--input", required=True, type=Path, metavar="IMAGE",
                   help="the clean image: PNG/JPEG (converted to the model's channels) or .npy (one image; uint8 "
                   "pixels or floats in [-1, 1])")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (created)")
    p.add_argument("--resize", action="store_true", help="resize and centre-crop an image of another size to the "
                   "model's (default: a size mismatch is an error)")
    p.add_argument("--noise", choices=["gaussian", "poisson"], default="gaussian",
                   help="measurement noise (default gaussian)")
    p.add_argument("--sigma-y", type=float, help="std of the Gaussian measurement noise, images in [-1, 1] "
                   "(default 0.05)")
    p.add_argument("--photon-rate", type=float, help="Poisson noise: expected photons at the top of the "
                   "measurement range (default 255; larger is less noisy)")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm",
                   help="reverse process of DPS and of the naive baseline (default ddpm, DPS's Algorithm 1)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (with --sampler ddim)")
    p.add_argument("--zeta", type=float, default=1.0, help="DPS guidance scale (default 1); the step is "
                   "zeta / ||A|| (the operator's spectral norm), so one value suits every task")
    p.add_argument("--seed", type=int, default=0, help="seed of the measurement noise and of the samplers")
    p.add_argument("--kernel-size", type=int, help="blur kernel size in pixels, odd, at most the image side "
                   "(deblur tasks; default scales DPS's 61 px at 256 px to the image)")
    p.add_argument("--n-angles", type=int, help="CT views in [0, pi) (task ct; default 60)")
    p.add_argument("--operator-seed", type=int, help="seed of the random mask (inpaint-random) or motion kernel "
                   "(deblur-motion) (default 0)")
    p.add_argument("--no-clip", dest="clip", action="store_false",
                   help="do not clamp the denoised estimate x0_hat to [-1, 1] during sampling")
    add_overwrite_flag(p, f"the files of --out ({', '.join(RESTORATION_FILES)})")
    p.set_defaults(run=run)


def _operator_kwargs(args: argparse.Namespace, image_shape) -> dict:
    kwargs: dict = {}
    if args.kernel_size is not None:
        if args.task not in _BLUR_TASKS:
            raise UsageError(f"--kernel-size: applies to {' and '.join(_BLUR_TASKS)}, not {args.task}")
        side = min(image_shape[1:])
        if args.kernel_size > side:
            raise UsageError(f"--kernel-size: the {args.kernel_size}x{args.kernel_size} kernel is larger than the "
                             f"{image_shape[1]}x{image_shape[2]} image (expected an odd size <= {side})")
        if args.kernel_size < 1 or args.kernel_size % 2 == 0:
            raise UsageError(f"--kernel-size: expected an odd size >= 1, got {args.kernel_size}")
        kwargs["kernel_size"] = args.kernel_size
    if args.n_angles is not None:
        if args.task != "ct":
            raise UsageError(f"--n-angles: applies to the ct task, not {args.task}")
        if args.n_angles < 1:
            raise UsageError(f"--n-angles: expected >= 1, got {args.n_angles}")
        kwargs["n_angles"] = args.n_angles
    if args.operator_seed is not None:
        if args.task not in ("inpaint-random", "deblur-motion"):
            raise UsageError(f"--operator-seed: applies to inpaint-random and deblur-motion, not {args.task}")
        kwargs["seed"] = args.operator_seed
    return kwargs


def _check_args(args: argparse.Namespace) -> None:
    if args.task not in RESTORE_TASKS:
        raise UsageError(f"--task: expected one of {', '.join(RESTORE_TASKS)}, got {args.task!r}")
    if args.noise == "gaussian":
        if args.photon_rate is not None:
            raise UsageError("--photon-rate: applies to --noise poisson")
        if args.sigma_y is not None and not 0 <= args.sigma_y < float("inf"):
            raise UsageError(f"--sigma-y: expected a finite value >= 0, got {args.sigma_y}")
    else:
        if args.sigma_y is not None:
            raise UsageError("--sigma-y: applies to --noise gaussian (use --photon-rate with --noise poisson)")
        if args.photon_rate is not None and not 0 < args.photon_rate < float("inf"):
            raise UsageError(f"--photon-rate: expected a finite value > 0, got {args.photon_rate}")
    if not 0 <= args.zeta < float("inf"):
        raise UsageError(f"--zeta: expected a finite value >= 0, got {args.zeta}")
    if not 0 <= args.eta < float("inf"):
        raise UsageError(f"--eta: expected a finite value >= 0, got {args.eta}")
    batch_size_of(args)
    if args.eta != 0 and args.sampler != "ddim":
        raise UsageError("--eta: applies to --sampler ddim")
    if not args.input.exists():
        raise FileNotFoundError(f"--input: no such file {args.input}")
    check_output_folder(args.out, "--out")
    refuse_existing([args.out / name for name in RESTORATION_FILES], "--out", args.overwrite)


def _format_scores(report: dict) -> str:
    lines = [f"{'':<10}{'PSNR (dB)':>10}{'SSIM':>8}"]
    for name in ("degraded", "baseline", "restored"):
        scores = report["metrics"][name]
        if scores is None:
            lines.append(f"{name:<10}{'-':>10}{'-':>8}   (not image-shaped)")
            continue
        value = "inf" if scores["psnr"] is None else f"{scores['psnr']:.2f}"
        similarity = "-" if scores["ssim"] is None else f"{scores['ssim']:.3f}"
        note = f"   ({report['baseline']})" if name == "baseline" else ""
        lines.append(f"{name:<10}{value:>10}{similarity:>8}{note}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Write degraded.png, restored.png, baseline.png and metrics.json into --out, together or not at all."""
    _check_args(args)
    started = time.perf_counter()
    loaded = load_model(args)
    model, diffusion, shape = loaded.model, loaded.diffusion, loaded.image_shape
    if loaded.num_classes is not None:
        raise UsageError("restore: class-conditional models are not supported by this command")
    T = diffusion.num_timesteps
    steps = args.steps if args.steps is not None else min(_DEFAULT_STEPS, T)
    if not 2 <= steps <= T:
        raise UsageError(f"--steps: expected 2..{T} (the model's T), got {steps}")
    kwargs = _operator_kwargs(args, shape)
    x = load_image(args.input, shape, resize=args.resize, name="--input")
    result = restore(model, diffusion, x, args.task, sigma_y=0.05 if args.sigma_y is None else args.sigma_y,
                     noise=args.noise, photon_rate=255.0 if args.photon_rate is None else args.photon_rate,
                     steps=steps, sampler=args.sampler, eta=args.eta, zeta=args.zeta, seed=args.seed,
                     operator_kwargs=kwargs, clip_denoised=args.clip, progress=args.progress,
                     precision=args.precision, compile=args.compile, batch_size=args.batch_size)
    extra = {"input": str(args.input), "checkpoint": str(args.checkpoint) if args.checkpoint else "packaged"}
    report = write_restoration(result, args.out, extra=extra, replace=args.overwrite)
    print(f"diffcore restore: {args.task} of {args.input} ({'x'.join(map(str, shape))}), DPS {args.sampler} "
          f"{steps} steps, zeta {args.zeta:g} (step {result.settings['step_size']:.4g}), seed {args.seed}, "
          f"{result.settings['dtype']}{' compiled' if args.compile else ''}")
    print(_format_scores(report))
    print(f"diffcore restore: wrote degraded.png, restored.png, baseline.png and metrics.json to {args.out} in "
          f"{time.perf_counter() - started:.1f} s")
    return 0
