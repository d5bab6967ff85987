"""diffusers folders in and out: a ``UNet2DModel`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``)
or a ``DDPMPipeline`` folder (``model_index.json``, ``unet/``, ``scheduler/``) <-> a diffcore :class:`UNet` and
:class:`GaussianDiffusion`.

diffusers itself is not needed: configs are JSON and weights safetensors. Exported folders load with
``UNet2DModel.from_pretrained(folder, subfolder="unet")`` and ``DDPMPipeline.from_pretrained(folder)`` offline,
with strict keys (tested with diffusers 0.42.1).

Calling convention: diffusers' ``unet(x, t).sample`` is diffcore's ``model(x, t)``; class labels are
``class_labels=`` there and ``y=`` here. Clipping: diffcore's samplers with ``clip_denoised=True`` re-derive eps from
the clipped x0 (improved-diffusion's choice); diffusers' DDIMScheduler does that only with
``use_clipped_model_output=True`` (with False it keeps the model's eps), so ``ddim_sample(clip_denoised=True)``
equals ``DDIMScheduler(clip_sample=True).step(..., use_clipped_model_output=True)``.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from ..diffusion import GaussianDiffusion
from ..unet import UNet
from .diffusers_scheduler import diffusers_scheduler_config, diffusion_from_diffusers_config
from .diffusers_unet import (diffusers_config_from_unet, diffusers_state_from_unet, unet_config_from_diffusers,
                             unet_from_diffusers_state)
from .state import ConversionError

__all__ = ["DiffusersModel", "load_diffusers_folder", "save_diffusers_folder", "is_diffusers_folder",
           "diffusion_from_diffusers_config", "unet_from_diffusers", "WEIGHTS_NAME", "DIFFUSERS_VERSION"]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
DIFFUSERS_VERSION = "0.42.1"  #: the diffusers version exported folders were tested with


@dataclass
class DiffusersModel:
    """An imported diffusers model: ``model`` (diffcore :class:`UNet`, eval mode), ``diffusion`` (from the scheduler
    config, or None when the folder has none), the raw ``unet_config`` / ``scheduler_config`` dicts and the
    ``unet_dir`` it came from."""

    model: UNet
    diffusion: Optional[GaussianDiffusion]
    unet_config: dict
    scheduler_config: Optional[dict]
    unet_dir: Path


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConversionError(f"{path}: not a readable JSON file: {error}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def is_diffusers_folder(path: "str | os.PathLike") -> bool:
    """True for a folder with ``model_index.json`` or a ``config.json`` whose ``_class_name`` is UNet2DModel."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        return True
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("_class_name") == "UNet2DModel"
    except (OSError, ValueError, AttributeError):
        return False


def _locate(path: Path) -> tuple[Path, Optional[Path]]:
    """(unet folder, scheduler config file or None)."""
    if not path.is_dir():
        raise ConversionError(f"{path}: expected a diffusers folder (model_index.json, or config.json + {WEIGHTS_NAME})")
    if (path / "model_index.json").is_file():
        unet_dir = path / "unet"
        scheduler = path / "scheduler" / "scheduler_config.json"
    else:
        unet_dir = path
        scheduler = next((p for p in (path / "scheduler_config.json", path.parent / "scheduler" / "scheduler_config.json")
                          if p.is_file()), path / "scheduler_config.json")
    if not (unet_dir / "config.json").is_file():
        raise ConversionError(f"{unet_dir}: no config.json: not a diffusers UNet2DModel folder")
    return unet_dir, scheduler if scheduler.is_file() else None


def _weights_file(unet_dir: Path) -> Path:
    """``diffusion_pytorch_model.safetensors``, else the one variant (``diffusion_pytorch_model.fp16.safetensors``)."""
    weights = unet_dir / WEIGHTS_NAME
    if weights.is_file():
        return weights
    stem, suffix = WEIGHTS_NAME.rsplit(".", 1)
    variants = sorted(unet_dir.glob(f"{stem}.*.{suffix}"))
    if len(variants) == 1:
        return variants[0]
    if variants:
        raise ConversionError(f"{unet_dir}: no {WEIGHTS_NAME} but several variants "
                              f"({', '.join(v.name for v in variants)}); keep the one to convert")
    raise ConversionError(f"{unet_dir}: no {WEIGHTS_NAME} (only safetensors weights are read; a .bin file would "
                          f"need unpickling)")


def unet_from_diffusers(unet_dir: "str | os.PathLike") -> tuple[UNet, dict]:
    """(diffcore :class:`UNet`, the diffusers config dict) from a ``UNet2DModel`` folder: its
    ``diffusion_pytorch_model.safetensors``, or the folder's only variant of it (e.g. ``...fp16.safetensors``);
    half-precision weights are cast to float32."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    unet_dir = Path(unet_dir)
    config = _read_json(unet_dir / "config.json")
    unet_config = unet_config_from_diffusers(config)
    weights = _weights_file(unet_dir)
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as error:
        raise ConversionError(f"{weights}: not a readable safetensors file (truncated or damaged?): {error}") from None
    try:
        model = unet_from_diffusers_state(state, unet_config, config.get("num_class_embeds"))
    except ConversionError as error:
        raise ConversionError(f"{weights}: {error}") from None
    return model, config


def load_diffusers_folder(path: "str | os.PathLike", *,
                          scheduler_config: "Mapping[str, Any] | str | os.PathLike | None" = None) -> DiffusersModel:
    """Import a diffusers ``UNet2DModel`` folder or ``DDPMPipeline`` folder.

    Args:
        path: a pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``) or a UNet2DModel folder
            (``config.json`` + ``diffusion_pytorch_model.safetensors``; its scheduler config is looked for next to
            it and in ``../scheduler/``).
        scheduler_config: a scheduler config dict or ``scheduler_config.json`` path, overriding the folder's.
    Raises :class:`ConversionError` with one line naming the file and the problem.
    """
    unet_dir, scheduler_file = _locate(Path(path))
    model, config = unet_from_diffusers(unet_dir)
    if scheduler_config is not None and not isinstance(scheduler_config, Mapping):
        scheduler_config = _read_json(Path(scheduler_config))
    elif scheduler_config is None and scheduler_file is not None:
        scheduler_config = _read_json(scheduler_file)
    diffusion = None if scheduler_config is None else diffusion_from_diffusers_config(scheduler_config)
    return DiffusersModel(model, diffusion, config, None if scheduler_config is None else dict(scheduler_config),
                          unet_dir)


def save_diffusers_folder(out_dir: "str | os.PathLike", model: UNet, diffusion: GaussianDiffusion, *,
                          clip_sample: bool = True) -> Path:
    """Write ``model`` and ``diffusion`` as a ``DDPMPipeline`` folder at ``out_dir`` (``model_index.json``,
    ``unet/config.json``, ``unet/diffusion_pytorch_model.safetensors``, ``scheduler/scheduler_config.json``).
    ``clip_sample``: the scheduler's clipping of x0_hat to [-1, 1] (default True, as ``diffcore sample``).

    Refuses an existing ``out_dir`` (FileExistsError); the folder is built under a temporary name next to it and
    renamed into place, so a failure leaves nothing behind. Raises :class:`ConversionError` when diffusers
    cannot represent the model or the process (see :func:`diffusers_config_from_unet`). Returns ``out_dir``.
    """
    from safetensors.torch import save

    if not isinstance(model, UNet):
        raise ConversionError(f"model: expected a diffcore UNet, got {type(model).__name__}")
    out_dir = Path(out_dir)
    if out_dir.exists() or out_dir.is_symlink():
        raise FileExistsError(f"{out_dir}: already exists; diffcore does not overwrite it (choose a new folder)")
    unet_config = diffusers_config_from_unet(model.config)
    unet_config["_diffusers_version"] = DIFFUSERS_VERSION
    scheduler = diffusers_scheduler_config(diffusion, clip_sample=clip_sample)
    scheduler["_diffusers_version"] = DIFFUSERS_VERSION
    state = {k: v.detach().to("cpu", torch.float32).contiguous().clone()
             for k, v in diffusers_state_from_unet(model).items()}
    files = {
        "model_index.json": {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
                             "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]},
        "unet/config.json": unet_config, "scheduler/scheduler_config.json": scheduler}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{uuid.uuid4().hex[:12]}"
    try:
        for sub in ("unet", "scheduler"):
            (tmp / sub).mkdir(parents=True)
        for name, data in files.items():
            (tmp / name).write_text(json.dumps(data, indent=2) + "\n")
        (tmp / "unet" / WEIGHTS_NAME).write_bytes(save(state, metadata={"format": "pt"}))
        if out_dir.exists():
            raise FileExistsError(f"{out_dir}: appeared while writing; diffcore does not overwrite it")
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
