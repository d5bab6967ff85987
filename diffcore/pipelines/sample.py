"""The front door: ``diffcore.sample(...)`` returns images in [-1, 1]; :func:`diffcore.images.save_image_grid`
writes them as a PNG.

    import diffcore
    images = diffcore.sample(model, n=16, diffusion=diffusion, seed=0)      # DDIM, 50 steps, eta = 0
    diffcore.save_image_grid(images, "samples.png")

``fast=True`` is DDIM on the fused step (:func:`diffcore.samplers.ddim_sample`); ``fast=False`` is ancestral
sampling over every timestep (:func:`diffcore.samplers.ddpm_sample`), or over a respaced process when ``steps`` is
given. With ``model=None`` the packaged default model is loaded through ``diffcore.pretrained.load_default()``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ..diffusion import GaussianDiffusion, Model
from ..ops import Impl
from ..pretrained import load_default
from ..respace import SkipType
from ..samplers import ddim_sample, ddpm_sample
from ..schedules import make_schedule
from ..images import require_finite
from ..runtime import (Precision, batch_slices, compile_model, default_batch_size, precision_context,
                       resolve_precision, slice_rows)
from ..samplers.loop import draw_seed, initial_noise
from .common import eval_mode, model_device

__all__ = ["sample", "DEFAULT_FAST_STEPS"]

DEFAULT_FAST_STEPS = 50  #: DDIM steps of ``sample(fast=True)`` when ``steps`` is None


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


@torch.no_grad()
def sample(model: Optional[Model] = None, n: int = 16, fast: bool = True, steps: Optional[int] = None,
           eta: float = 0.0, seed: Optional[int] = None, device: "torch.device | str | None" = None,
           diffusion: Optional[GaussianDiffusion] = None, image_shape: Optional[Sequence[int]] = None,
           progress: bool = True, *, clip_denoised: bool = True, model_kwargs: Optional[dict] = None,
           generator: Optional[torch.Generator] = None, skip_type: Optional[SkipType] = None,
           impl: Impl = "auto", precision: Precision = "fp32", compile: bool = False,
           batch_size: Optional[int] = None) -> torch.Tensor:
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
        precision: ``"fp32" | "bf16" | "fp16" | "auto"``: the model runs under autocast to
            :func:`diffcore.runtime.resolve_precision`'s dtype ("auto": bf16 on GPUs and AMX CPUs, else fp32).
        compile: run the model through :func:`diffcore.runtime.compile_model` (graphs cached on disk, batch
            sizes bucketed; the first call per machine compiles for minutes on a CPU). Needs an ``nn.Module``.
        batch_size: images per model call (default :func:`diffcore.runtime.default_batch_size`: 64 on a CPU).
            Deterministic DDIM (eta = 0) gives the same images for every batch size; sampling that draws noise
            after x_T (eta > 0, ancestral) runs as one batch and takes no smaller batch_size.
    """
    if model is None:
        packaged = load_default(device=device)
        model = packaged.model
        diffusion = diffusion if diffusion is not None else packaged.diffusion
        image_shape = image_shape if image_shape is not None else packaged.image_shape
    if not callable(model):
        raise TypeError(f"model: expected a callable model(x, t, **kwargs), got {type(model).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    if image_shape is None:
        image_shape = _infer_image_shape(model)
        if image_shape is None:
            raise ValueError("image_shape: expected (C, H, W); the model has no image_shape or U-Net config to "
                             "infer it from, so pass image_shape=(C, H, W)")
    device = torch.device(device) if device is not None else model_device(model)
    if diffusion is None:
        diffusion = GaussianDiffusion(make_schedule("linear", 1000))
    diffusion = diffusion.to(device)
    shape = (n, *(int(s) for s in image_shape))
    dtype = resolve_precision(precision, device)
    chunk = default_batch_size(n, device) if batch_size is None else batch_size
    batch_slices(n, chunk)  # checks batch_size
    if chunk < n and (not fast or eta != 0.0):
        if batch_size is not None:
            raise ValueError(f"batch_size: stochastic sampling (eta > 0 or fast=False) runs all n={n} images as "
                             f"one batch (its per-step noise is indexed by batch position); got batch_size={chunk}")
        chunk = n
    runner = compile_model(model) if compile else model
    common = dict(clip_denoised=clip_denoised, seed=seed, generator=generator, progress=progress, device=device,
                  impl=impl)
    with eval_mode(model), precision_context(dtype, device):
        if fast:
            T = diffusion.num_timesteps
            count = min(DEFAULT_FAST_STEPS, T) if steps is None else steps
            if skip_type is None:
                skip_type = "uniform" if isinstance(count, int) and count >= 1 and T % count == 0 else "even"
            if chunk < n:  # the same x_T for every split: drawn for all n, then run in slices of rows
                common["seed"] = draw_seed(seed, generator)
                x_T = initial_noise(shape, common["seed"], device=device)
                return require_finite(torch.cat([
                    ddim_sample(runner, diffusion, steps=count, skip_type=skip_type, eta=eta, x_T=x_T[rows],
                                model_kwargs=slice_rows(model_kwargs, rows, n), **common).sample
                    for rows in batch_slices(n, chunk)]), "sample").float().clamp(-1.0, 1.0)
            result = ddim_sample(runner, diffusion, shape, steps=count, skip_type=skip_type, eta=eta,
                                 model_kwargs=model_kwargs, **common)
        else:
            if eta != 0.0:
                raise ValueError(f"eta: applies to fast=True (DDIM) only; ancestral sampling (fast=False) got "
                                 f"eta={eta!r}")
            result = ddpm_sample(runner, diffusion, shape, steps=steps, skip_type=skip_type or "even",
                                 model_kwargs=model_kwargs, **common)
    return require_finite(result.sample, "sample").float().clamp(-1.0, 1.0)


