"""Baselines to compare DPS with on the same measurements.

- :func:`naive_inpaint_sample`: unconditional reverse process in which, after every step, the observed pixels
  are replaced by the measurement noised to the current level (the "replacement" / score-SDE inpainting
  method that DPS and RePaint compare with); at the last step by the measurement itself.
- :func:`pseudo_inverse_baseline`: the operator's pseudo-inverse / back-projection of y, clamped to the image
  range (observed pixels with zeros, nearest or Moore-Penrose up-sampling, damped least-squares deblurring,
  filtered back-projection).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from .. import ops
from ..reference.philox import philox_normal_like
from ..types import PredictionType, VarianceType
from ._sampling import Model, Sampler, call_model, make_process, start
from .base import LinearOperator
from .masks import MaskOperator

__all__ = ["naive_inpaint_sample", "pseudo_inverse_baseline"]


def pseudo_inverse_baseline(operator: LinearOperator, y: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """``operator.pseudo_inverse(y)`` (``[B, *measurement_shape] -> [B, C, H, W]``), clamped to [-1, 1]."""
    if not isinstance(operator, LinearOperator):
        raise TypeError(f"operator: expected a LinearOperator, got {type(operator).__name__}")
    x = operator.pseudo_inverse(y)
    return x.clamp(-1.0, 1.0) if clamp else x


@torch.no_grad()
def naive_inpaint_sample(model: Model, operator: MaskOperator, y: torch.Tensor, alphas_cumprod: torch.Tensor,
                         timestep_map: Optional[torch.Tensor] = None, *, sampler: Sampler = "ddpm",
                         eta: float = 0.0, prediction_type: "PredictionType | str" = PredictionType.EPS,
                         variance_type: "VarianceType | str" = VarianceType.FIXED_SMALL,
                         clip_denoised: bool = False, x_T: Optional[torch.Tensor] = None,
                         seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                         model_kwargs: Optional[dict[str, Any]] = None, progress: bool = True) -> torch.Tensor:
    """Inpainting by replacement: x_{i-1} = m * q(y at index i-1) + (1 - m) * step(x_i).

    Args as in :func:`diffcore.inverse.dps_sample` (``model``, the tables, sampler settings, seeding); the
    operator must be a :class:`MaskOperator` (inpaint-box, inpaint-random, outpaint) and y its measurement
    ``[B, C, H, W]`` (observed pixels, anything elsewhere). The replacement noise is drawn from the same seed
    at the "extra" Philox offsets. Returns the samples ``[B, C, H, W]``, equal to y on the observed pixels.
    """
    if not isinstance(operator, MaskOperator):
        raise TypeError(f"operator: the naive baseline needs a MaskOperator (inpainting/outpainting), "
                        f"got {type(operator).__name__}")
    operator._check_measurement(y)
    process = make_process(alphas_cumprod, timestep_map, y.device, sampler=sampler, eta=eta,
                           prediction_type=prediction_type, variance_type=variance_type,
                           clip_denoised=clip_denoised)
    x, seed = start((y.shape[0],) + operator.image_shape, y, seed, generator, x_T)
    mask = operator.mask.to(device=y.device, dtype=y.dtype)
    known = y * mask
    batch, steps = y.shape[0], process.num_steps
    for k, i in enumerate(tqdm(range(steps - 1, -1, -1), desc="naive inpainting", disable=not progress)):
        index = torch.full((batch,), i, dtype=torch.int64, device=x.device)
        output = call_model(model, x, process.timestep_map[index], model_kwargs, process)
        x, _ = process.step(x, output, index, seed, process.noise_offset(k))
        if i > 0:
            noise = philox_normal_like(x, seed, process.noise_offset(k, extra=True))
            target = ops.q_sample(known, noise, index - 1, process.alphas_cumprod, check_values=False)
        else:
            target = known
        x = mask * target + (1.0 - mask) * x
    return x
