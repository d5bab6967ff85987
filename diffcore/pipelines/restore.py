"""Restoring a degraded image with a pretrained unconditional model: the pipeline behind ``diffcore restore``.

    x = diffcore.images.load_image("shirt.png", trained.image_shape)                   # [1, C, H, W] in [-1, 1]
    result = restore(trained.model, trained.diffusion, x, "sr4", steps=250, seed=0)
    write_restoration(result, "out/")   # degraded.png, restored.png, baseline.png, metrics.json

One call measures ``y = A(x) + noise`` with the task's operator (:func:`diffcore.inverse.make_operator`; the noise is
drawn on the CPU from ``seed``, so y is the same on every device), restores x from y by DPS
(:func:`diffcore.inverse.dps_sample`) and by the task's baseline (:func:`diffcore.inverse.naive_inpaint_sample`
for the masks, the operator's pseudo-inverse / back-projection otherwise, :func:`~diffcore.inverse.
pseudo_inverse_baseline`), and keeps a viewable picture of y (:func:`degraded_view`).

Step size. DPS's guidance gradient grad ||y - A(x0_hat)|| has the scale of the operator's norm: 1 for masks and
blurs, 1/f for f-fold average pooling, about sqrt(n_angles * diameter) for the Radon transform (43 for 60 views
of 32 x 32). The step used is ``zeta / ||A||_2`` (``LinearOperator.spectral_norm``), so one ``zeta`` (default 1,
the official code's scale for most tasks) means the same move in image space for every task.

Precision and compilation (``precision=``, ``compile=``, as in :func:`diffcore.sample`): only the model's calls run
under autocast, so the operator, the residual norm and DPS's gradient step stay float32; the gradient through the
model is taken under autocast as well (bf16 gradients agree with fp32 to bf16 rounding). ``torch.compile`` serves
DPS: the compiled model is differentiated through (AOTAutograd compiles its backward; gradients equal eager's to
1e-6 in fp32), at the price of compiling a forward and a backward graph on the first call.

Batches (``batch_size=``, as in :func:`diffcore.sample`): the B images are restored ``batch_size`` at a time (default
:func:`diffcore.runtime.default_batch_size`: 64 on a CPU, all on a GPU), the batch of rows r .. r + k - 1 with
``first_row=r``, so that every image gets the noise it gets in one call on all B (x_T, every step's noise, the naive
baseline's replacement noise). DPS's guidance does not couple the images of a batch (each has its own residual norm
``||y_b - A(x0_hat_b)||``; the official code's single norm over the batch would), and the measurement y is drawn once
for all B images before the split, so the restorations are the same for every batch size up to float rounding of the
model's batched arithmetic (a batch of another size may block the convolutions differently). DPS can amplify that
rounding a lot: on the packaged model (inpaint-box, 50 steps, 8 images) a split into batches of 3 agreed with one
batch of 8 to 3.5e-10 in float64, but in float32 three of the eight images forked (up to 0.86 at single pixels, mean
3e-3; sr4: up to 7e-4 with batches of 3, 3.6e-2 with batches of 1), as they would between machines or thread counts.
The naive baseline agreed to 5e-6.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..images import grid_png, require_finite
from ..inverse import (TASKS, AveragePoolDownsample, BicubicDownsample, BlurOperator, GaussianNoise, LinearOperator,
                      MaskOperator, PoissonNoise, RadonTransform, dps_sample, make_operator, naive_inpaint_sample,
                      pseudo_inverse_baseline, psnr, ssim)
from ..inverse.noise import NoiseKind, NoiseModel
from ..outputs import write_together
from ..runtime import (DEFAULT_PRECISION, Precision, batch_slices, compile_model, default_batch_size,
                       precision_context, resolve_precision)
from ..samplers import SamplerName
from .common import eval_mode, model_device

__all__ = ["RESTORE_TASKS", "RESTORATION_FILES", "SSIM_WINDOW", "AutocastModel", "Restoration",
           "make_measurement_noise", "degraded_view", "baseline_name", "restore", "restoration_metrics",
           "write_restoration"]

#: The task names ``restore`` accepts (those of :func:`diffcore.inverse.make_operator`).
RESTORE_TASKS: tuple[str, ...] = TASKS
#: The files :func:`write_restoration` writes into its folder.
RESTORATION_FILES: tuple[str, ...] = ("degraded.png", "restored.png", "baseline.png", "metrics.json")
#: The side of SSIM's Gaussian window in :func:`restoration_metrics` (Wang et al.'s 11; smaller images get no SSIM).
SSIM_WINDOW = 11


# ------------------------------------------------------------------------------------------------ loading
# ------------------------------------------------------------------------------------------------ pieces
def make_measurement_noise(operator: LinearOperator, kind: NoiseKind = "gaussian", *, sigma_y: float = 0.05,
                           photon_rate: float = 255.0) -> NoiseModel:
    """The noise model of a measurement: ``GaussianNoise(sigma_y)`` (image units, images in [-1, 1]) or
    ``PoissonNoise(photon_rate, -L, L)`` with L = max(A 1), the largest measurement of a white image (1 for masks,
    pooling and blurs; the longest ray for CT), so that ``photon_rate`` photons are expected at the top of any
    operator's range (DPS's Poisson level r on [-1, 1] images is photon_rate = 255 r)."""
    if kind == "gaussian":
        return GaussianNoise(float(sigma_y))
    if kind == "poisson":
        ones = torch.ones((1,) + operator.image_shape, dtype=torch.float64)
        top = float(operator(ones).abs().max())
        return PoissonNoise(float(photon_rate), -top, top)
    raise ValueError(f"noise: expected 'gaussian' or 'poisson', got {kind!r}")


def degraded_view(operator: LinearOperator, y: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A picture of the measurement ``y`` ``[B, *measurement_shape]`` -> (image ``[B, C, h, w]``, comparable).

    Masks: the observed pixels with zeros (mid-grey) elsewhere; super-resolution: the low-resolution image
    up-sampled by pixel repetition; blurs: y itself. These are ``comparable`` (image-shaped; their PSNR/SSIM
    against the clean image are those of the degraded input). CT: the sinogram (angles down, detector bins
    across) min-max scaled to [-1, 1] per image, not comparable. Values may leave [-1, 1] (noise); writers clamp.
    """
    if isinstance(operator, MaskOperator):
        return operator.pseudo_inverse(y), True
    if isinstance(operator, (AveragePoolDownsample, BicubicDownsample)):
        f = operator.factor
        return y.repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1), True
    if tuple(operator.measurement_shape) == tuple(operator.image_shape):
        return y, True
    flat = y.flatten(1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    shape = (-1,) + (1,) * (y.dim() - 1)
    span = torch.where(high > low, high - low, torch.ones_like(high))
    scaled = (y - low.reshape(shape)) / span.reshape(shape) * 2.0 - 1.0
    return (scaled if y.dim() == 4 else scaled.reshape(y.shape[0], 1, *y.shape[-2:])), False


def baseline_name(operator: LinearOperator) -> str:
    """What :func:`restore` compares DPS with for this operator."""
    if isinstance(operator, MaskOperator):
        return "naive-inpainting"
    if isinstance(operator, RadonTransform):
        return "filtered-back-projection"
    if isinstance(operator, BlurOperator):
        return "damped-least-squares"
    if isinstance(operator, AveragePoolDownsample):
        return "nearest-upsampling"
    return "pseudo-inverse"


class AutocastModel:
    """``model(x, t, **kwargs)`` called under :func:`diffcore.runtime.precision_context` (autocast to ``dtype`` on
    ``device``), so that only the network runs in low precision; differentiable in x. Outputs are in the autocast
    dtype (:meth:`diffcore.diffusion.GaussianDiffusion.call_model` casts them to x's dtype)."""

    def __init__(self, model: Any, dtype: torch.dtype, device: "torch.device | str"):
        self.model, self.dtype, self.device = model, dtype, torch.device(device)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> Any:
        with precision_context(self.dtype, self.device):
            return self.model(x, t, **kwargs)


@dataclass(frozen=True)
class Restoration:
    """What :func:`restore` returns. Images are float ``[B, C, H, W]`` on the CPU in [-1, 1] (``degraded`` is
    ``[B, C, h, w]`` and may leave the range); ``measurement`` is y ``[B, *measurement_shape]``."""

    task: str
    operator: LinearOperator
    reference: torch.Tensor  #: the clean input x
    measurement: torch.Tensor  #: y = A(x) + noise
    degraded: torch.Tensor  #: :func:`degraded_view` of y
    degraded_comparable: bool
    restored: torch.Tensor  #: the DPS result
    baseline: torch.Tensor
    baseline_name: str
    settings: dict[str, Any] = field(default_factory=dict)  #: sampler, steps, zeta, step size, noise, seed, ...
    residual_norms: Optional[torch.Tensor] = None  #: ||y - A(x0_hat)|| per DPS step and image, ``[S, B]``


def _check_clean_images(x: torch.Tensor) -> None:
    """``x`` is float ``[B >= 1, C, H, W]`` with finite values in [-1, 1] (the clean images to degrade)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        got = f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x: expected float images [B, C, H, W], got {got}")
    if x.shape[0] < 1:
        raise ValueError(f"x: expected at least one image, got shape {tuple(x.shape)}")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        raise ValueError(f"x: {int((~finite).sum())} of {x.numel()} values are NaN or infinite; expected clean "
                         f"images in [-1, 1]")
    low, high = float(x.min()), float(x.max())
    if low < -1.0 or high > 1.0:
        raise ValueError(f"x: expected clean images in [-1, 1] (diffcore.images.from_uint8 maps 8-bit pixels), got "
                         f"values in [{low:.4g}, {high:.4g}]")


def restore(model, diffusion, x: torch.Tensor, task: str, *, sigma_y: float = 0.05,
            noise: NoiseKind = "gaussian", photon_rate: float = 255.0, steps: Optional[int] = None,
            sampler: SamplerName = "ddpm", eta: float = 0.0, zeta: float = 1.0, seed: int = 0,
            operator_kwargs: Optional[dict[str, Any]] = None, clip_denoised: bool = True,
            progress: bool = True, precision: Precision = DEFAULT_PRECISION, compile: bool = False,
            batch_size: Optional[int] = None) -> Restoration:
    """Degrade ``x`` with ``task``'s operator and restore it by DPS and by the task's baseline.

    Args:
        model: ``model(x, t)`` of ``diffusion`` (eps/x0/v prediction; 2C output channels for learned variances),
            on the device to sample on. Parameters need no gradient (only the input's is taken).
        diffusion: the :class:`~diffcore.diffusion.GaussianDiffusion` it was trained with (T steps).
        x: clean images float ``[B, C, H, W]`` in [-1, 1], B >= 1 (any device; the work runs on the model's
            device); NaN or values outside [-1, 1] are an error naming ``x``.
        task: one of :data:`RESTORE_TASKS`; ``operator_kwargs`` go to :func:`~diffcore.inverse.make_operator`.
        sigma_y, noise, photon_rate: the measurement noise (:func:`make_measurement_noise`), drawn on the CPU from
            ``seed`` (float64), so y is identical on every device.
        steps: reverse steps (a respaced process; default all T); ``sampler`` "ddpm" (ancestral, DPS's Algorithm
            1) or "ddim" with ``eta``.
        zeta: DPS guidance scale; the step used is zeta / ||A||_2 (see the module docstring). 0: unguided.
        seed: Philox seed of DPS's and the naive baseline's noise (the same x_T for both) and of the measurement.
        clip_denoised: clamp x0_hat to [-1, 1] in the steps and the guidance (as DPS's official configs).
        precision: ``"fp32" | "bf16" | "fp16" | "auto"`` (default :data:`diffcore.runtime.DEFAULT_PRECISION`,
            fp32): the model's calls run under autocast to :func:`diffcore.runtime.resolve_precision`'s dtype; the
            operator and the DPS update stay float32 (see the module notes). "fp32" is the unwrapped model.
        compile: run the model through :func:`diffcore.runtime.compile_model` (an ``nn.Module``; graphs cached on
            disk; DPS differentiates through the compiled graph).
        batch_size: images restored per batch, an int >= 1 (default :func:`diffcore.runtime.default_batch_size`:
            64 on a CPU, all B on a GPU); the results are the same for every batch size up to float rounding,
            which DPS may amplify (see the module notes). DPS keeps one backward graph of the model per batch, so
            memory grows with it; larger batches are faster per image on a CPU (packaged model, sr4: batch 8 took
            0.45x the time of batches of 1).
    Returns: :class:`Restoration` (tensors on the CPU; ``settings`` records precision, dtype, compile and the batch
    size used).
    """
    if task not in RESTORE_TASKS:
        raise ValueError(f"task: expected one of {', '.join(RESTORE_TASKS)}, got {task!r}")
    _check_clean_images(x)
    for name, value in (("zeta", zeta), ("sigma_y", sigma_y), ("eta", eta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}: expected a float >= 0, got {type(value).__name__} {value!r}")
        if not 0.0 <= value < math.inf:
            raise ValueError(f"{name}: expected a finite float >= 0, got {value}")
    if eta != 0 and sampler != "ddim":
        raise ValueError(f"eta: applies to sampler='ddim' (DDIM's stochasticity), got eta={eta} with "
                         f"sampler={sampler!r}")
    T = diffusion.num_timesteps
    steps = T if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= T:
        raise ValueError(f"steps: expected an int in 2..{T} (the model's T), got {steps!r}")
    device = model_device(model) if isinstance(model, torch.nn.Module) else diffusion.device
    dtype = resolve_precision(precision, device)
    chunk = default_batch_size(x.shape[0], device) if batch_size is None else batch_size
    batches = batch_slices(x.shape[0], chunk)  # checks batch_size
    if not isinstance(compile, bool):
        raise TypeError(f"compile: expected a bool, got {type(compile).__name__}")
    runner = compile_model(model) if compile else model
    runner = runner if dtype == torch.float32 else AutocastModel(runner, dtype, device)
    operator = make_operator(task, tuple(int(s) for s in x.shape[1:]), **(operator_kwargs or {}))
    noise_model = make_measurement_noise(operator, noise, sigma_y=sigma_y, photon_rate=photon_rate)
    reference = x.detach().to("cpu", torch.float32)
    y = noise_model(operator(reference.double()), seed=seed).float()
    operator_norm = operator.spectral_norm()
    step_size = zeta / operator_norm

    skip = "uniform" if sampler == "ddim" and T % steps == 0 else "even"
    process = (diffusion.respaced(steps, skip) if steps < T else diffusion).to(device)
    loop = dict(sampler=sampler, eta=eta, clip_denoised=clip_denoised, seed=seed, progress=progress)
    operator = operator.to(device)
    y_dev = y.to(device)
    restored, norms, naive = [], [], []
    with eval_mode(model):
        for rows in batches:  # rows r .. r + k - 1 draw images r .. r + k - 1's noise of the seed
            part = dps_sample(runner, process, operator, y_dev[rows], zeta=step_size, noise_model=noise_model,
                              first_row=rows.start, **loop)
            restored.append(part.sample.detach().float().cpu())
            norms.append(part.residual_norms.detach().cpu())
            if isinstance(operator, MaskOperator):
                naive.append(naive_inpaint_sample(runner, process, operator, y_dev[rows], first_row=rows.start,
                                                  **loop).float().cpu())
    baseline = torch.cat(naive) if naive else pseudo_inverse_baseline(operator, y_dev).float().cpu()
    sample = require_finite(torch.cat(restored), f"restore ({task}): the DPS result")
    operator = operator.to("cpu")
    degraded, comparable = degraded_view(operator, y)
    settings = {"sampler": sampler, "steps": steps, "eta": float(eta) if sampler == "ddim" else None,
                "zeta": float(zeta), "operator_norm": operator_norm, "step_size": step_size,
                "noise": ({"kind": "gaussian", "sigma_y": float(sigma_y)} if noise == "gaussian" else
                          {"kind": "poisson", "photon_rate": float(photon_rate), "low": noise_model.low,
                           "high": noise_model.high}),
                "seed": int(seed), "clip_denoised": bool(clip_denoised), "num_timesteps": T,
                "operator": operator.extra_repr(), "operator_kwargs": dict(operator_kwargs or {}),
                "precision": precision, "dtype": str(dtype).replace("torch.", ""), "compile": compile,
                "batch_size": min(chunk, x.shape[0])}
    return Restoration(task=task, operator=operator, reference=reference, measurement=y, degraded=degraded,
                       degraded_comparable=comparable, restored=sample.clamp(-1, 1), baseline=baseline.clamp(-1, 1),
                       baseline_name=baseline_name(operator), settings=settings, residual_norms=torch.cat(norms, 1))


# ------------------------------------------------------------------------------------------------ scoring, writing
def _finite(value: float) -> Optional[float]:
    return float(value) if math.isfinite(value) else None


def restoration_metrics(result: Restoration) -> dict[str, Optional[dict[str, list]]]:
    """PSNR (dB) and SSIM against the clean input, per image (lists of length B), of ``degraded`` (None when not
    comparable), ``baseline`` and ``restored``; images clamped to [-1, 1] first (:func:`diffcore.inverse.psnr`).
    An infinite PSNR (identical images) is reported as None (JSON has no infinity), and so is the SSIM of images
    smaller than its :data:`SSIM_WINDOW` x :data:`SSIM_WINDOW` window (it has no value there)."""
    fits = min(result.reference.shape[-2:]) >= SSIM_WINDOW

    def score(images: torch.Tensor) -> dict[str, list]:
        similarity = ssim(images, result.reference, window=SSIM_WINDOW).tolist() if fits else [None] * len(images)
        return {"psnr": [_finite(v) for v in psnr(images, result.reference).tolist()],
                "ssim": [None if v is None else float(v) for v in similarity]}

    return {"degraded": score(result.degraded) if result.degraded_comparable else None,
            "baseline": score(result.baseline), "restored": score(result.restored)}


def write_restoration(result: Restoration, out_dir: "str | os.PathLike", *,
                      extra: Optional[dict[str, Any]] = None, replace: bool = True) -> dict[str, Any]:
    """Write ``degraded.png``, ``restored.png``, ``baseline.png`` (8-bit, one image each, clamped to [-1, 1])
    and ``metrics.json`` into ``out_dir`` (created), each atomically. Needs a single image (B = 1).

    metrics.json: task, baseline name, degraded_comparable, the settings, ``extra`` (e.g. input and checkpoint
    paths), and ``metrics`` = {"degraded": {"psnr", "ssim"} or null, "baseline": ..., "restored": ...} with
    floats measured on the unquantized images. All four files are written together or none
    (:func:`diffcore.outputs.write_together`): a non-finite image or setting is an error before anything is
    written. ``replace=False``: an existing file of :data:`RESTORATION_FILES` in ``out_dir`` is an error
    (FileExistsError) and nothing is written. Returns that dictionary.
    """
    if result.reference.shape[0] != 1:
        raise ValueError(f"result: write_restoration writes one image, got a batch of {result.reference.shape[0]}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out: {out} exists and is not a folder")
    scores = restoration_metrics(result)
    metrics = {name: (None if value is None else {k: v[0] for k, v in value.items()}) for name, value in
               scores.items()}
    report = {"task": result.task, "baseline": result.baseline_name,
              "degraded_comparable": result.degraded_comparable,
              "image_shape": list(result.reference.shape[1:]),
              "measurement_shape": list(result.measurement.shape[1:]),
              **(extra or {}), **result.settings, "metrics": metrics}
    try:
        text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    except ValueError as error:
        raise FloatingPointError(f"write_restoration: a setting or score is not finite ({error}); nothing was "
                                 f"written") from None
    pictures = dict(zip(RESTORATION_FILES, (result.degraded, result.restored, result.baseline)))
    files = {out / name: grid_png(images.float().clamp(-1, 1), nrow=1, padding=0) for name, images in pictures.items()}
    files[out / RESTORATION_FILES[-1]] = text.encode("utf-8")
    write_together(files, replace=replace)
    return report
