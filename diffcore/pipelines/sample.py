"""The front door: ``diffcore.sample(...)`` returns images in [-1, 1]; :func:`diffcore.images.save_image_grid`
writes them as a PNG.

    import diffcore
    images = diffcore.sample(model, n=16, diffusion=diffusion, seed=0)      # the model kind's default, 50 steps
    images = diffcore.sample(model, n=16, diffusion=diffusion, sampler="dpm++2m", steps=20, seed=0)
    diffcore.save_image_grid(images, "samples.png")

``fast=True`` is 50 steps of the model kind's default sampler on the fused step ops (respaced ancestral,
:func:`diffcore.samplers.ddpm_sample`, for a learned variance; DDIM, :func:`diffcore.samplers.ddim_sample`, for a
fixed one); ``fast=False`` is ancestral sampling over every timestep; ``sampler=`` picks any of
:data:`diffcore.samplers.SAMPLERS`. With ``model=None`` the packaged default model is loaded through ``diffcore.pretrained.load_default()``.
"""
from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence

import torch

from ..diffusion import GaussianDiffusion, Model
from ..ops import Impl
from ..pretrained import load_default
from ..reference.philox import MAX_IMAGES
from ..respace import SkipType
from ..samplers import SamplerChoice, Spacing, check_sampler, default_sampler, run_sampler
from ..schedules import make_schedule
from ..images import require_finite
from ..runtime import (SAMPLE_PRECISION, Precision, batch_slices, compile_model, default_batch_size,
                       precision_context, resolve_precision, slice_rows)
from ..samplers.loop import StepCallback, check_generator, draw_seed
from .common import as_device, eval_mode, model_device

__all__ = ["sample", "DEFAULT_FAST_STEPS", "check_fits_in_memory"]

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


def _check_first_image(first_image: int, n: int) -> int:
    """``first_image`` checked: an int (not a bool) >= 0 with ``first_image + n <= 2**32``."""
    if isinstance(first_image, bool) or not isinstance(first_image, int):
        raise TypeError(f"first_image: expected an int >= 0 (the seed's index of the first image), got "
                        f"{type(first_image).__name__} {first_image!r}")
    if not 0 <= first_image <= MAX_IMAGES - n:
        raise ValueError(f"first_image: expected an int in [0, 2**32 - n] with n = {n} (a seed numbers 2**32 "
                         f"images), got {first_image}")
    return first_image


def check_fits_in_memory(shape: Sequence[int], device: "torch.device | str", what: str = "n",
                         remedy: str = "make them in parts with first_image= (diffcore sample --n N --first-image K "
                                       "--format png)") -> None:
    """A MemoryError, before any work, when a float32 batch of images ``shape`` ``(N, C, H, W)`` alone exceeds the
    memory of ``device`` (the physical memory on a CPU; in bytes, 4 per element): a huge request is refused with
    a way out rather than ending in an allocation failure or swapping after hours of work. The message names
    ``what`` (the argument or flag that asked for N images) and ends with ``remedy``. Unknown memory: no check.
    Only the result is counted, so passing is necessary, not sufficient (the model's activations need more)."""
    device = torch.device(device)
    need = 4 * math.prod(shape)
    try:
        if device.type == "cuda":
            have = torch.cuda.get_device_properties(device).total_memory
        else:
            have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError, RuntimeError):  # unknown: do not guess
        return
    if need > have:
        raise MemoryError(f"{what}: {shape[0]} images of shape {tuple(shape[1:])} take {need / 2**30:.1f} GiB as "
                          f"float32, more than the {have / 2**30:.1f} GiB of {device.type} memory; {remedy}")


@torch.no_grad()
def sample(model: Optional[Model] = None, n: int = 16, fast: bool = True, steps: Optional[int] = None,
           eta: Optional[float] = None, seed: Optional[int] = None, device: "torch.device | str | None" = None,
           diffusion: Optional[GaussianDiffusion] = None, image_shape: Optional[Sequence[int]] = None,
           progress: bool = True, *, sampler: Optional[SamplerChoice] = None, schedule: Optional[Spacing] = None,
           callback: Optional[StepCallback] = None, clip_denoised: bool = True,
           model_kwargs: Optional[dict] = None, generator: Optional[torch.Generator] = None,
           skip_type: Optional[SkipType] = None,
           impl: Impl = "auto", precision: Precision = SAMPLE_PRECISION, compile: bool = False,
           batch_size: Optional[int] = None, first_image: int = 0) -> torch.Tensor:
    """Generate ``n`` images (images ``first_image .. first_image + n - 1`` of the seed); returns float32
    ``[n, C, H, W]`` in [-1, 1] on ``device``.

    Args:
        model: ``model(x [B, C, H, W], t int64 [B], **model_kwargs)``; None loads the packaged default model
            (with its diffusion and image shape). An ``nn.Module`` is put in eval mode for the call.
        n: number of images. fast: few steps (50) with the fused step kernels, with the model kind's default
            sampler (:func:`diffcore.samplers.default_sampler`: respaced ancestral for a learned variance, DDIM
            for a fixed one); False: ancestral sampling over all T steps (unless ``steps``/``sampler`` say else).
        sampler: one of :data:`diffcore.samplers.SAMPLERS` (``"ddim"``, ``"ancestral"``, ``"euler"``, ``"heun"``,
            ``"dpm++2m"``, ``"dpm++2m-sde"``); None: as ``fast`` says. See :mod:`diffcore.samplers.registry`.
        steps: steps of the sampler (default 50, at most T; ``"heun"`` costs 2 steps - 1 model calls); for
            ancestral sampling with fast=False None means all T steps.
        schedule: the spacing of the steps, ``"uniform" | "even" | "trailing" | "karras" | "quad" | "quad_full"``
            (default: the sampler's; DDIM: ``"uniform"`` when steps divides T, else ``"even"``).
            ``skip_type`` is its older name.
        eta: stochasticity of ``"ddim"`` (default 0) and ``"dpm++2m-sde"`` (default 1); None for the others.
        callback: ``callback(step, t, x, pred_x0)`` after each step, x holding the current batch's rows (once per
            batch when ``batch_size`` < n); returning True stops that batch early (its images are then the clamped
            x at that step). See :data:`diffcore.samplers.loop.StepCallback`.
        seed: Philox seed for x_T and all noise (an int; when None one is drawn from ``generator``, torch's
            default CPU generator if that is None too: ``generator`` only ever supplies this one integer). Same
            seed, same images, on any device up to rounding and whatever the batch size: image b depends only on
            the seed and b.
        device: where to sample (default: the model's device).
        diffusion: the process the model was trained with (default: linear schedule, T = 1000, eps prediction,
            fixed_small variance).
        image_shape: ``(C, H, W)`` (default: ``model.image_shape`` or a U-Net's config).
        progress: tqdm bar. clip_denoised: clamp x0_hat to [-1, 1] at each step (default True here: this is
            the front door for images in [-1, 1], as improved-diffusion's and diffusers' pipelines default; the
            sampler functions of :mod:`diffcore.samplers` are the math for any data and default to False; the
            returned images are clamped to [-1, 1] either way). model_kwargs: e.g. ``{"y": labels}``.
        impl: ``"auto" | "fused" | "reference"`` for the step ops.
        precision: ``"fp32" | "bf16" | "fp16" | "auto"`` (default :data:`diffcore.runtime.SAMPLE_PRECISION`,
            ``"auto"``): the model runs under autocast to :func:`diffcore.runtime.resolve_precision`'s dtype
            ("auto": bf16 on GPUs, on CPUs with AMX and on AMD CPUs with AVX512-BF16, else fp32; bf16's FID on the
            packaged model is within noise of fp32's, bench/RESULTS.md). ``"fp32"`` gives the same images on every
            machine up to float rounding; with ``"auto"`` a seed gives the same images on machines that resolve
            to the same dtype.
        compile: run the model through :func:`diffcore.runtime.compile_model` (graphs cached on disk, batch
            sizes bucketed; the first call per machine compiles for minutes on a CPU). Needs an ``nn.Module``.
        batch_size: images per model call (default :func:`diffcore.runtime.default_batch_size`: 64 on a CPU).
            Every sampler, stochastic ones included (ancestral, DDIM eta > 0, dpm++2m-sde), gives the same images
            for every batch size up to float rounding of the model's batched arithmetic: the batch of rows
            r .. r + k - 1 runs with ``first_row=r``, so image b draws the noise (x_T and every step's) of image
            b of the seed whatever batch it runs in.
        first_image: the seed's index of the first image (default 0): row i is image ``first_image + i``, the
            image that row ``first_image + i`` of one call with ``n' = first_image + n`` gives, so a large set can
            be generated in shards (calls, processes or machines) that together make exactly the images of one
            run. An int >= 0 with ``first_image + n <= 2**32`` (a seed numbers 2**32 images). ``model_kwargs``
            tensors of length n belong to this call's n images (e.g. the shard's labels).
    """
    checked = as_device(device) if device is not None else None  # a bad device fails before any loading
    if model is None:
        packaged = load_default(device=device)
        model = packaged.model
        diffusion = diffusion if diffusion is not None else packaged.diffusion
        image_shape = image_shape if image_shape is not None else packaged.image_shape
    if not callable(model):
        raise TypeError(f"model: expected a callable model(x, t, **kwargs), got {type(model).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IMAGES:
        raise ValueError(f"n: expected an int in [1, 2**32] (the images a seed numbers), got {n!r}")
    for flag, value in (("fast", fast), ("compile", compile), ("clip_denoised", clip_denoised),
                        ("progress", progress)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag}: expected a bool, got {type(value).__name__} {value!r}")
    check_generator(generator)  # early; the seed is drawn from it only once every other check passed
    if diffusion is not None and not isinstance(diffusion, GaussianDiffusion):
        raise TypeError(f"diffusion: expected a diffcore.GaussianDiffusion (diffusers schedulers convert with "
                        f"diffcore.convert), got {type(diffusion).__name__}")
    first_image = _check_first_image(first_image, n)
    if image_shape is None:
        image_shape = _infer_image_shape(model)
        if image_shape is None:
            raise ValueError("image_shape: expected (C, H, W); the model has no image_shape or U-Net config to "
                             "infer it from, so pass image_shape=(C, H, W)")
    device = checked if checked is not None else model_device(model)
    if diffusion is None:
        diffusion = GaussianDiffusion(make_schedule("linear", 1000))
    diffusion = diffusion.to(device)
    shape = (n, *(int(s) for s in image_shape))
    check_fits_in_memory(shape, device)
    dtype = resolve_precision(precision, device)
    chunk = default_batch_size(n, device) if batch_size is None else batch_size
    batch_slices(n, chunk)  # checks batch_size
    if skip_type is not None and schedule is not None and skip_type != schedule:
        raise ValueError(f"schedule: skip_type is its older name; give one of them, got schedule={schedule!r} and "
                         f"skip_type={skip_type!r}")
    schedule = schedule if schedule is not None else skip_type
    T = diffusion.num_timesteps
    if sampler is None:
        sampler = default_sampler(diffusion) if fast else "ancestral"
    sampler = check_sampler(sampler)
    if steps is None and (fast or sampler != "ancestral"):
        steps = min(DEFAULT_FAST_STEPS, T)
    if schedule is None and sampler == "ddim":
        schedule = "uniform" if isinstance(steps, int) and steps >= 1 and T % steps == 0 else "even"
    seed = draw_seed(seed, generator)  # one seed for every batch (image b's noise: the seed's image b)
    runner = compile_model(model) if compile else model
    common = dict(steps=steps, schedule=schedule, eta=eta, clip_denoised=clip_denoised, seed=seed,
                  callback=callback, progress=progress, device=device, impl=impl)
    with eval_mode(model), precision_context(dtype, device):
        batches = [run_sampler(sampler, runner, diffusion, (rows.stop - rows.start, *shape[1:]),
                               model_kwargs=slice_rows(model_kwargs, rows, n), first_row=first_image + rows.start,
                               **common).sample
                   for rows in batch_slices(n, chunk)]
    images = batches[0] if len(batches) == 1 else torch.cat(batches)
    return require_finite(images, "sample").float().clamp(-1.0, 1.0)
