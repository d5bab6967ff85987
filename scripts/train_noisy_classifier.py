#!/usr/bin/env python
"""Train a noisy classifier p(y | x_t, t) for classifier guidance and write it where ``diffcore sample --classifier``
reads it.

    python scripts/train_noisy_classifier.py --out runs/fmnist_classifier --threads 1
    diffcore sample --classifier runs/fmnist_classifier --class 7 --classifier-scale 3

The classifier is trained under the noise schedule of the diffusion model it will guide (``--model PATH``, or the
packaged model: the same T and abar table) on the training split of ``--data`` (default: Fashion-MNIST from Debian's
dataset-fashion-mnist package, as ``diffcore train`` finds it), then its accuracy on the held-out split is printed at
the noise levels t = 0, T/2 and T-1, and it is written with :func:`diffcore.guidance.save_classifier` (atomically; an
existing classifier is replaced only with ``--overwrite``). Everything here is wiring of library functions.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from diffcore import checkpoint as ck
from diffcore.cli.common import UsageError, add_model_flags, check_output_folder, load_model
from diffcore.data import open_dataset, to_model_batch
from diffcore.guidance import NoisyClassifier, save_classifier, train_noisy_classifier
from diffcore.guidance.noisy_classifier import noisy_accuracy
from diffcore.unet import UNetConfig


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The script's flags (``--model`` and the other model flags are those of ``diffcore sample``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_flags(p, steps_help="training steps (AdamW, one batch each; default 1500)")
    p.set_defaults(steps=1500)
    p.add_argument("--out", type=Path, required=True, help="the classifier checkpoint folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace a classifier checkpoint already at --out")
    p.add_argument("--data", default="fashion_mnist",
                   help="labelled images, as `diffcore train --data` (default fashion_mnist): synthetic, an IDX "
                   "folder, an .npz/.npy, an image folder (labels from sub-folders); the 'test' split is held out")
    p.add_argument("--pad-to", type=int, help="pad the data's images with black to this size (e.g. 28 -> 32)")
    p.add_argument("--batch-size", type=int, default=64, help="images per training step (default 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default 0.05)")
    p.add_argument("--width", type=int, default=16, help="channels of the first level (model_channels; default 16)")
    p.add_argument("--channel-mult", type=int, nargs="+", default=[1, 2, 2],
                   help="width multiple per level (default 1 2 2)")
    p.add_argument("--num-res-blocks", type=int, default=1, help="residual blocks per level (default 1)")
    p.add_argument("--eval-n", type=int, default=2000,
                   help="held-out images the accuracy is measured on (default 2000; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, batches, timesteps and noise (default 0)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Train, evaluate and write the classifier; returns the exit status (2 for a usage error)."""
    import torch

    args = parse_args(argv)
    try:
        for flag, value, low in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                                 ("--width", args.width, 1), ("--num-res-blocks", args.num_res_blocks, 1),
                                 ("--eval-n", args.eval_n, 0)):
            if value < low:
                raise UsageError(f"{flag}: expected >= {low}, got {value}")
        check_output_folder(args.out, "--out")
        if args.out.exists():
            if not ck.is_checkpoint(args.out):
                raise UsageError(f"--out: {args.out} exists and is not a diffcore checkpoint; choose a new folder")
            if not args.overwrite:
                raise UsageError(f"--out: {args.out} is a checkpoint already (pass --overwrite to replace it)")
        loaded = load_model(args)  # --model / packaged, --device, --threads
        diffusion, (channels, height, width) = loaded.diffusion, loaded.image_shape
        if height != width:
            raise UsageError(f"--model: the classifier needs square images, the model makes {height}x{width}")
        size = height if args.pad_to is None else None
        train = open_dataset(args.data, split="train", image_size=size, channels=channels, pad_to=args.pad_to)
        test = open_dataset(args.data, split="test", image_size=size, channels=channels, pad_to=args.pad_to)
        images = to_model_batch(train.images, pad_to=train.pad_to)
        if tuple(images.shape[1:]) != (channels, height, width):
            raise UsageError(f"--data: its images are {'x'.join(map(str, images.shape[1:]))}, the model makes "
                             f"{channels}x{height}x{width} (use --pad-to or another --model)")
        num_classes = int(train.labels.max()) + 1
        config = UNetConfig(in_channels=channels, model_channels=args.width, channel_mult=tuple(args.channel_mult),
                            num_res_blocks=args.num_res_blocks, attention_resolutions=(), image_size=height,
                            num_classes=num_classes, use_scale_shift_norm=True)
    except (UsageError, ValueError, OSError) as error:
        print(f"train_noisy_classifier: {error}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    device = diffusion.device
    classifier = NoisyClassifier(config).to(device)
    abar = diffusion.alphas_cumprod.detach().to("cpu", torch.float64)
    params = sum(p.numel() for p in classifier.parameters())
    print(f"training a {params:,}-parameter noisy classifier ({num_classes} classes, {height}x{width}, T = "
          f"{abar.numel()}) on {len(train)} images of {args.data} for {args.steps} steps of {args.batch_size}")
    started = time.perf_counter()
    losses = train_noisy_classifier(classifier, images, train.labels, abar, steps=args.steps,
                                    batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                                    seed=args.seed, progress=args.progress)
    seconds = time.perf_counter() - started
    tail = losses[-min(100, losses.numel()):].mean()
    print(f"trained in {seconds:.0f} s ({1000 * seconds / args.steps:.0f} ms/step); cross-entropy over the last "
          f"{min(100, losses.numel())} steps {float(tail):.3f} nats")
    if args.eval_n:
        T = abar.numel()
        levels = sorted({0, T // 2, T - 1})
        held_out = to_model_batch(test.images[:args.eval_n], pad_to=test.pad_to)
        accuracy = noisy_accuracy(classifier, held_out, test.labels[:args.eval_n], abar, levels, seed=args.seed)
        print(f"held-out accuracy ({held_out.shape[0]} {args.data} test images; chance {1 / num_classes:.2f}): "
              + ", ".join(f"t = {t}: {a:.3f}" for t, a in zip(levels, accuracy)))
    path = save_classifier(args.out, classifier, abar, image_shape=(channels, height, width), step=args.steps,
                           overwrite=args.overwrite)
    print(f"wrote {path}; use it with: diffcore sample --classifier {path} --class K --classifier-scale S"
          + (f" --model {args.checkpoint}" if args.checkpoint is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
