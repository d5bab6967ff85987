"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) over the full or a respaced process (I-DDPM sec. 4)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..diffusion import GaussianDiffusion, Model
from ..ops import Impl
from ..respace import StepsSpec
from .spacing import Spacing, sampling_timesteps
from .loop import Intermediates, SampleResult, StepCallback, prepare, steps_progress, timestep_rows
from .step import reverse_step

__all__ = ["ddpm_sample"]


@torch.no_grad()
def ddpm_sample(model: Model, diffusion: GaussianDiffusion, shape: Optional[Sequence[int]] = None, *,
                x_T: Optional[torch.Tensor] = None, steps: Optional[StepsSpec] = None, skip_type: Spacing = "even",
                clip_denoised: bool = False, model_kwargs: Optional[dict] = None, seed: Optional[int] = None,
                generator: Optional[torch.Generator] = None, progress: bool = True,
                return_intermediates: bool = False, callback: Optional[StepCallback] = None,
                dtype: torch.dtype = torch.float32, device: "torch.device | str | None" = None,
                impl: Impl = "auto", first_row: int = 0) -> SampleResult:
    """Ancestral sampling x_{t-1} = mu~(x0_hat, x_t) + [t > 0] sigma_t z from x_T down to x_0.

    Args:
        model: ``model(x [B, C, ...], t int64 [B] original timesteps, **model_kwargs)`` -> ``[B, C, ...]``
            (fixed variance) or ``[B, 2C, ...]`` (learned variance), as a tensor or wrapped (see
            :mod:`diffcore.samplers`).
        diffusion: the process (prediction and variance types, tables).
        shape: ``(B, C, ...)`` of the samples when ``x_T`` is not given (x_T is then Philox noise of ``seed``).
        steps: None for every timestep, else a respacing (a count spaced by ``skip_type``, a string like "250"
            or the kept timesteps): sampling runs on the respaced process, whose betas (and so the learned-range
            variance bounds beta'_t, beta~'_t) are recomputed; the model still gets the original t.
        clip_denoised: clamp x0_hat to [-1, 1] (images).
        seed / generator: the Philox seed of x_T and of the per-step noise (drawn from ``generator`` if None).
        progress: show a tqdm bar. return_intermediates: keep x_t and pred_x0 of every step.
        callback: ``callback(step, t, x, pred_x0)`` after each step; returning True stops the loop.
        impl: ``"auto" | "fused" | "reference"`` for :func:`diffcore.ops.ddpm_step`.
        first_row: the image index of row 0 in the seed's numbering, as in :func:`~diffcore.samplers.ddim_sample`.
    Returns: a :class:`SampleResult`; ``sample`` is ``[B, C, ...]`` in x_T's dtype.
    """
    if steps is not None:
        diffusion = diffusion.respaced(sampling_timesteps(diffusion.alphas_cumprod, steps, skip_type))
    diffusion, x, seed = prepare(diffusion, shape, x_T, dtype=dtype, device=device, seed=seed,
                                 generator=generator, needs_noise=True, first_row=first_row)
    step = reverse_step(diffusion, "ddpm", clip_denoised=clip_denoised, seed=seed, impl=impl, first_row=first_row)
    T = diffusion.num_timesteps
    indices = list(range(T - 1, -1, -1))
    rows = timestep_rows(indices, x.shape[0], x.device)
    model_ts = [diffusion.original_timesteps[i] for i in indices]
    record = Intermediates(return_intermediates, callback, model_ts)
    for k in steps_progress(T, progress, "DDPM"):
        out = diffusion.call_model(model, x, rows[k], model_kwargs)
        x, pred_x0 = step(x, out, rows[k], None, k)
        if record.add(x, pred_x0):
            break
    return record.result(x, model_ts, seed)
