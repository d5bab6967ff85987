"""Load any model path: a diffcore checkpoint (trained, exported or converted), a diffusers folder, or an ADM
``.pt`` file with its preset, as the :class:`~diffcore.train.load.TrainedModel` that
:func:`~diffcore.train.load.load_trained_model` returns, so every ``--model PATH`` accepts all of them."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .. import checkpoint as ck
from ..train.config import TrainConfig
from ..train.load import TrainedModel, load_trained_model
from .state import ConversionError

__all__ = ["load_model", "model_kind"]


def model_kind(path: "str | os.PathLike") -> str:
    """``"diffcore"`` (a checkpoint folder or folder of checkpoints), ``"diffusers"`` or ``"adm"`` (a ``.pt`` /
    ``.pth`` file); raises :class:`ConversionError` for anything else."""
    from .diffusers import is_diffusers_folder

    path = Path(path)
    if path.is_dir():
        if (path / ck.MANIFEST).is_file() or (path / ck.LATEST).is_file() or (path / "checkpoints").is_dir():
            return "diffcore"
        if is_diffusers_folder(path):
            return "diffusers"
        if (path / "config.json").is_file() or (path / "unet").is_dir():
            raise ConversionError(f"{path}: has config.json but is not a diffusers UNet2DModel / DDPMPipeline "
                                  f"folder nor a diffcore checkpoint")
        raise ConversionError(f"{path}: not a model folder: no diffcore checkpoint (manifest.json) and no diffusers "
                              f"config (model_index.json or config.json)")
    if path.is_file() and path.suffix in (".pt", ".pth", ".ckpt"):
        return "adm"
    if not path.exists():
        raise ConversionError(f"{path}: no such file or folder")
    raise ConversionError(f"{path}: not a model: expected a diffcore checkpoint folder, a diffusers folder or an "
                          f"ADM .pt file")


def _train_config(model_config, diffusion) -> TrainConfig:
    """The TrainConfig closest to a converted model's process (the returned ``diffusion`` is the exact one)."""
    name = diffusion.schedule.name.split("+")[0]
    return TrainConfig(model=model_config, schedule=name if name in ("linear", "cosine", "scaled_linear", "sigmoid")
                       else "linear", num_timesteps=diffusion.num_timesteps,
                       prediction_type=diffusion.prediction_type.name.lower(),
                       variance_type=diffusion.variance_type.name.lower(), loss_type="mse")


def load_model(path: "str | os.PathLike", *, use_ema: bool = True, device: "torch.device | str | None" = None,
               preset: Optional[str] = None, config: Optional[Mapping[str, Any]] = None,
               scheduler_config: "Mapping[str, Any] | str | os.PathLike | None" = None) -> TrainedModel:
    """A model ready to sample from any supported path.

    Args:
        path: a diffcore checkpoint folder (what training, ``diffcore export`` and ``diffcore convert`` write), a
            diffusers ``UNet2DModel`` / ``DDPMPipeline`` folder, or an ADM ``.pt`` file (then ``preset`` or
            ``config``, the ADM flags, is needed).
        use_ema: diffcore checkpoints: take the EMA weights when present.
        device: where to put the model (default CPU).
        preset, config: for ADM files, see :func:`diffcore.convert.adm.from_adm_state_dict`.
        scheduler_config: for diffusers folders without a scheduler config (or to override it).

    Returns a :class:`~diffcore.train.load.TrainedModel`; ``diffusion`` is the exact process, ``config`` a
    TrainConfig describing it (for a diffusers schedule that no diffcore schedule name describes, e.g. given
    betas, ``config.schedule`` is only a label and ``diffusion`` is authoritative); ``step`` is 0 for imports.
    Raises :class:`ConversionError` / :class:`~diffcore.checkpoint.CheckpointError` with a one-line reason.
    """
    path = Path(path)
    kind = model_kind(path)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if kind == "diffcore":
        return load_trained_model(path, use_ema=use_ema, device=device)
    if kind == "diffusers":
        from .diffusers import load_diffusers_folder

        imported = load_diffusers_folder(path, scheduler_config=scheduler_config)
        if imported.diffusion is None:
            raise ConversionError(f"{path}: no scheduler config (scheduler/scheduler_config.json or "
                                  f"scheduler_config.json); pass one (scheduler_config=...)")
        model, diffusion = imported.model, imported.diffusion
        train_config = _train_config(model.config, diffusion)
    else:
        from .adm import load_adm_model

        if (preset is None) == (config is None):
            raise ConversionError(f"{path}: an ADM .pt file needs exactly one of a preset (e.g. dps-ffhq256) or a "
                                  f"config of ADM flags")
        model, spec = load_adm_model(path, preset if preset is not None else config)
        train_config = spec.train_config()
        from ..train.trainer import build_diffusion

        diffusion = build_diffusion(train_config)
    model = model.to(device).eval().requires_grad_(False)
    shape = (model.config.in_channels, model.config.image_size, model.config.image_size)
    return TrainedModel(model, diffusion.to(device), train_config, shape, 0, path)
