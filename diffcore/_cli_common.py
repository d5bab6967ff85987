"""What the ``diffcore`` subcommands share: the usage error, the device choice and model loading."""
from __future__ import annotations

import argparse
from typing import Optional

import torch

__all__ = ["UsageError", "_device", "_load"]


class UsageError(ValueError):
    """A bad command-line value."""


def _device(name: Optional[str]) -> torch.device:
    """``--device`` as a torch.device (default: cuda if available, else cpu)."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load(args: argparse.Namespace):
    """(model, diffusion, image_shape, num_classes) from --checkpoint or the packaged model, on --device."""
    device = _device(args.device)
    if args.checkpoint is not None:
        from .train import load_trained_model

        if not args.checkpoint.exists():
            raise FileNotFoundError(f"--checkpoint: no such file or folder {args.checkpoint}")
        trained = load_trained_model(args.checkpoint, use_ema=not args.raw_weights, device=device)
        return trained.model, trained.diffusion, trained.image_shape, trained.config.model.num_classes
    from .sampling import _load_default_model

    model, diffusion, shape = _load_default_model(device)
    if isinstance(model, torch.nn.Module):
        model = model.to(device)
    config = getattr(model, "config", None)
    return model, diffusion.to(device), shape, getattr(config, "num_classes", None)
