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

from .. import ops
from ..diffusion import GaussianDiffusion, Model
from ..ops import Impl
from ..reference.philox import philox_normal_like
from ..respace import SkipType, StepsSpec
from ..samplers.loop import Intermediates, StepCallback, steps_progress, timestep_rows
from ..samplers.step import SamplerName, reverse_step
from .base import LinearOperator
from .dps import start_from_measurement
from .masks import MaskOperator

__all__ = ["naive_inpaint_sample", "pseudo_inverse_baseline"]


def pseudo_inverse_baseline(operator: LinearOperator, y: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """``operator.pseudo_inverse(y)`` (``[B, *measurement_shape] -> [B, C, H, W]``), clamped to [-1, 1]."""
    if not isinstance(operator, LinearOperator):
        raise TypeError(f"operator: expected a LinearOperator, got {type(operator).__name__}")
    x = operator.pseudo_inverse(y)
    return x.clamp(-1.0, 1.0) if clamp else x


@torch.no_grad()
def naive_inpaint_sample(model: Model, diffusion: GaussianDiffusion, operator: MaskOperator, y: torch.Tensor, *,
                         sampler: SamplerName = "ddpm", steps: Optional[StepsSpec] = None,
                         skip_type: SkipType = "even", eta: float = 0.0, x_T: Optional[torch.Tensor] = None,
                         clip_denoised: bool = False, model_kwargs: Optional[dict[str, Any]] = None,
                         seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                         progress: bool = True, callback: Optional[StepCallback] = None,
                         impl: Impl = "auto", first_row: int = 0) -> torch.Tensor:
    """Inpainting by replacement: x_{i-1} = m * q(y at index i-1) + (1 - m) * step(x_i).

    Args as in :func:`diffcore.inverse.dps_sample` (``model``, ``diffusion``, sampler settings, seeding; the
    step is the samplers' reverse step); the operator must be a :class:`MaskOperator` (inpaint-box,
    inpaint-random, outpaint) and y its measurement ``[B, C, H, W]`` (observed pixels, anything elsewhere).
    Noise: x_T at Philox offset 0 and step k at offset k + 1 of the seed, as in every sampler; the replacement
    noise of step k at offset 1 + S + k (S steps); row b draws image ``first_row + b``'s noise of the seed, so a set
    split into batches (each with ``first_row`` = its first row's index in the set) gives the rows of one call on
    the whole set (checked as in :func:`~diffcore.inverse.dps_sample`). ``callback(step, t, x, pred_x0)`` sees x
    after the replacement; returning True stops the loop.
    Returns the samples ``[B, C, H, W]``, equal to y on the observed pixels.
    """
    if not isinstance(operator, MaskOperator):
        raise TypeError(f"operator: the naive baseline needs a MaskOperator (inpainting/outpainting), "
                        f"got {type(operator).__name__}")
    diffusion, x, seed = start_from_measurement(diffusion, operator, y, x_T, steps=steps, skip_type=skip_type,
                                                seed=seed, generator=generator, first_row=first_row)
    step = reverse_step(diffusion, sampler, eta=eta, clip_denoised=clip_denoised, seed=seed, impl=impl,
                        first_row=first_row)
    mask = operator.mask.to(device=y.device, dtype=y.dtype)
    known = y * mask
    batch, num_steps = y.shape[0], diffusion.num_timesteps
    rows = timestep_rows(range(num_steps - 1, -1, -1), batch, x.device)
    prev_rows = rows - 1
    record = Intermediates(False, callback, diffusion.original_timesteps[::-1])
    for k in steps_progress(num_steps, progress, "naive inpainting"):
        out = diffusion.call_model(model, x, rows[k], model_kwargs)
        x, pred_x0 = step(x, out, rows[k], prev_rows[k], k)
        if k < num_steps - 1:
            noise = philox_normal_like(x, seed, 1 + num_steps + k, first_row)
            target = ops.q_sample(known, noise, prev_rows[k], diffusion.alphas_cumprod, impl=impl,
                                  check_values=False)
        else:
            target = known
        x = mask * target + (1.0 - mask) * x
        if record.add(x, pred_x0):
            break
    return x
