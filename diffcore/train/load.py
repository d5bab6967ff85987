"""Loading a trained model from a checkpoint, and exporting its EMA weights as a small sampling-only checkpoint."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import checkpoint as ck
from ..diffusion import GaussianDiffusion
from ..unet import UNet
from .config import TrainConfig, config_from_checkpoint
from .trainer import build_diffusion


@dataclass
class TrainedModel:
    """A model ready to sample: ``model`` (a :class:`~diffcore.unet.UNet` in eval mode), the ``diffusion`` it was
    trained with, its ``config``, ``image_shape`` ``(C, H, W)``, the training ``step`` and the checkpoint ``path``."""

    model: UNet
    diffusion: GaussianDiffusion
    config: TrainConfig
    image_shape: tuple[int, int, int]
    step: int
    path: Path


def load_trained_model(path: "str | os.PathLike", *, use_ema: bool = True,
                       device: "torch.device | str | None" = None) -> TrainedModel:
    """Load the model of a checkpoint written by :class:`~diffcore.train.Trainer` or :func:`export_model`.

    Args:
        path: a checkpoint directory, a folder of checkpoints (its ``latest``) or a run's ``out_dir``.
        use_ema: take the EMA weights when the checkpoint has them (the ones to sample with), else the raw ones.
        device: where to put the model (default: the CPU).
    Raises :class:`~diffcore.checkpoint.CheckpointError` for damaged or incompatible checkpoints, and for a
    config.json that lacks a field changing the model or the process (see
    :func:`~diffcore.train.config.config_from_checkpoint`).
    """
    path = Path(path)
    if not (path / ck.MANIFEST).is_file() and (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    loaded = ck.load_checkpoint(ck.resolve_checkpoint(path), load_state=False)
    config = config_from_checkpoint(loaded.config, loaded.version, where=f"checkpoint {loaded.path}")
    model = UNet(config.model)
    weights = loaded.ema if (use_ema and loaded.ema is not None) else loaded.model
    ck.load_state_strict(model, weights, what=f"checkpoint {loaded.path}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    model = model.to(device).eval().requires_grad_(False)
    shape = (config.model.in_channels, config.model.image_size, config.model.image_size)
    return TrainedModel(model, build_diffusion(config, device), config, shape, loaded.step, loaded.path)


def export_model(path: "str | os.PathLike", out_dir: "str | os.PathLike", *, use_ema: bool = True,
                 overwrite: bool = False) -> Path:
    """Write the (EMA) weights and config of the checkpoint at ``path`` as a sampling-only checkpoint at
    ``out_dir`` (no optimizer or training state; a few MB for the small U-Net), atomically. Returns ``out_dir``.

    An existing ``out_dir`` is replaced only if it is a diffcore checkpoint and ``overwrite`` is True (crash-safely:
    the old or the new one is there at every moment); anything else there raises
    :class:`~diffcore.checkpoint.CheckpointError` and is left untouched (:func:`diffcore.checkpoint.save_checkpoint`).
    """
    trained = load_trained_model(path, use_ema=use_ema)
    return ck.save_checkpoint(out_dir, model=trained.model.state_dict(), config=trained.config.to_dict(),
                              step=trained.step, state={"exported_from": str(trained.path), "ema": use_ema},
                              overwrite=overwrite)
