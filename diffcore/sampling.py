"""The front door: ``diffcore.sample(...)`` returns images in [-1, 1]; ``save_image_grid`` writes them as a PNG.

    import diffcore
    images = diffcore.sample(model, n=16, diffusion=diffusion, seed=0)      # DDIM, 50 steps, eta = 0
    diffcore.save_image_grid(images, "samples.png")

``fast=True`` is DDIM on the fused step (:func:`diffcore.samplers.ddim_sample`); ``fast=False`` is ancestral
sampling over every timestep (:func:`diffcore.samplers.ddpm_sample`), or over a respaced process when ``steps`` is
given. With ``model=None`` the packaged default model is loaded through ``diffcore.pretrained.load_default()``.
"""
from __future__ import annotations

import importlib
import io
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .checkpoint import atomic_write_bytes
from .diffusion import GaussianDiffusion, Model
from .ops import Impl
from .respace import SkipType
from .samplers import ddim_sample, ddpm_sample
from .schedules import make_schedule

__all__ = ["sample", "save_image_grid", "DEFAULT_FAST_STEPS"]

DEFAULT_FAST_STEPS = 50  #: DDIM steps of ``sample(fast=True)`` when ``steps`` is None

NO_PACKAGED_MODEL = (
    "model=None: no packaged default model is available yet (diffcore.pretrained does not exist in this "
    "install). Pass your own: diffcore.sample(model, diffusion=GaussianDiffusion(make_schedule('linear', 1000)), "
    "image_shape=(3, 32, 32)), where model(x, t, **model_kwargs) takes x [B, C, H, W] and int64 timesteps t [B]"
)


def _load_default_model(device) -> tuple[Model, GaussianDiffusion, tuple[int, ...]]:
    """(model, diffusion, image_shape) from ``diffcore.pretrained.load_default(device=...)``, which returns an
    object with those attributes (or that tuple)."""
    try:
        pretrained = importlib.import_module(f"{__package__}.pretrained")
    except ModuleNotFoundError as error:
        if error.name != f"{__package__}.pretrained":
            raise
        raise RuntimeError(NO_PACKAGED_MODEL) from None
    bundle = pretrained.load_default(device=device)
    if isinstance(bundle, tuple):
        model, diffusion, image_shape = bundle
    else:
        model, diffusion, image_shape = bundle.model, bundle.diffusion, bundle.image_shape
    return model, diffusion, tuple(image_shape)


def _infer_image_shape(model: Any) -> Optional[tuple[int, ...]]:
    """(C, H, W) from ``model.image_shape`` or a U-Net's ``config`` (in_channels, image_size), unwrapping
    ``.module`` (DDP) once."""
    for candidate in (model, getattr(model, "module", None)):
        if candidate is None:
            continue
        shape = getattr(candidate, "image_shape", None)
        if shape is not None:
            return tuple(int(s) for s in shape)
        config = getattr(candidate, "config", None)
        if config is not None and hasattr(config, "in_channels") and hasattr(config, "image_size"):
            return (int(config.in_channels), int(config.image_size), int(config.image_size))
    return None


def _model_device(model: Any) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for tensor in list(model.parameters()) + list(model.buffers()):
            return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def sample(model: Optional[Model] = None, n: int = 16, fast: bool = True, steps: Optional[int] = None,
           eta: float = 0.0, seed: Optional[int] = None, device: "torch.device | str | None" = None,
           diffusion: Optional[GaussianDiffusion] = None, image_shape: Optional[Sequence[int]] = None,
           progress: bool = True, *, clip_denoised: bool = True, model_kwargs: Optional[dict] = None,
           generator: Optional[torch.Generator] = None, skip_type: Optional[SkipType] = None,
           impl: Impl = "auto") -> torch.Tensor:
    """Generate ``n`` images; returns float32 ``[n, C, H, W]`` in [-1, 1] on ``device``.

    Args:
        model: ``model(x [B, C, H, W], t int64 [B], **model_kwargs)``; None loads the packaged default model
            (with its diffusion and image shape). An ``nn.Module`` is put in eval mode for the call.
        n: number of images. fast: DDIM (True) or ancestral DDPM (False).
        steps: DDIM steps (default 50, at most T) for fast=True; for fast=False None means all T steps and a
            number means a respaced process with that many steps.
        eta: DDIM stochasticity >= 0 (fast=True only).
        seed: Philox seed for x_T and all noise (drawn from ``generator`` when None); same seed, same images.
        device: where to sample (default: the model's device).
        diffusion: the process the model was trained with (default: linear schedule, T = 1000, eps prediction,
            fixed_small variance).
        image_shape: ``(C, H, W)`` (default: ``model.image_shape`` or a U-Net's config).
        progress: tqdm bar. clip_denoised: clamp x0_hat to [-1, 1] at each step. model_kwargs: e.g. ``{"y": labels}``.
        skip_type: DDIM timestep spacing (default ``"uniform"`` when steps divides T, else ``"even"``).
        impl: ``"auto" | "fused" | "reference"`` for the step ops.
    """
    if model is None:
        model, default_diffusion, default_shape = _load_default_model(device)
        diffusion = diffusion if diffusion is not None else default_diffusion
        image_shape = image_shape if image_shape is not None else default_shape
    if not callable(model):
        raise TypeError(f"model: expected a callable model(x, t, **kwargs), got {type(model).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    if image_shape is None:
        image_shape = _infer_image_shape(model)
        if image_shape is None:
            raise ValueError("image_shape: expected (C, H, W); the model has no image_shape or U-Net config to "
                             "infer it from, so pass image_shape=(C, H, W)")
    device = torch.device(device) if device is not None else _model_device(model)
    if diffusion is None:
        diffusion = GaussianDiffusion(make_schedule("linear", 1000))
    diffusion = diffusion.to(device)
    shape = (n, *(int(s) for s in image_shape))
    common = dict(clip_denoised=clip_denoised, model_kwargs=model_kwargs, seed=seed, generator=generator,
                  progress=progress, device=device, impl=impl)
    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()
    try:
        if fast:
            T = diffusion.num_timesteps
            count = min(DEFAULT_FAST_STEPS, T) if steps is None else steps
            if skip_type is None:
                skip_type = "uniform" if isinstance(count, int) and count >= 1 and T % count == 0 else "even"
            result = ddim_sample(model, diffusion, shape, steps=count, skip_type=skip_type, eta=eta, **common)
        else:
            if eta != 0.0:
                raise ValueError(f"eta: applies to fast=True (DDIM) only; ancestral sampling (fast=False) got "
                                 f"eta={eta!r}")
            result = ddpm_sample(model, diffusion, shape, steps=steps, skip_type=skip_type or "even", **common)
    finally:
        if was_training:
            model.train()
    return result.sample.float().clamp(-1.0, 1.0)


def save_image_grid(images: torch.Tensor, path: "str | os.PathLike", *, nrow: Optional[int] = None,
                    padding: int = 2, pad_value: float = -1.0) -> Path:
    """Write images ``[N, C, H, W]`` (or one ``[C, H, W]``) in [-1, 1], C = 1 or 3, as one PNG grid.

    ``nrow`` images per row (default ceil(sqrt(N))), ``padding`` pixels between and around them filled with
    ``pad_value`` (in [-1, 1]; -1 is black). The file is written atomically
    (:func:`diffcore.checkpoint.atomic_write_bytes`: a temporary file in the same folder, then os.replace); missing
    parent folders are created. Returns the path.
    """
    from PIL import Image

    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError(f"images: expected a floating-point tensor [N, C, H, W] in [-1, 1], got {images!r:.80}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] < 1:
        raise ValueError(f"images: expected shape [N, C, H, W] with N >= 1 and C = 1 or 3, got {tuple(images.shape)}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding: expected an int >= 0, got {padding!r}")
    N, C, H, W = images.shape
    ncol = min(N, nrow if nrow is not None else math.ceil(math.sqrt(N)))
    if ncol < 1:
        raise ValueError(f"nrow: expected an int >= 1, got {nrow!r}")
    nrows = math.ceil(N / ncol)
    grid = torch.full((C, nrows * (H + padding) + padding, ncol * (W + padding) + padding), float(pad_value))
    for i, image in enumerate(images.detach().float().cpu()):
        r, c = divmod(i, ncol)
        top, left = padding + r * (H + padding), padding + c * (W + padding)
        grid[:, top:top + H, left:left + W] = image
    pixels = ((grid.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    picture = Image.fromarray(pixels[:, :, 0] if C == 1 else pixels)  # uint8: "L" for 2-D, "RGB" for H x W x 3
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return path
