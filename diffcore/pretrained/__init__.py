"""The packaged default model: a Fashion-MNIST U-Net trained with the I-DDPM recipe by diffcore's own trainer.

Its EMA weights and config live in ``diffcore/pretrained/fashion_mnist/`` (a sampling-only checkpoint written by
``diffcore export``); ``scripts/train_default_model.sh`` is the command that trained it. ``diffcore.sample()`` and
``diffcore sample`` use it when no model is given.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

DEFAULT_MODEL_DIR = Path(__file__).parent / "fashion_mnist"


def default_model_path() -> Path:
    """Where the packaged checkpoint is (it may be absent in a build that did not ship it)."""
    return DEFAULT_MODEL_DIR


def load_default(device: "torch.device | str | None" = None, path: Optional[Path] = None):
    """Load the packaged model: a :class:`diffcore.train.load.TrainedModel` with ``model`` (eval mode, no grad),
    ``diffusion``, ``config`` and ``image_shape`` (1, 28, 28).

    Raises FileNotFoundError with the command that trains it when the checkpoint is missing, and
    :class:`diffcore.checkpoint.CheckpointError` when it is damaged.
    """
    from ..train.load import load_trained_model

    path = Path(path) if path is not None else DEFAULT_MODEL_DIR
    if not (path / "manifest.json").is_file():
        raise FileNotFoundError(
            f"the packaged default model is missing ({path} has no checkpoint). Train and export it with "
            f"`scripts/train_default_model.sh`, or pass your own model to diffcore.sample(model, ...)")
    return load_trained_model(path, use_ema=True, device=device)
