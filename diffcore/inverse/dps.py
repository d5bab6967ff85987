"""Diffusion Posterior Sampling (Chung et al. 2023, "Diffusion Posterior Sampling for General Noisy Inverse
Problems", Algorithms 1 and 2) on the DDPM and DDIM samplers.

At each step i of the reverse process, with x = x_i:

1. the model's prediction gives x0_hat(x) (Tweedie's estimate, eq. 10; ``formulas.predict_x0_eps``);
2. the unconditional step gives x'_{i-1} (``ops.ddpm_step`` or ``ops.ddim_step``, with the model output
   detached);
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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm

from ..reference import formulas
from ..types import PredictionType, VarianceType
from ._sampling import Model, Sampler, call_model, make_process, start
from .base import check_batch
from .noise import NoiseModel, residual_norm

__all__ = ["DPSResult", "dps_sample", "image_shape_for"]


@dataclass(frozen=True)
class DPSResult:
    """What :func:`dps_sample` returns."""

    sample: torch.Tensor  #: x_0, ``[B, C, H, W]``
    pred_x0: torch.Tensor  #: x0_hat at the last step, ``[B, C, H, W]``
    residual_norms: torch.Tensor  #: ||y - A(x0_hat)|| per step (first step first) and image, ``[S, B]``
    seed: int  #: the Philox seed the noise came from


def image_shape_for(operator: Callable, y: torch.Tensor, x_T: Optional[torch.Tensor]) -> tuple[int, ...]:
    """The ``[B, C, H, W]`` shape to sample: x_T's, or (y's batch,) + ``operator.image_shape``."""
    if x_T is not None:
        return tuple(x_T.shape)
    image_shape = getattr(operator, "image_shape", None)
    if image_shape is None:
        raise ValueError("x_T: needed to know the image shape, since the operator has no image_shape attribute")
    return (y.shape[0],) + tuple(image_shape)


def dps_sample(model: Model, operator: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor,
               alphas_cumprod: torch.Tensor, timestep_map: Optional[torch.Tensor] = None, *,
               zeta: float = 1.0, sampler: Sampler = "ddpm", eta: float = 0.0,
               noise_model: Optional[NoiseModel] = None,
               prediction_type: "PredictionType | str" = PredictionType.EPS,
               variance_type: "VarianceType | str" = VarianceType.FIXED_SMALL, clip_denoised: bool = False,
               x_T: Optional[torch.Tensor] = None, seed: Optional[int] = None,
               generator: Optional[torch.Generator] = None, model_kwargs: Optional[dict[str, Any]] = None,
               progress: bool = True) -> DPSResult:
    """Sample x ~ p(x | y) approximately by DPS, for measurements ``y = A(x) + noise``.

    Args:
        model: ``model(x, t, **model_kwargs)``; x ``[B, C, H, W]``, t int64 ``[B]`` original timesteps; returns
            ``[B, C, ...]`` or ``[B, 2C, ...]`` (the first C channels are the prediction, eps by default; the rest
            the variance output used by the DDPM step when ``variance_type`` is learned). Evaluated with grad.
        operator: the differentiable forward map A (a :class:`~diffcore.inverse.LinearOperator` or any callable
            ``[B, C, H, W] -> [B, ...]``).
        y: measurements ``[B, ...]``, same dtype and device as the images to produce.
        alphas_cumprod: float64 ``[S]``, alpha-bar of the (respaced) process.
        timestep_map: int64 ``[S]``, the original timestep of each index (default ``arange(S)``).
        zeta: guidance scale (see the module docstring), >= 0; 0 gives unconditional samples.
        sampler: ``"ddpm"`` (ancestral, per ``variance_type``) or ``"ddim"`` (with ``eta``).
        noise_model: defines the residual norm (its ``residual_norm(y, A x)``); None: the Euclidean norm.
        clip_denoised: clamp x0_hat to [-1, 1] in both the step and the guidance (the official configs do).
        x_T: starting noise ``[B, C, H, W]``; default Philox normals from ``seed``.
        seed: Philox seed of all the noise (see :mod:`diffcore.inverse._sampling`); default drawn from
            ``generator``.
        progress: show a tqdm bar.
    Returns: :class:`DPSResult` (sample in y's dtype).
    """
    if not zeta >= 0.0:
        raise ValueError(f"zeta: expected a guidance scale >= 0, got {zeta}")
    if not isinstance(y, torch.Tensor) or not y.is_floating_point() or y.dim() < 1:
        raise TypeError(f"y: expected a float tensor [B, ...] of measurements, got {type(y).__name__}")
    process = make_process(alphas_cumprod, timestep_map, y.device, sampler=sampler, eta=eta,
                           prediction_type=prediction_type, variance_type=variance_type,
                           clip_denoised=clip_denoised)
    norm_of = noise_model.residual_norm if noise_model is not None else residual_norm
    measurement_shape = getattr(operator, "measurement_shape", None)
    if measurement_shape is not None:
        check_batch("y", y, measurement_shape, "the operator's measurement_shape")
    shape = image_shape_for(operator, y, x_T)
    if shape[0] != y.shape[0]:
        raise ValueError(f"y: expected {shape[0]} measurements (one per image of x_T), got {y.shape[0]}")
    x, seed = start(shape, y, seed, generator, x_T)
    batch, steps = shape[0], process.num_steps
    norms = y.new_zeros((steps, batch))
    pred_x0 = torch.zeros_like(x)
    guided = zeta > 0.0  # zeta = 0: unconditional sampling, residual norms still recorded
    for k, i in enumerate(tqdm(range(steps - 1, -1, -1), desc="DPS", disable=not progress)):
        index = torch.full((batch,), i, dtype=torch.int64, device=x.device)
        t_model = process.timestep_map[index]
        x_in = x.detach().requires_grad_(guided)
        with torch.set_grad_enabled(guided):
            output = call_model(model, x_in, t_model, model_kwargs, process)
            abar = formulas.per_sample(process.alphas_cumprod[index], x_in).to(x_in.dtype)
            x0_hat, _ = formulas.predict_x0_eps(output[:, : x.shape[1]], x_in, abar, process.prediction_type,
                                                process.clip_denoised)
            norm = norm_of(y, operator(x0_hat))
            grad = torch.autograd.grad(norm.sum(), x_in)[0] if guided else None
        x_prev, pred_x0 = process.step(x_in.detach(), output.detach(), index, seed, process.noise_offset(k))
        x = (x_prev - zeta * grad).detach() if guided else x_prev
        norms[k] = norm.detach()
    return DPSResult(sample=x, pred_x0=pred_x0, residual_norms=norms, seed=seed)
