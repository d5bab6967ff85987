"""One reverse step of a :class:`~diffcore.diffusion.GaussianDiffusion`, shared by every loop that steps the
reverse process with the fused ops: :func:`~diffcore.samplers.ddpm_sample`, :func:`~diffcore.samplers.ddim_sample`,
DPS (:func:`diffcore.inverse.dps_sample`: this step plus its guidance gradient) and the naive inpainting baseline.

:func:`reverse_step` checks the loop's settings once (sampler name, eta, flags, the process length) and returns a
:class:`ReverseStep`; calling it per step only slices the model output and calls the op with ``validated=True`` (no Python
re-validation per step, timesteps unchecked, no host-device sync; the C++ op still checks shapes and devices). Noise: step k (0-based, in visiting order) draws inside the op at Philox offset k + 1 of the
loop's seed (offset 0 is x_T, :func:`~diffcore.samplers.initial_noise`), row b as image ``first_row + b``.

Clipping conventions (``clip_denoised=True``, x0_hat clamped to [-1, 1]): with ``rederive_eps_from_clipped_x0``
(the default, improved-diffusion's and DDIM's official code's choice; diffusers' DDIMScheduler with
``use_clipped_model_output=True``) DDIM continues from the eps re-derived from the clamped x0_hat; without it
(diffusers' DDIMScheduler default) from the model's own eps, so
x_s = sqrt(abar_s) clamp(x0_hat) + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z. The op computes the unclipped
step and the clamp is applied outside it: x_s = x_s(unclipped) + sqrt(abar_s) (clamp(x0_hat) - x0_hat).
DDPM's mean uses only x0_hat, so the choice does not arise there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, get_args

import torch

from .. import ops
from ..diffusion import GaussianDiffusion
from ..ops import Impl
from ..reference.formulas import per_sample
from ..types import PredictionType, VarianceType

#: the reverse steps a loop can take: DDPM's ancestral step or DDIM's generalized step (with eta)
SamplerName = Literal["ddpm", "ddim"]
SAMPLER_NAMES: tuple[str, ...] = get_args(SamplerName)

__all__ = ["SamplerName", "SAMPLER_NAMES", "ReverseStep", "reverse_step", "check_eta"]


def check_eta(eta: float) -> float:
    """``eta`` checked once per loop: a finite real >= 0 (not a bool); returns it as a float."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (math.isfinite(eta) and eta >= 0.0):
        raise ValueError(f"eta: expected a float >= 0, got {eta!r}")
    return float(eta)


@dataclass(frozen=True)
class ReverseStep:
    """The reverse step of a loop, its settings checked (build it with :func:`reverse_step`).

    Call ``step(x, output, t, t_prev, k)`` with x ``[B, C, ...]``, the model's output checked by
    :meth:`GaussianDiffusion.call_model <diffcore.diffusion.GaussianDiffusion.call_model>` (``[B, C, ...]`` or
    ``[B, 2C, ...]``), t and t_prev int64 ``[B]`` indices into the process's tables (t_prev: DDIM's target, -1
    for the final step to abar = 1; ignored by DDPM, which steps to t - 1) and k the 0-based step number (its
    noise is at Philox offset k + 1). Returns (x_prev, pred_x0), both like x.
    """

    alphas_cumprod: torch.Tensor  #: the process's abar table (float64 ``[T]``, on x's device)
    prediction_type: PredictionType
    variance_type: VarianceType
    sampler: SamplerName
    eta: float  #: DDIM's stochasticity (0 for DDPM)
    clip_denoised: bool
    rederive_eps_from_clipped_x0: bool
    seed: Optional[int]  #: Philox seed of the step noise; None only for deterministic DDIM (eta = 0)
    impl: Impl
    first_row: int = 0  #: image index of row 0 in the seed's numbering (row b draws image first_row + b's noise)

    def __call__(self, x: torch.Tensor, output: torch.Tensor, t: torch.Tensor, t_prev: Optional[torch.Tensor],
                 k: int) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.alphas_cumprod
        if self.sampler == "ddpm":
            return ops.ddpm_step(x, output, t, abar, prediction_type=self.prediction_type,
                                 variance_type=self.variance_type, clip_denoised=self.clip_denoised,
                                 seed=self.seed, offset=k + 1, first_row=self.first_row, impl=self.impl,
                                 validated=True)
        prediction = output[:, :x.shape[1]] if self.variance_type.is_learned else output
        clip_in_op = self.clip_denoised and self.rederive_eps_from_clipped_x0
        x_prev, pred_x0 = ops.ddim_step(x, prediction, t, t_prev, abar, self.eta,
                                        prediction_type=self.prediction_type, clip_denoised=clip_in_op,
                                        seed=self.seed if self.eta > 0 else None, offset=k + 1,
                                        first_row=self.first_row, impl=self.impl, validated=True)
        if self.clip_denoised and not clip_in_op:
            clipped = pred_x0.clamp(-1.0, 1.0)
            abar_prev = torch.where(t_prev >= 0, abar[t_prev.clamp(min=0)], torch.ones_like(abar[t]))
            x_prev = x_prev + per_sample(abar_prev.sqrt(), x).to(x.dtype) * (clipped - pred_x0)
            pred_x0 = clipped
        return x_prev, pred_x0


def reverse_step(diffusion: GaussianDiffusion, sampler: SamplerName, *, eta: float = 0.0,
                 clip_denoised: bool = False, rederive_eps_from_clipped_x0: bool = True,
                 seed: Optional[int] = None, impl: Impl = "auto", first_row: int = 0) -> ReverseStep:
    """The :class:`ReverseStep` of a loop on ``diffusion`` (already on the sampling device), checked once.

    Args:
        sampler: ``"ddpm"`` (ancestral, with the process's variance type; needs T >= 2) or ``"ddim"``.
        eta: DDIM's stochasticity, a finite float >= 0 (checked for both; DDPM ignores it).
        clip_denoised: clamp x0_hat to [-1, 1]. rederive_eps_from_clipped_x0: see the module docstring.
        seed: the loop's Philox seed (needed unless the step is deterministic DDIM).
        impl: ``"auto" | "fused" | "reference"`` for the ops.
        first_row: the image index of the batch's row 0 in the seed's numbering (an int in [0, 2**32); the
            ops check it against the batch size): row b draws image first_row + b's noise.
    """
    if sampler not in SAMPLER_NAMES:
        raise ValueError(f"sampler: expected one of {', '.join(map(repr, SAMPLER_NAMES))}, got {sampler!r}")
    eta = check_eta(eta)
    if sampler == "ddpm" and diffusion.num_timesteps < 2:
        raise ValueError(f"diffusion: the DDPM step needs a process of at least 2 timesteps, got "
                         f"{diffusion.num_timesteps}")
    for name, flag in (("clip_denoised", clip_denoised), ("rederive_eps_from_clipped_x0",
                                                          rederive_eps_from_clipped_x0)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected a bool, got {type(flag).__name__} {flag!r}")
    noisy = sampler == "ddpm" or eta > 0
    if noisy and seed is None:
        raise ValueError(f"seed: the {sampler} step with eta={eta} draws noise and needs the loop's seed, got None")
    if seed is not None:
        seed = ops.check_seed(seed)
    first_row = ops.check_first_row(first_row, 0)
    path = ops.which_impl(diffusion.alphas_cumprod.device, impl)  # checks impl once; the steps take the path
    return ReverseStep(diffusion.alphas_cumprod, diffusion.prediction_type, diffusion.variance_type, sampler,
                       eta if sampler == "ddim" else 0.0, clip_denoised, rederive_eps_from_clipped_x0,
                       seed if noisy else None, path, first_row)
