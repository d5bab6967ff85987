"""The ``diffcore`` command line.

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

Every subcommand has ``--help``. Errors in the input (missing files, bad values, incompatible checkpoints)
print one line ``diffcore <command>: error: ...`` and exit with status 2; ``--traceback`` shows the traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .checkpoint import CheckpointError
from ._cli_common import UsageError, _device, _load
from ._cli_eval import _add_eval_parser, cmd_eval
from ._cli_restore import _add_restore_parser, cmd_restore

# (TrainConfig field, argparse type, help). Flags left out keep the value of --config (or the default).
_TRAIN_FIELDS: list[tuple[str, Any, str]] = [
    ("data", str, "training data: 'fashion_mnist' (IDX files of Debian's dataset-fashion-mnist package), "
                  "'synthetic', an image folder (PNG/JPEG), a folder of (Fashion-)MNIST IDX files, "
                  "or a .npy/.npz file"),
    ("image_size", int, "resize and centre-crop image-folder images to this many pixels"),
    ("pad_to", int, "pad images with black to this many pixels (e.g. 28 -> 32 for a 32px U-Net)"),
    ("class_dropout", float, "class-conditional models: probability of training with the null class (for "
                             "classifier-free guidance)"),
    ("schedule", str, "noise schedule: linear, cosine, scaled_linear or sigmoid"),
    ("num_timesteps", int, "number of diffusion steps T"),
    ("prediction_type", str, "what the model predicts: eps, x0 or v"),
    ("variance_type", str, "fixed_small, fixed_large, learned_range (I-DDPM) or learned; the model's learn_sigma "
                           "follows it"),
    ("loss_type", str, "mse, rescaled_mse (with a learned variance: the I-DDPM hybrid loss), kl or rescaled_kl"),
    ("timestep_sampler", str, "uniform, or loss-second-moment (I-DDPM importance sampling)"),
    ("batch_size", int, "images per optimizer step over all processes"),
    ("micro_batch_size", int, "images per forward pass in one process (gradient accumulation)"),
    ("lr", float, "AdamW learning rate"),
    ("weight_decay", float, "AdamW weight decay"),
    ("warmup_steps", int, "linear learning-rate warm-up over this many steps"),
    ("grad_clip", float, "clip the gradient norm to this (0 disables clipping)"),
    ("ema_rate", float, "decay of the exponential moving average of the weights (the EMA model samples)"),
    ("total_steps", int, "optimizer steps of the whole run (resuming continues up to it)"),
    ("seed", int, "seed of the initial weights, data order, timesteps and noise"),
    ("out_dir", str, "output folder: log.jsonl, loss.png, samples/ and checkpoints/"),
    ("log_every", int, "write a log line every this many steps"),
    ("checkpoint_every", int, "write a checkpoint every this many steps (a killed run loses at most these)"),
    ("sample_every", int, "write an EMA sample grid every this many steps (0: never)"),
    ("sample_n", int, "images per sample grid"),
    ("sample_steps", int, "DDIM steps for the sample grids"),
    ("keep_checkpoints", int, "keep this many recent checkpoints (0 keeps all)"),
]
_MODEL_FIELDS: list[tuple[str, Any, str]] = [
    ("in_channels", int, "image channels: 1 (grayscale) or 3 (RGB); image folders are converted to it"),
    ("model_channels", int, "U-Net base width"),
    ("channel_mult", str, "U-Net width multipliers per level, comma-separated (e.g. 1,2,2)"),
    ("num_res_blocks", int, "residual blocks per level"),
    ("attention_resolutions", str, "feature-map sizes (pixels) with self-attention, comma-separated (empty: none)"),
    ("dropout", float, "dropout in the residual blocks"),
    ("num_heads", int, "attention heads"),
    ("num_classes", int, "class-conditional model with this many classes (the data's labels)"),
]


_CHOICES = {"schedule": ["linear", "cosine", "scaled_linear", "sigmoid"], "prediction_type": ["eps", "x0", "v"],
            "variance_type": ["fixed_small", "fixed_large", "learned_range", "learned"],
            "loss_type": ["mse", "rescaled_mse", "kl", "rescaled_kl"],
            "timestep_sampler": ["uniform", "loss-second-moment"], "in_channels": [1, 3]}


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--{name.replace('_', '-')}: expected comma-separated integers, got {text!r}") from None


# ------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``diffcore`` command (subcommands train, sample, invert, interpolate, export,
    restore, eval, info)."""
    parser = argparse.ArgumentParser(prog="diffcore", description="Denoising diffusion models (DDPM, I-DDPM, DDIM) "
                                     "on fused kernels: train, sample, invert, interpolate, restore (DPS), evaluate.")
    parser.add_argument("--traceback", action="store_true", help="show Python tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train a model (DDP under torchrun)",
                           description="Train a diffusion U-Net. Defaults: the I-DDPM recipe on Fashion-MNIST "
                           "(cosine schedule, learned_range variance, hybrid loss, EMA). Re-running with the same "
                           "--out-dir resumes from its latest checkpoint.")
    train.add_argument("--config", type=Path, help="a TrainConfig JSON file (e.g. a checkpoint's config.json); the "
                       "flags below override it")
    train.add_argument("--preset", choices=["fashion_mnist_small", "cifar10"],
                       help="U-Net preset to start from (default: the config's model, else fashion_mnist_small)")
    for name, kind, text in _TRAIN_FIELDS + _MODEL_FIELDS:
        train.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None, help=text,
                           choices=_CHOICES.get(name))
    train.add_argument("--steps", dest="total_steps", type=int, help="alias of --total-steps")
    train.add_argument("--hflip", action="store_true", default=None, help="random horizontal flips")
    train.add_argument("--ema-warmup", action="store_true", default=None,
                       help="ramp the EMA decay up as min(ema_rate, (1 + n) / (10 + n)) (for short runs)")
    train.add_argument("--no-bf16", dest="bf16", action="store_false", default=None,
                       help="no bf16 autocast on CUDA (it is never used on the CPU)")
    train.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    train.add_argument("--no-resume", action="store_true", help="refuse to continue an existing run: an error if "
                       "--out-dir already holds checkpoints (default: resume from them)")
    train.add_argument("--device", help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    train.add_argument("--print-config", action="store_true", help="print the resulting configuration and exit")

    def model_source(p: argparse.ArgumentParser, steps_help: str = "DDIM steps (default 50, at most T)") -> None:
        p.add_argument("--checkpoint", type=Path, help="a checkpoint directory, a folder of checkpoints or a run's "
                       "--out-dir (default: the packaged model)")
        p.add_argument("--raw-weights", action="store_true", help="use the trained weights instead of the EMA ones")
        p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
        p.add_argument("--steps", type=int, help=steps_help)
        p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    sample = sub.add_parser("sample", help="generate images (PNG grid and/or .npz)",
                            description="Generate images with DDIM (default) or ancestral sampling.")
    model_source(sample)
    sample.add_argument("--n", type=int, default=16, help="number of images (default 16)")
    sample.add_argument("--fast", action="store_true", help="DDIM with few steps (the default; kept for clarity)")
    sample.add_argument("--ancestral", action="store_true", help="ancestral DDPM sampling instead of DDIM (all T "
                        "steps, or a respaced process with --steps)")
    sample.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (0: deterministic)")
    sample.add_argument("--seed", type=int, default=0, help="seed of all noise (default 0)")
    sample.add_argument("--label", type=int, help="class label for a class-conditional model (default: cycle)")
    sample.add_argument("--out", type=Path, default=Path("samples.png"), help="PNG grid to write")
    sample.add_argument("--npz", type=Path, help="also write the images as uint8 [N, H, W, C] ('images') to .npz")
    sample.add_argument("--nrow", type=int, help="images per grid row (default: square grid)")

    invert = sub.add_parser("invert", help="DDIM inversion of images to latents x_T",
                            description="Map images to DDIM latents (deterministic, eta = 0) and optionally "
                            "reconstruct them from the latents.")
    model_source(invert)
    invert.add_argument("inputs", nargs="+", type=Path, help="image files, image folders or .npy/.npz files")
    invert.add_argument("--out", type=Path, default=Path("latents.npz"), help=".npz to write ('latents' float32)")
    invert.add_argument("--reconstruction", type=Path, help="reconstruct from the latents and write a PNG grid "
                        "(first row: inputs, second row: reconstructions); prints the MSE")

    interp = sub.add_parser("interpolate", help="slerp between two latents and decode",
                            description="Spherical interpolation between the x_T of two seeds, decoded with DDIM.")
    model_source(interp)
    interp.add_argument("--seeds", type=int, nargs=2, default=[0, 1], metavar=("A", "B"), help="the two seeds")
    interp.add_argument("--num", type=int, default=8, help="images along the path, ends included (default 8)")
    interp.add_argument("--label", type=int, help="class label for a class-conditional model")
    interp.add_argument("--out", type=Path, default=Path("interpolation.png"), help="PNG strip to write")

    export = sub.add_parser("export", help="write a checkpoint's EMA weights as a small sampling-only checkpoint",
                            description="Copy the (EMA) weights and config of a checkpoint, without optimizer "
                            "state, into a new checkpoint directory (what the packaged model ships).")
    export.add_argument("checkpoint", type=Path, help="checkpoint directory, folder of checkpoints or run folder")
    export.add_argument("out", type=Path, help="directory to create")
    export.add_argument("--raw-weights", action="store_true", help="export the trained weights instead of the EMA")

    _add_restore_parser(sub, model_source)
    _add_eval_parser(sub, model_source)

    sub.add_parser("info", help="build, kernels and devices (JSON)",
                   description="Print what was built (C++/CUDA kernels), which devices are visible and versions.")
    return parser


# ------------------------------------------------------------------------------------------------ commands
def _train_config(args: argparse.Namespace):
    from .train import TrainConfig
    from .types import as_variance_type
    from .unet import UNetConfig

    if args.config and not args.config.is_file():
        raise FileNotFoundError(f"--config: no such file {args.config}")
    base = TrainConfig.from_json(args.config.read_text()) if args.config else TrainConfig()
    changes = {name: getattr(args, name) for name, _, _ in _TRAIN_FIELDS if getattr(args, name) is not None}
    for flag in ("hflip", "ema_warmup", "bf16", "progress"):
        if getattr(args, flag) is not None:
            changes[flag] = getattr(args, flag)
    if changes.get("grad_clip") == 0:
        changes["grad_clip"] = None
    if changes.get("keep_checkpoints") == 0:
        changes["keep_checkpoints"] = None
    model = base.model.to_dict()
    if args.preset:
        model = getattr(UNetConfig, args.preset)().to_dict()
    for name, kind, _ in _MODEL_FIELDS:
        value = getattr(args, name)
        if value is not None:
            model[name] = _ints(value, name) if kind is str else value
    if changes.get("pad_to") or changes.get("image_size"):
        model["image_size"] = changes.get("pad_to") or changes["image_size"]
    variance = changes.get("variance_type", base.variance_type)
    model["learn_sigma"] = as_variance_type(variance).is_learned
    if model.get("num_classes") is None:
        model["num_classes"] = None
    changes["model"] = UNetConfig.from_dict(model)
    return base.replace(**changes)


def cmd_train(args: argparse.Namespace) -> int:
    """``diffcore train``: build the TrainConfig from --config and the flags, then train (or resume)."""
    from .train import Trainer

    config = _train_config(args)
    if args.print_config:
        print(config.to_json())
        return 0
    if args.no_resume:
        from .checkpoint import latest_checkpoint

        folder = Path(config.out_dir) / "checkpoints"
        if folder.is_dir() and latest_checkpoint(folder) is not None:
            raise UsageError(f"--no-resume: {folder} already holds checkpoints; choose another --out-dir or delete it")
    trainer = Trainer(config, device=args.device)
    if trainer.is_main:
        verb = f"resuming at step {trainer.step}" if trainer.step else "starting"
        print(f"diffcore train: {verb}; {sum(p.numel() for p in trainer.model.parameters()):,} parameters, "
              f"world size {trainer.world_size}, device {trainer.device}, output in {config.out_dir}", flush=True)
    started = time.perf_counter()
    try:
        trainer.train()
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if trainer.is_main:
        print(f"diffcore train: reached step {trainer.step} in {time.perf_counter() - started:.1f} s; checkpoints in "
              f"{trainer.checkpoint_dir}")
    return 0


def _steps(args: argparse.Namespace, diffusion) -> tuple[int, str]:
    steps = args.steps if args.steps is not None else min(50, diffusion.num_timesteps)
    if steps < 1 or steps > diffusion.num_timesteps:
        raise UsageError(f"--steps: expected 1..{diffusion.num_timesteps} (the model's T), got {steps}")
    return steps, ("uniform" if diffusion.num_timesteps % steps == 0 else "even")


def _labels(label: Optional[int], n: int, num_classes: Optional[int], device: torch.device) -> Optional[dict]:
    if num_classes is None:
        if label is not None:
            raise UsageError("--label: the model is not class-conditional")
        return None
    if label is not None and not 0 <= label <= num_classes:
        raise UsageError(f"--label: expected 0..{num_classes} ({num_classes} = unconditional), got {label}")
    y = torch.full((n,), label, device=device) if label is not None else torch.arange(n, device=device) % num_classes
    return {"y": y}


def _to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    import io

    from .checkpoint import atomic_write_bytes

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())


def cmd_sample(args: argparse.Namespace) -> int:
    """``diffcore sample``: write a PNG grid (and optionally an .npz) of generated images."""
    from .sampling import sample, save_image_grid

    if args.n < 1:
        raise UsageError(f"--n: expected >= 1, got {args.n}")
    if args.fast and args.ancestral:
        raise UsageError("--fast and --ancestral exclude each other")
    if args.eta < 0:
        raise UsageError(f"--eta: expected >= 0, got {args.eta}")
    started = time.perf_counter()
    model, diffusion, shape, num_classes = _load(args)
    device = _device(args.device)
    kwargs = _labels(args.label, args.n, num_classes, device)
    if args.ancestral:
        steps = args.steps
        if steps is not None and not 1 <= steps <= diffusion.num_timesteps:
            raise UsageError(f"--steps: expected 1..{diffusion.num_timesteps}, got {steps}")
        what = f"ancestral, {steps or diffusion.num_timesteps} steps"
    else:
        steps, _ = _steps(args, diffusion)
        what = f"DDIM, {steps} steps, eta {args.eta}"
    images = sample(model, n=args.n, fast=not args.ancestral, steps=steps, eta=args.eta, seed=args.seed,
                    device=device, diffusion=diffusion, image_shape=shape, progress=args.progress,
                    model_kwargs=kwargs)
    save_image_grid(images, args.out, nrow=args.nrow)
    if args.npz:
        extra = {"labels": kwargs["y"].cpu().numpy()} if kwargs else {}
        _save_npz(args.npz, images=_to_uint8_nhwc(images), **extra)
    wrote = f"{args.out}" + (f" and {args.npz}" if args.npz else "")
    print(f"diffcore sample: wrote {wrote} ({args.n} images, {what}, seed {args.seed}) in "
          f"{time.perf_counter() - started:.1f} s on {device}")
    return 0


def _read_inputs(paths: Sequence[Path], shape: tuple[int, ...]) -> torch.Tensor:
    from PIL import Image

    from .data import IMAGE_EXTENSIONS, ImageDataset, center_crop_resize, load_array, load_image_folder

    channels, size = int(shape[0]), int(shape[-1])
    parts = []
    for path in paths:
        if path.is_dir():
            parts.append(load_image_folder(path, size, channels)[0])
        elif path.suffix in (".npy", ".npz"):
            arrays = load_array(path)[0]
            if tuple(arrays.shape[1:]) != (channels, size, size):
                raise ValueError(f"{path}: expected images of shape {(channels, size, size)}, got "
                                 f"{tuple(arrays.shape[1:])}")
            parts.append(arrays)
        elif path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            try:
                with Image.open(path) as image:
                    image = center_crop_resize(image.convert("RGB" if channels == 3 else "L"), size)
            except OSError as error:
                raise ValueError(f"{path}: unreadable image: {error}") from error
            parts.append(torch.from_numpy(np.asarray(image).reshape(size, size, channels)).permute(2, 0, 1)[None])
        else:
            raise FileNotFoundError(f"{path}: not an image file, image folder or .npy/.npz file")
    images = torch.cat(parts)
    return ImageDataset(images).batch(torch.arange(images.shape[0]))[0]


def cmd_invert(args: argparse.Namespace) -> int:
    """``diffcore invert``: DDIM-invert images to latents (.npz), optionally reconstructing them."""
    from .samplers import ddim_invert, ddim_sample
    from .sampling import save_image_grid

    started = time.perf_counter()
    model, diffusion, shape, num_classes = _load(args)
    if num_classes is not None:
        raise UsageError("invert: class-conditional models are not supported by this command")
    device = _device(args.device)
    x0 = _read_inputs(args.inputs, shape).to(device)
    steps, skip = _steps(args, diffusion)
    latents = ddim_invert(model, diffusion, x0, steps=steps, skip_type=skip, progress=args.progress)
    _save_npz(args.out, latents=latents.sample.float().cpu().numpy(),
              timesteps=np.asarray(latents.timesteps, dtype=np.int64))
    message = f"diffcore invert: wrote {args.out} ({x0.shape[0]} latents, {steps} DDIM steps)"
    if args.reconstruction:
        recon = ddim_sample(model, diffusion, x_T=latents.sample, steps=steps, skip_type=skip, eta=0.0,
                            progress=args.progress).sample.float()
        mse = float(((recon - x0) ** 2).mean())
        save_image_grid(torch.cat([x0, recon.clamp(-1, 1)]), args.reconstruction, nrow=x0.shape[0])
        message += f" and {args.reconstruction} (reconstruction MSE {mse:.3e} on [-1, 1] pixels)"
    print(f"{message} in {time.perf_counter() - started:.1f} s")
    return 0


def cmd_interpolate(args: argparse.Namespace) -> int:
    """``diffcore interpolate``: decode a slerp path between the x_T of two seeds into a PNG strip."""
    from .samplers import ddim_sample, initial_noise, slerp_path
    from .sampling import save_image_grid

    if args.num < 2:
        raise UsageError(f"--num: expected >= 2, got {args.num}")
    started = time.perf_counter()
    model, diffusion, shape, num_classes = _load(args)
    device = _device(args.device)
    z0, z1 = (initial_noise((1, *shape), seed, device=device)[0] for seed in args.seeds)
    steps, skip = _steps(args, diffusion)
    kwargs = _labels(args.label, args.num, num_classes, device)
    if kwargs is not None and args.label is None:
        kwargs["y"].fill_(0)
    images = ddim_sample(model, diffusion, x_T=slerp_path(z0, z1, args.num), steps=steps, skip_type=skip, eta=0.0,
                         model_kwargs=kwargs, clip_denoised=True, progress=args.progress).sample
    save_image_grid(images.float().clamp(-1, 1), args.out, nrow=args.num)
    print(f"diffcore interpolate: wrote {args.out} ({args.num} images from seed {args.seeds[0]} to "
          f"{args.seeds[1]}, {steps} DDIM steps) in {time.perf_counter() - started:.1f} s")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``diffcore export``: write a sampling-only checkpoint (EMA weights and config)."""
    from .train import export_model

    if not args.checkpoint.exists():
        raise FileNotFoundError(f"checkpoint: no such file or folder {args.checkpoint}")
    path = export_model(args.checkpoint, args.out, use_ema=not args.raw_weights)
    size = sum(p.stat().st_size for p in path.iterdir())
    print(f"diffcore export: wrote {path} ({size / 1e6:.1f} MB)")
    return 0


def info() -> dict[str, Any]:
    """Versions, build information of the C++/CUDA extension, fused-kernel availability per device type, the
    visible devices and whether a packaged default model is installed."""
    import importlib.util
    import platform

    from . import __version__, build_info
    from ._extension import has_fused_kernels

    cuda = torch.cuda.is_available()
    devices = [{"index": i, "name": torch.cuda.get_device_name(i),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
               for i in range(torch.cuda.device_count())] if cuda else []
    ops = list(build_info().get("ops", []))
    return {"diffcore": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "build": build_info(),
            "kernels": {"cpu": has_fused_kernels("cpu"), "cuda": has_fused_kernels("cuda") if cuda else False,
                        "ops": ops},
            "devices": {"cuda_available": cuda, "cuda_version": torch.version.cuda, "gpus": devices,
                        "cpu_threads": torch.get_num_threads()},
            "packaged_model": importlib.util.find_spec(f"{__package__}.pretrained") is not None}


def cmd_info(args: argparse.Namespace) -> int:
    """``diffcore info``: print :func:`info` as JSON."""
    print(json.dumps(info(), indent=2, default=str))
    return 0


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "invert": cmd_invert, "interpolate": cmd_interpolate,
            "export": cmd_export, "restore": cmd_restore, "eval": cmd_eval, "info": cmd_info}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``diffcore`` console script; returns the exit status (0 ok, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (UsageError, ValueError, TypeError, FileNotFoundError, CheckpointError, RuntimeError) as error:
        if args.traceback:
            raise
        print(f"diffcore {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
