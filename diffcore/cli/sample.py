"""``diffcore sample``: generate images with any sampler (``--sampler``, ``--steps``, ``--schedule``, ``--eta``),
optionally class-conditional with classifier-free guidance (``--class``, ``--guidance-scale``) and/or classifier
guidance by a noisy classifier (``--classifier``, ``--classifier-scale``), and write them as a PNG grid (default),
one PNG per image or an ``.npz`` (``--format``), all outputs of a call together or none.

``--first-image K`` makes images K .. K + n - 1 of the seed (labels included), so shards run anywhere give the images
of one run; ``--format png`` names each file by that global index and never replaces an existing file."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from ..images import encode_png, grid_png, npz_bytes, to_uint8
from ..outputs import write_together
from ..reference.philox import MAX_IMAGES
from .common import (UsageError, add_model_flags, add_overwrite_flag, add_speed_flags, batch_size_of,
                     check_output_file, check_output_folder, load_model)


def register(sub) -> None:
    """Add the ``sample`` subcommand to the subparsers ``sub``."""
    p = sub.add_parser("sample", help="generate images (PNG grid and/or .npz)",
                       description="Generate images with any of diffcore's samplers (default: the model kind's "
                       "best at 50 model calls: respaced ancestral for a learned variance, DDIM for a fixed one).")
    add_model_flags(p)
    add_speed_flags(p)
    p.add_argument("--n", type=int, default=16, help="number of images (default 16)")
    p.add_argument("--fast", action="store_true", help="DDIM with few steps (the default; kept for clarity)")
    p.add_argument("--ancestral", action="store_true", help="ancestral DDPM sampling instead of DDIM (all T "
                   "steps, or a respaced process with --steps)")
    from ..samplers import SAMPLERS, SPACINGS

    p.add_argument("--sampler", choices=SAMPLERS, help="the sampler (default: respaced ancestral for a learned-variance "
                   "model, ddim for a fixed one; see the README's sampler table)")
    p.add_argument("--schedule", choices=SPACINGS, help="spacing of the steps (default: the sampler's)")
    p.add_argument("--eta", type=float, help="stochasticity of ddim (default 0) and dpm++2m-sde (default 1)")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale s for a class-conditional "
                   "model trained with label dropout (1: the conditional model, 0: unconditional, > 1: sharper)")
    p.add_argument("--classifier", type=Path, metavar="PATH",
                   help="classifier guidance (Dhariwal & Nichol 2021) by a noisy classifier checkpoint written by "
                   "diffcore.guidance.save_classifier, trained on the model's noise schedule and image shape; "
                   "needs --class; works with every sampler, with conditional and unconditional models, and with "
                   "--guidance-scale")
    p.add_argument("--classifier-scale", type=float, metavar="S",
                   help="classifier guidance scale s >= 0 (default 1: the classifier's posterior; 0: unguided; "
                   "larger: more class-typical)")
    p.add_argument("--format", choices=("grid", "png", "npz"), default="grid",
                   help="grid: one PNG grid (default); png: --out is a folder of PNGs, one per image, named by the "
                   "image's index in the seed (--first-image + i, 6 digits or more; an existing file is never "
                   "replaced) for torch-fidelity / clean-fid; npz: uint8 [N, H, W, C] as arr_0, labels as arr_1")
    p.add_argument("--seed", type=int, default=0, help="seed of all noise (default 0)")
    p.add_argument("--first-image", type=int, default=0, metavar="K",
                   help="make images K .. K + n - 1 of the seed (default 0): shards with the same seed, each with its "
                   "own K, together give exactly the images (and labels) of one run; with --format png the files "
                   "are named by that global index, so shards can share one folder")
    p.add_argument("--class", "--label", dest="label", type=int, nargs="+",
                   help="class label(s), cycled over the images by their index in the seed (so a --first-image shard "
                   "gets the labels of one big run): of a class-conditional model (default: all classes "
                   "in turn; the null class K for unconditional) and/or the target of --classifier (required there)")
    p.add_argument("--out", type=Path, help="output: the PNG grid (default samples.png), the folder of PNGs "
                   "(default samples/) or the .npz (default samples.npz)")
    p.add_argument("--npz", type=Path, help="also write the images as uint8 [N, H, W, C] (arr_0, labels arr_1) to .npz")
    p.add_argument("--nrow", type=int, help="images per grid row (default: square grid)")
    p.add_argument("--no-clip", dest="clip", action="store_false",
                   help="do not clamp the denoised estimate x0_hat to [-1, 1] at each step (default: clamp)")
    add_overwrite_flag(p, "the --out grid or .npz and the --npz file (not with --format png, whose files are never "
                       "replaced)")
    p.set_defaults(run=run)


DEFAULT_OUT = {"grid": Path("samples.png"), "png": Path("samples"), "npz": Path("samples.npz")}


def _check(args: argparse.Namespace) -> None:
    if args.n < 1:
        raise UsageError(f"--n: expected >= 1, got {args.n}")
    if args.n > MAX_IMAGES:
        raise UsageError(f"--n: expected at most 2**32 (the images a seed numbers), got {args.n}")
    if not 0 <= args.first_image <= MAX_IMAGES - args.n:
        raise UsageError(f"--first-image: expected 0..2**32 - n = {MAX_IMAGES - args.n} (a seed numbers 2**32 "
                         f"images, this call makes --n {args.n}), got {args.first_image}")
    if args.fast and args.ancestral:
        raise UsageError("--fast and --ancestral exclude each other")
    if args.ancestral and args.sampler not in (None, "ancestral"):
        raise UsageError(f"--ancestral and --sampler {args.sampler} exclude each other")
    if args.eta is not None and not 0 <= args.eta < float("inf"):
        raise UsageError(f"--eta: expected a finite value >= 0, got {args.eta}")
    if args.guidance_scale is not None and not abs(args.guidance_scale) < float("inf"):
        raise UsageError(f"--guidance-scale: expected a finite number, got {args.guidance_scale}")
    if args.classifier_scale is not None:
        if args.classifier is None:
            raise UsageError("--classifier-scale: applies with --classifier")
        if not 0 <= args.classifier_scale < float("inf"):
            raise UsageError(f"--classifier-scale: expected a finite value >= 0, got {args.classifier_scale}")
    if args.classifier is not None and args.label is None:
        raise UsageError("--classifier: needs --class K [K ...], the target label(s) of the classifier guidance")
    batch_size_of(args)
    if args.nrow is not None and args.nrow < 1:
        raise UsageError(f"--nrow: expected >= 1, got {args.nrow}")
    args.out = args.out if args.out is not None else DEFAULT_OUT[args.format]
    if args.format == "png":
        if args.overwrite:
            raise UsageError("--overwrite: --format png never replaces a file (shards fill one folder); remove the "
                             "files or choose another --out")
        check_output_folder(args.out, "--out")
        _check_no_existing(_png_paths(args))
    else:
        check_output_file(args.out, "--out", args.overwrite, suffix=".png" if args.format == "grid" else ".npz")
    if args.npz:
        if args.npz.resolve() == args.out.resolve():
            raise UsageError("--npz: must differ from --out")
        check_output_file(args.npz, "--npz", args.overwrite, suffix=".npz")


def _labels(args: argparse.Namespace, num_classes, classifier_classes, device):
    """int64 ``[n]`` labels (the given ones cycled, or every class of a class-conditional model in turn), or None
    for an unconditional model without a classifier. ``classifier_classes``: K of ``--classifier`` (or None)."""
    import torch

    if num_classes is None:
        if args.guidance_scale is not None:
            raise UsageError("--guidance-scale: the model is not class-conditional (for classifier guidance of an "
                             "unconditional model use --classifier)")
        if classifier_classes is None:
            if args.label is not None:
                raise UsageError("--class: the model is not class-conditional (give a --classifier to guide it)")
            return None
    labels = args.label if args.label is not None else list(range(num_classes))
    if classifier_classes is not None:  # a target of the classifier (and a real class of a conditional model)
        top = classifier_classes if num_classes is None else min(classifier_classes, num_classes)
        expected = f"0..{top - 1} (the classifier has {classifier_classes} classes" + \
            (f", the model {num_classes})" if num_classes is not None else ")")
    else:
        top, expected = num_classes + 1, f"0..{num_classes} ({num_classes} = unconditional)"
    bad = [k for k in labels if not 0 <= k < top]
    if bad:
        raise UsageError(f"--class: expected labels in {expected}, got {bad}")
    image = torch.arange(args.first_image, args.first_image + args.n, dtype=torch.int64)  # the global indexes
    return torch.tensor(labels, dtype=torch.int64)[image % len(labels)].to(device)


def _guided_model(args: argparse.Namespace, loaded, labels, classifier):
    """(model, model_kwargs, compile) to sample with: the loaded model, wrapped for classifier-free guidance
    (--guidance-scale) and then classifier guidance (--classifier); a guided model is compiled inside the wrappers.
    The labels go in model_kwargs (``y`` for the model or the CFG wrapper, ``classifier_y`` for the classifier's
    targets), so that :func:`diffcore.sample` gives each batch its rows of them."""
    from ..guidance import classifier_free_guidance, classifier_guidance
    from ..runtime import compile_model

    model, kwargs, compile_ = loaded.model, {}, args.compile
    guided = args.guidance_scale is not None or classifier is not None
    if guided and compile_:  # the wrappers are not modules: compile the network inside them
        model, compile_ = compile_model(model), False
    if labels is not None and args.guidance_scale is not None:
        model = classifier_free_guidance(model, None, args.guidance_scale, null_class=loaded.num_classes)
    if labels is not None and loaded.num_classes is not None:  # the model's labels (or the CFG wrapper's)
        kwargs["y"] = labels
    if classifier is not None:
        scale = 1.0 if args.classifier_scale is None else args.classifier_scale
        model = classifier_guidance(model, classifier.classifier, None, scale, loaded.diffusion.alphas_cumprod,
                                    prediction_type=loaded.diffusion.prediction_type, label_kwarg="classifier_y")
        kwargs["classifier_y"] = labels
    return model, kwargs or None, compile_


def _png_paths(args: argparse.Namespace) -> list[Path]:
    """The files of ``--format png``: ``--out/NNNNNN.png`` named by the global image index (``--first-image`` + i,
    at least 6 digits), the same names whatever the shard."""
    return [args.out / f"{args.first_image + i:06d}.png" for i in range(args.n)]


def _check_no_existing(paths: list[Path]) -> None:
    """A UsageError when any of ``paths`` exists: per-image PNGs never replace a file (another shard's, an earlier
    run's or the user's own); diffcore deletes nothing, so the user removes them or picks another folder."""
    existing = [path for path in paths if os.path.lexists(path)]
    if existing:
        shown = ", ".join(path.name for path in existing[:3]) + (f" and {len(existing) - 3} more"
                                                                 if len(existing) > 3 else "")
        raise UsageError(f"--out: {len(existing)} of the {len(paths)} PNGs exist already in {paths[0].parent} "
                         f"({shown}); diffcore sample never replaces a file: choose another --out or --first-image, "
                         f"or remove them")


def _output_files(args: argparse.Namespace, images, labels) -> dict:
    """What to write: {path: bytes} for the chosen format (and --npz)."""
    pixels = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()  # [N, H, W, C]
    arrays = {"arr_0": pixels}
    if labels is not None:
        arrays["arr_1"] = labels.cpu().numpy()
    if args.format == "grid":
        files = {args.out: grid_png(images, nrow=args.nrow)}
    elif args.format == "png":
        files = {path: encode_png(p[..., 0] if p.shape[-1] == 1 else p) for path, p in zip(_png_paths(args), pixels)}
    else:
        files = {args.out: npz_bytes(**arrays)}
    if args.npz:
        files[args.npz] = npz_bytes(**arrays)
    return files


def run(args: argparse.Namespace) -> int:
    """Write the images of ``--n`` samples in ``--format`` (and the .npz), together or not at all."""
    from ..guidance import check_classifier_fits, load_classifier
    from ..pipelines.sample import DEFAULT_FAST_STEPS, sample
    from ..samplers import SAMPLER_INFO, default_sampler

    _check(args)
    started = time.perf_counter()
    loaded = load_model(args)
    device = loaded.diffusion.device
    T = loaded.diffusion.num_timesteps
    if args.steps is not None and not 1 <= args.steps <= T:
        raise UsageError(f"--steps: expected 1..{T} (the model's T), got {args.steps}")
    sampler = "ancestral" if args.ancestral else args.sampler or default_sampler(loaded.diffusion)
    if args.eta is not None and SAMPLER_INFO[sampler].eta_default is None and args.eta != 0:
        raise UsageError(f"--eta: the {sampler} sampler takes no eta (use ddim or dpm++2m-sde)")
    if args.steps is not None:
        steps = args.steps
    else:  # --ancestral: all T steps; otherwise the front door's few steps
        steps = None if args.ancestral else min(DEFAULT_FAST_STEPS, T)
    classifier = None
    if args.classifier is not None:
        classifier = load_classifier(args.classifier, device)
        check_classifier_fits(classifier, loaded.diffusion, loaded.image_shape)
    labels = _labels(args, loaded.num_classes, classifier.num_classes if classifier else None, device)
    model, kwargs, compile_ = _guided_model(args, loaded, labels, classifier)
    images = sample(model, n=args.n, steps=steps, sampler=sampler, schedule=args.schedule, eta=args.eta,
                    clip_denoised=args.clip,
                    seed=args.seed, device=device, diffusion=loaded.diffusion, image_shape=loaded.image_shape,
                    progress=args.progress, model_kwargs=kwargs, precision=args.precision, compile=compile_,
                    batch_size=args.batch_size, first_image=args.first_image)
    files = _output_files(args, images, labels)
    if args.format == "png":  # again: another process may have written into the folder meanwhile
        _check_no_existing(_png_paths(args))
    write_together(files, replace=args.overwrite)
    wrote = f"{args.out}" + (f" ({args.n} PNGs)" if args.format == "png" else "") + \
        (f" and {args.npz}" if args.npz else "")
    what = f"{sampler}, {steps or T} steps" + (f", eta {args.eta}" if args.eta is not None else "") + \
        (f", guidance scale {args.guidance_scale}" if args.guidance_scale is not None else "") + \
        (f", classifier guidance scale {1.0 if args.classifier_scale is None else args.classifier_scale}"
         if classifier is not None else "")
    from ..runtime import resolve_precision

    dtype = str(resolve_precision(args.precision, device)).replace("torch.", "")
    which = f"images {args.first_image}..{args.first_image + args.n - 1}" if args.first_image else f"{args.n} images"
    print(f"diffcore sample: wrote {wrote} ({which}, {what}, seed {args.seed}, model in {dtype}"
          f"{' (--precision auto)' if args.precision == 'auto' else ''}) in "
          f"{time.perf_counter() - started:.1f} s on {device}")
    return 0
