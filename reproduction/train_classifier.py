"""Train the Fashion-MNIST feature classifier deterministically and write its weights.

    python -m reproduction.train_classifier --out diffcore/assets/fmnist_classifier.safetensors

Single-threaded, fixed seed, ``torch.use_deterministic_algorithms(True)``: the same machine and torch version give
the same weights. The test accuracy, training time and the command are recorded in the file's metadata. The run
refuses to write weights whose test accuracy is below ``--min-accuracy`` (0.9).
Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package (nothing is downloaded).
"""
from __future__ import annotations

import argparse
import math
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from diffcore.data import load_fashion_mnist
from diffcore.metrics.classifier import FashionMNISTClassifier, prepare_images, save_weights


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m reproduction.train_classifier", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where to write the .safetensors weights")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, cosine decay, 1 epoch warmup)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", default=None, help="Fashion-MNIST folder (default: Debian's datasets folder)")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training images (smoke runs)")
    p.add_argument("--test-limit", type=int, default=None, help="measure accuracy on the first N test images only")
    p.add_argument("--min-accuracy", type=float, default=0.9, help="refuse to write weights below this test accuracy")
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars")
    return p.parse_args(argv)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Fraction of ``images`` (float ``[N, 1, 28, 28]`` in [-1, 1]) whose argmax logit equals ``labels`` int64 [N]."""
    model.eval()
    correct = sum(int((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
                  for i in range(0, images.shape[0], batch_size))
    return correct / images.shape[0]


@dataclass(frozen=True)
class TrainResult:
    """A trained classifier (eval mode), its test accuracy in [0, 1], training wall time in seconds, and the number
    of training and test images used."""

    model: FashionMNISTClassifier
    test_accuracy: float
    seconds: float
    train_images: int
    test_images: int


def train(args: argparse.Namespace) -> TrainResult:
    """Train per ``args`` (see ``--help``); the accuracy is measured on the test split (its first ``--test-limit``
    images when given).

    Runs single-threaded with deterministic algorithms and restores both process-wide settings afterwards.
    """
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        return _train(args)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(args: argparse.Namespace) -> TrainResult:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    x_train, y_train = load_fashion_mnist("train", root=args.root)
    x_test, y_test = load_fashion_mnist("test", root=args.root)
    if args.train_limit is not None:
        x_train, y_train = x_train[:args.train_limit], y_train[:args.train_limit]
    if args.test_limit is not None:
        x_test, y_test = x_test[:args.test_limit], y_test[:args.test_limit]
    x_train, x_test = prepare_images("train images", x_train), prepare_images("test images", x_test)
    y_train, y_test = torch.as_tensor(y_train), torch.as_tensor(y_test)

    model = FashionMNISTClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(x_train.shape[0] / args.batch_size)
    total = args.epochs * steps_per_epoch
    warmup = steps_per_epoch

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    start = time.perf_counter()
    bar = tqdm(total=total, desc="train classifier", disable=args.no_progress)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(x_train.shape[0], generator=gen)
        for i in range(0, x_train.shape[0], args.batch_size):
            idx = order[i:i + args.batch_size]
            xb, yb = x_train[idx], y_train[idx]
            flip = torch.rand(xb.shape[0], generator=gen) < 0.5  # horizontal flips keep every class valid
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    bar.close()
    seconds = time.perf_counter() - start
    acc = accuracy(model, x_test, y_test)
    return TrainResult(model.eval(), acc, seconds, x_train.shape[0], x_test.shape[0])


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (1 when the accuracy is below ``--min-accuracy``)."""
    args = _parse(argv)
    result = train(args)
    model, acc, seconds = result.model, result.test_accuracy, result.seconds
    print(f"test accuracy {acc:.4f} after {args.epochs} epochs, {seconds:.0f} s of training")
    if acc < args.min_accuracy:
        print(f"not writing {args.out}: accuracy {acc:.4f} < --min-accuracy {args.min_accuracy}", file=sys.stderr)
        return 1
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = "python -m reproduction.train_classifier " + shlex.join(argv_list)
    save_weights(model, args.out, {
        "test_accuracy": f"{acc:.4f}", "train_seconds": f"{seconds:.0f}", "command": command,
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
        "seed": args.seed, "train_images": result.train_images,
        "test_images": result.test_images, "torch_version": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "input": "float32 [N,1,28,28] in [-1,1] (pixel/127.5-1)",
        "features": "128-d pre-ReLU output of the penultimate linear layer (embed)",
    })
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
