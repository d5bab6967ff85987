"""``diffcore train``: build a TrainConfig from ``--config`` and the flags, then train (or resume)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from .common import UsageError, check_output_folder, resolve_device

_TRAIN_FIELDS: list[tuple[str, Any, str]] = [
    ("data", str, "training data, picked by what it is: 'fashion_mnist' (IDX files of Debian's "
                  "dataset-fashion-mnist package), 'synthetic', a folder of (Fashion-)MNIST IDX files or a "
                  ".npy/.npz file (in memory); an image folder (recursive; labels from sub-folders or labels.csv), "
                  "tar shards in the WebDataset layout ('shards/shard-{000000..000099}.tar', a glob or a folder "
                  "of .tar files) or a folder from `diffcore pack` (streamed, decoded in --num-workers workers)"),
    ("image_size", int, "resize and centre-crop image-folder and shard images to this many pixels"),
    ("num_workers", int, "worker processes decoding streamed data (0: in the training process); the batches, "
                         "and so a resumed run, do not depend on it"),
    ("wandb_project", str, "also log to this Weights & Biases project (needs the wandb package)"),
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
    ("max_nonfinite_steps", int, "stop with an error after this many consecutive steps whose loss or gradient is "
                                 "NaN/inf (such steps are skipped; nothing non-finite is ever saved)"),
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


def register(sub) -> None:
    """Add the ``train`` subcommand to the subparsers ``sub``."""
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
    train.add_argument("--skip-bad-images", action="store_true", default=None,
                       help="replace unreadable images of streamed data by the next good one and count them in the "
                       "log (default: stop with an error naming the file)")
    train.add_argument("--tensorboard", action="store_true", default=None,
                       help="also write TensorBoard events (losses, lr, grad norm, images/s, sample grids) to "
                       "OUT_DIR/tensorboard (needs the tensorboard package)")
    train.add_argument("--ema-warmup", action="store_true", default=None,
                       help="ramp the EMA decay up as min(ema_rate, (1 + n) / (10 + n)) (for short runs)")
    train.add_argument("--no-bf16", dest="bf16", action="store_false", default=None,
                       help="no bf16 autocast on CUDA (it is never used on the CPU)")
    train.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    train.add_argument("--no-resume", action="store_true", help="refuse to continue an existing run: an error if "
                       "--out-dir already holds checkpoints (default: resume from them)")
    train.add_argument("--device", help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    train.add_argument("--print-config", action="store_true", help="print the resulting configuration and exit")
    train.set_defaults(run=run)


def _train_config(args: argparse.Namespace):
    from ..train import TrainConfig
    from ..types import as_variance_type
    from ..unet import UNetConfig

    if args.config and not args.config.is_file():
        raise FileNotFoundError(f"--config: no such file {args.config}")
    try:
        base = TrainConfig.from_json(args.config.read_text(encoding="utf-8")) if args.config else TrainConfig()
    except (ValueError, TypeError, KeyError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UsageError(f"--config: {args.config} is not a TrainConfig JSON file: {error}") from None
    changes = {name: getattr(args, name) for name, _, _ in _TRAIN_FIELDS if getattr(args, name) is not None}
    for flag in ("hflip", "ema_warmup", "bf16", "progress", "skip_bad_images", "tensorboard"):
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


def run(args: argparse.Namespace) -> int:
    """``diffcore train``: build the TrainConfig from --config and the flags, then train (or resume)."""
    from ..train import Trainer

    config = _train_config(args)
    if args.print_config:
        print(config.to_json())
        return 0
    check_output_folder(Path(config.out_dir), "--out-dir")
    if args.no_resume:
        from ..checkpoint import latest_checkpoint

        folder = Path(config.out_dir) / "checkpoints"
        if folder.is_dir() and latest_checkpoint(folder) is not None:
            raise UsageError(f"--no-resume: {folder} already holds checkpoints; choose another --out-dir or delete it")
    trainer = Trainer(config, device=None if args.device is None else resolve_device(args.device))
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
