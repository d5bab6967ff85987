"""Diffusion Posterior Sampling (Chung et al. 2023, "Diffusion Posterior Sampling for General Noisy Inverse
Problems", Algorithms 1 and 2) on the DDPM and DDIM samplers.

At each step i of the reverse process, with x = x_i:

1. the model's prediction gives x0_hat(x) (Tweedie's estimate, eq. 10;
   :meth:`GaussianDiffusion.predict_x0_eps <diffcore.diffusion.GaussianDiffusion.predict_x0_eps>`);
2. the unconditional step gives x'_{i-1}: the samplers' reverse step (:mod:`diffcore.samplers.step`, DDPM or
   DDIM, with the model output detached), the very step of :func:`~diffcore.samplers.ddpm_sample` /
   :func:`~diffcore.samplers.ddim_sample`;
3. the guidance gradient g = grad_x ||y - A(x0_hat(x))|| flows back through the model; each image has its own
   residual norm (the sum of per-image norms is differentiated, so images of a batch do not interact, unlike the
   paper's code, which takes one norm over the whole batch);
4. x_{i-1} = x'_{i-1} - zeta g.

Since grad ||r|| = grad ||r||^2 / (2 ||r||), step 4 is Algorithm 1's x'_{i-1} - zeta_i grad ||r||^2 with the
residual-normalized step size zeta_i = zeta' / ||r|| of the paper's appendix, zeta = 2 zeta'; ``zeta`` is the
``scale`` of the official code (github.com/DPS2022/diffusion-posterior-sampling). With a :class:`PoissonNoise`
model the norm is its weighted norm (Algorithm 2).

Nothing is kept across steps (x is detached after each), so memory does not grow with the number of steps;
nothing is read back to the host inside the loop (the per-step residual norms are written into a tensor).

The process is a :class:`~diffcore.diffusion.GaussianDiffusion` as for every sampler: pass the respaced one
(``diffusion.respaced(250)``) or ``steps=``. Noise follows the samplers' convention (Philox keyed by one seed:
x_T at offset 0, step k at offset k + 1; row b is image ``first_row + b`` of the seed), so DPS with zeta = 0
reproduces ``ddpm_sample`` / ``ddim_sample`` of the same process and seed exactly. Since the guidance of image b
depends only on image b (step 3) and its noise only on (seed, first_row + b), a set of measurements split into
batches, each run with ``first_row`` = the index of its first row in the set, gives the restorations of the whole
set in one call up to float rounding of the model's batched arithmetic, which DPS can amplify (measured in
:mod:`diffcore.pipelines.restore`, whose ``restore`` splits a set this way with ``batch_size``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..diffusion import GaussianDiffusion, Model
from ..ops import Impl
from ..respace import SkipType, StepsSpec
from ..samplers.loop import Intermediates, StepCallback, prepare, steps_progress, timestep_rows
from ..samplers.step import SamplerName, reverse_step
from .base import check_batch
from .noise import NoiseModel, residual_norm

__all__ = ["DPSResult", "dps_sample", "image_shape_for", "start_from_measurement"]

#: a forward map A: ``[B, C, H, W] -> [B, ...]`` (a :class:`~diffcore.inverse.LinearOperator` or any callable)
Operator = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DPSResult:
    """What :func:`dps_sample` returns."""

    sample: torch.Tensor  #: x_0, ``[B, C, H, W]``
    pred_x0: torch.Tensor  #: x0_hat at the last step, ``[B, C, H, W]``
    residual_norms: torch.Tensor  #: ||y - A(x0_hat)|| per step (first step first) and image, ``[S, B]``
    seed: int  #: the Philox seed the noise came from


def image_shape_for(operator: Operator, y: torch.Tensor, x_T: Optional[torch.Tensor]) -> tuple[int, ...]:
    """The ``[B, C, H, W]`` shape to sample: x_T's, or (y's batch,) + ``operator.image_shape``."""
    if x_T is not None:
        return tuple(x_T.shape)
    image_shape = getattr(operator, "image_shape", None)
    if image_shape is None:
        raise ValueError("x_T: needed to know the image shape, since the operator has no image_shape attribute")
    return (y.shape[0],) + tuple(image_shape)


def start_from_measurement(diffusion: GaussianDiffusion, operator: Operator, y: torch.Tensor,
                           x_T: Optional[torch.Tensor], *, steps: Optional[StepsSpec], skip_type: SkipType,
                           seed: Optional[int], generator: Optional[torch.Generator], first_row: int = 0
                           ) -> tuple[GaussianDiffusion, torch.Tensor, int]:
    """The setup of a loop that samples images for measurements ``y`` ``[B, ...]`` (checked once, before it).

    Returns (the process, respaced by ``steps`` when given and on y's device; x_T ``[B, C, H, W]`` in y's dtype,
    given or Philox noise of the seed at offset 0, row b drawn as image ``first_row + b`` of the seed; the seed,
    given or drawn from ``generator``). ``first_row`` is checked against B (an int, ``0 <= first_row <= 2**32 - B``).
    """
    if not isinstance(diffusion, GaussianDiffusion):
        raise TypeError(f"diffusion: expected a GaussianDiffusion (respaced for fewer steps), got "
                        f"{type(diffusion).__name__}")
    if not callable(operator):
        raise TypeError(f"operator: expected a callable forward map A(x), got {type(operator).__name__}")
    if not isinstance(y, torch.Tensor) or not y.is_floating_point() or y.dim() < 1:
        raise TypeError(f"y: expected a float tensor [B, ...] of measurements, got {type(y).__name__}")
    measurement_shape = getattr(operator, "measurement_shape", None)
    if measurement_shape is not None:
        check_batch("y", y, measurement_shape, "the operator's measurement_shape")
    shape = image_shape_for(operator, y, x_T)
    if shape[0] != y.shape[0]:
        raise ValueError(f"y: expected {shape[0]} measurements (one per image of x_T), got {y.shape[0]}")
    if x_T is not None:
        if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point():
            raise TypeError(f"x_T: expected a float tensor [B, C, H, W], got {type(x_T).__name__}")
        x_T = x_T.to(device=y.device, dtype=y.dtype)
    if steps is not None:
        diffusion = diffusion.respaced(steps, skip_type)
    return prepare(diffusion, None if x_T is not None else shape, x_T, dtype=y.dtype, device=y.device, seed=seed,
                   generator=generator, needs_noise=True, first_row=first_row)


def dps_sample(model: Model, diffusion: GaussianDiffusion, operator: Operator, y: torch.Tensor, *,
               zeta: float = 1.0, noise_model: Optional[NoiseModel] = None, sampler: SamplerName = "ddpm",
               steps: Optional[StepsSpec] = None, skip_type: SkipType = "even", eta: float = 0.0,
               x_T: Optional[torch.Tensor] = None, clip_denoised: bool = False,
               model_kwargs: Optional[dict[str, Any]] = None, seed: Optional[int] = None,
               generator: Optional[torch.Generator] = None, progress: bool = True,
               callback: Optional[StepCallback] = None, impl: Impl = "auto", first_row: int = 0) -> DPSResult:
    """Sample x ~ p(x | y) approximately by DPS, for measurements ``y = A(x) + noise``.

    Args:
        model: ``model(x, t, **model_kwargs)`` as for every sampler (:mod:`diffcore.samplers`): x
            ``[B, C, H, W]``, t int64 ``[B]`` original timesteps; returns ``[B, C, ...]`` or ``[B, 2C, ...]``
            (learned variance). Evaluated with grad (only x's gradient is taken).
        diffusion: the process (its prediction and variance types and tables); every one of its timesteps is
            visited, so pass a respaced one (``diffusion.respaced(250)``) or ``steps``.
        operator: the differentiable forward map A (a :class:`~diffcore.inverse.LinearOperator` or any callable
            ``[B, C, H, W] -> [B, ...]``; without ``image_shape`` x_T must be given).
        y: measurements ``[B, ...]``, same dtype and device as the images to produce.
        zeta: guidance scale (see the module docstring), a finite float >= 0; 0 gives unconditional samples.
        noise_model: defines the residual norm (its ``residual_norm(y, A x)``); None: the Euclidean norm.
        sampler: ``"ddpm"`` (ancestral, per the variance type) or ``"ddim"`` (with ``eta``).
        steps, skip_type: respace ``diffusion`` first (as :func:`~diffcore.samplers.ddpm_sample` does); None
            keeps it as given.
        clip_denoised: clamp x0_hat to [-1, 1] in both the step and the guidance (the official configs do).
        x_T: starting noise ``[B, C, H, W]``; default Philox normals from ``seed``.
        seed / generator: the Philox seed of all the noise; default drawn from ``generator``.
        progress: show a tqdm bar. callback: ``callback(step, t, x, pred_x0)`` after each step
            (t: the model's timestep); returning True stops the loop (``residual_norms`` then has the steps taken).
        impl: ``"auto" | "fused" | "reference"`` for the step ops.
        first_row: the index of y's first row in a larger set split into batches (an int >= 0 with
            ``first_row + B <= 2**32``): row b draws the noise (x_T and every step's) of image ``first_row + b`` of
            the seed, so the rows r .. r + k - 1 of a call on the whole set equal a call on those rows with
            ``first_row=r`` (the images of a batch do not interact: each has its own residual norm).
    Returns: :class:`DPSResult` (sample in y's dtype).
    """
    if isinstance(zeta, bool) or not isinstance(zeta, (int, float)) or not 0.0 <= zeta < float("inf"):
        raise ValueError(f"zeta: expected a finite guidance scale >= 0, got {zeta!r}")
    diffusion, x, seed = start_from_measurement(diffusion, operator, y, x_T, steps=steps, skip_type=skip_type,
                                                seed=seed, generator=generator, first_row=first_row)
    step = reverse_step(diffusion, sampler, eta=eta, clip_denoised=clip_denoised, seed=seed, impl=impl,
                        first_row=first_row)
    norm_of = noise_model.residual_norm if noise_model is not None else residual_norm
    batch, channels, num_steps = x.shape[0], x.shape[1], diffusion.num_timesteps
    rows = timestep_rows(range(num_steps - 1, -1, -1), batch, x.device)
    prev_rows = rows - 1  # DDIM's target index (-1: the final step to abar = 1)
    norms = y.new_zeros((num_steps, batch))
    pred_x0 = torch.zeros_like(x)
    record = Intermediates(False, callback, diffusion.original_timesteps[::-1])
    guided = zeta > 0.0  # zeta = 0: unconditional sampling, residual norms still recorded
    for k in steps_progress(num_steps, progress, "DPS"):
        x_in = x.detach().requires_grad_(guided)
        with torch.set_grad_enabled(guided):
            output = diffusion.call_model(model, x_in, rows[k], model_kwargs)
            prediction, _ = diffusion.split_output(output, channels)
            x0_hat, _ = diffusion.predict_x0_eps(prediction, x_in, rows[k], clip_denoised)
            norm = norm_of(y, operator(x0_hat))
            grad = torch.autograd.grad(norm.sum(), x_in)[0] if guided else None
        x_prev, pred_x0 = step(x_in.detach(), output.detach(), rows[k], prev_rows[k], k)
        x = (x_prev - zeta * grad).detach() if guided else x_prev
        norms[k] = norm.detach()
        if record.add(x, pred_x0):
            norms = norms[:k + 1]
            break
    return DPSResult(sample=x, pred_x0=pred_x0, residual_norms=norms, seed=seed)
