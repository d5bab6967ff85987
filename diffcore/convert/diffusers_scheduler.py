"""diffusers scheduler configs (``scheduler_config.json`` of DDPMScheduler / DDIMScheduler / ...) <->
:class:`~diffcore.diffusion.GaussianDiffusion`.

The process is the betas, the prediction type and the variance type; the sampler settings of a scheduler
(``clip_sample``, ``thresholding``, ``timestep_spacing``, ``set_alpha_to_one``, ``steps_offset``) are not part of it
and are passed to diffcore's samplers per call instead (``clip_denoised=...``, the ``steps`` list).

Betas: ``linear`` = linspace(beta_start, beta_end, T) (given explicitly, no 1000/T scaling), ``scaled_linear``,
``squaredcos_cap_v2`` (= diffcore's ``cosine``), ``sigmoid``, or ``trained_betas``; then
``rescale_betas_zero_snr``. diffcore computes them in float64 where diffusers uses float32 (relative differences
~1e-7). prediction_type ``epsilon`` / ``sample`` / ``v_prediction`` = ``eps`` / ``x0`` / ``v``; variance_type
``fixed_small`` (``fixed_small_log``), ``fixed_large`` (``fixed_large_log``), ``learned``, ``learned_range``.
One difference: diffusers' fixed_large uses beta_0 at t = 0, diffcore (improved-diffusion) beta~_1.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..diffusion import GaussianDiffusion
from ..schedules import named_betas
from ..types import PREDICTION_TYPE_ALIASES
from .state import ConversionError

__all__ = ["diffusion_from_diffusers_config", "diffusers_scheduler_config"]

def diffusion_from_diffusers_config(config: Mapping[str, Any]) -> GaussianDiffusion:
    """:meth:`GaussianDiffusion.from_diffusers_config`, with its errors (a schedule, prediction type or variance type
    diffcore does not have; ``rescale_betas_zero_snr`` without v-prediction, which diffcore refuses as singular)
    raised as :class:`ConversionError` naming the field."""
    try:
        return GaussianDiffusion.from_diffusers_config(config)
    except (TypeError, ValueError) as error:
        raise ConversionError(str(error) if str(error).startswith("scheduler config") else
                              f"scheduler config: {error}") from None


def _named_equivalent(betas: torch.Tensor) -> dict[str, Any]:
    T = betas.numel()
    candidates = [
        ("squaredcos_cap_v2", "cosine", {}),
        ("linear", "linear", {"beta_start": 1000.0 / T * 1e-4, "beta_end": 1000.0 / T * 0.02}),
        ("scaled_linear", "scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012}),
        ("sigmoid", "sigmoid", {"beta_start": 1e-4, "beta_end": 0.02}),
    ]
    for theirs, ours, kwargs in candidates:
        try:
            candidate = named_betas(ours, T, **kwargs)  # type: ignore[arg-type]
        except ValueError:
            continue
        if torch.equal(candidate, betas):
            return {"beta_schedule": theirs, **kwargs, "trained_betas": None}
    return {"beta_schedule": "linear", "trained_betas": betas.tolist()}


def diffusers_scheduler_config(diffusion: GaussianDiffusion, *, clip_sample: bool = False) -> dict[str, Any]:
    """A ``DDPMScheduler`` config (JSON-friendly dict) for ``diffusion``: a named beta schedule when diffcore's
    betas equal one bit for bit, else ``trained_betas``; ``clip_sample`` is the pipeline's default clipping.

    Raises :class:`ConversionError` for a respaced process (export the full one) or a variance type diffusers
    lacks."""
    if not isinstance(diffusion, GaussianDiffusion):
        raise ConversionError(f"diffusion: expected a GaussianDiffusion, got {type(diffusion).__name__}")
    if diffusion.timestep_map is not None:
        raise ConversionError("diffusion: a respaced process cannot be exported; export the full T-step process "
                              "(diffusers' schedulers choose their sampling steps themselves)")
    betas = diffusion.schedule.betas.detach().to("cpu", torch.float64)
    prediction = {v: k for k, v in PREDICTION_TYPE_ALIASES.items()}[diffusion.prediction_type]
    variance = diffusion.variance_type.name.lower()
    return {"_class_name": "DDPMScheduler", "num_train_timesteps": betas.numel(), **_named_equivalent(betas),
            "variance_type": variance, "prediction_type": prediction, "clip_sample": bool(clip_sample),
            "clip_sample_range": 1.0, "thresholding": False, "timestep_spacing": "leading", "steps_offset": 0,
            "rescale_betas_zero_snr": False}
