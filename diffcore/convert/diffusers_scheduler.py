"""diffusers scheduler configs (``scheduler_config.json`` of DDPMScheduler / DDIMScheduler / ...) <->
:class:`~diffcore.diffusion.GaussianDiffusion`.

The process is the betas, the prediction type and the variance type; the sampler settings of a scheduler
(``clip_sample``, ``thresholding``, ``timestep_spacing``, ``set_alpha_to_one``, ``steps_offset``) are not part of it
and are passed to diffcore's samplers per call instead (``clip_denoised=...``, the ``steps`` list). Settings that
diffcore's samplers cannot reproduce, or that its defaults do not (see :func:`sampler_setting_notes`), are named in
a warning on import.

Betas: ``linear`` = linspace(beta_start, beta_end, T) (given explicitly, no 1000/T scaling), ``scaled_linear``,
``squaredcos_cap_v2`` (= diffcore's ``cosine``), ``sigmoid``, or ``trained_betas``; then
``rescale_betas_zero_snr``. diffcore computes them in float64 where diffusers uses float32 (relative differences
~1e-7). prediction_type ``epsilon`` / ``sample`` / ``v_prediction`` = ``eps`` / ``x0`` / ``v``; variance_type
``fixed_small`` (``fixed_small_log``), ``fixed_large`` (``fixed_large_log``: GLIDE's max_log, which diffusers'
own DDPMScheduler.step turns into NaN), ``learned_range``. diffusers' ``learned`` is refused both ways: there the
model's extra channels are the variance itself, in diffcore's (improved-diffusion's) ``learned`` its log.
One difference: diffusers' fixed_large uses beta_0 at t = 0, diffcore (improved-diffusion) beta~_1 (the samplers add
no noise at t = 0, so only the likelihood at t = 0 sees it).
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch

from ..diffusion import DIFFUSERS_LEARNED_VARIANCE, GaussianDiffusion
from ..schedules import named_betas
from ..types import PREDICTION_TYPE_ALIASES
from .state import ConversionError

__all__ = ["diffusion_from_diffusers_config", "diffusers_scheduler_config", "sampler_setting_notes"]


def sampler_setting_notes(config: Mapping[str, Any]) -> list[str]:
    """What a scheduler config asks of sampling that diffcore's samplers with their defaults (``diffcore sample``:
    x0_hat clipped to [-1, 1], DDIM's last step to abar = 1) do not do: one sentence per setting, naming it and
    what to do instead ([] when there is nothing to say). ``timestep_spacing`` / ``steps_offset`` are not listed:
    diffcore's ``--schedule`` chooses the sampling steps (``uniform`` = diffusers' ``leading`` with no offset,
    ``trailing`` = ``trailing``)."""
    notes = []
    if config.get("thresholding", False):
        notes.append("thresholding=True: diffcore has no dynamic thresholding; its samplers clip x0_hat to [-1, 1] "
                     "(clip_denoised=True) or not at all")
    elif config.get("clip_sample", True):
        bound = config.get("clip_sample_range", 1.0)
        if bound != 1.0:
            notes.append(f"clip_sample_range={bound!r}: diffcore clips x0_hat to [-1, 1] only; sample with "
                         f"clip_denoised=False (--no-clip) and clamp yourself")
    else:
        notes.append("clip_sample=False: diffcore's sample / restore clip x0_hat to [-1, 1] by default; pass "
                     "clip_denoised=False (--no-clip) to sample as this scheduler does")
    if config.get("set_alpha_to_one", True) is False:
        notes.append("set_alpha_to_one=False: diffcore's DDIM ends at abar = 1 (x0_hat), this scheduler one step "
                     "short of it, at abar_0")
    return notes


def diffusion_from_diffusers_config(config: Mapping[str, Any]) -> GaussianDiffusion:
    """:meth:`GaussianDiffusion.from_diffusers_config`, with its errors (a schedule, prediction type or variance type
    diffcore does not have; ``rescale_betas_zero_snr`` without v-prediction, which diffcore refuses as singular)
    raised as :class:`ConversionError` naming the field, ``variance_type="learned"`` included (it means another
    function of the model's output in diffusers than in diffcore). Warns (UserWarning, one message) listing the
    :func:`sampler_setting_notes`."""
    try:
        diffusion = GaussianDiffusion.from_diffusers_config(config)
    except (TypeError, ValueError) as error:
        raise ConversionError(str(error) if str(error).startswith("scheduler config") else
                              f"scheduler config: {error}") from None
    notes = sampler_setting_notes(config)
    if notes:
        warnings.warn("scheduler config: sampling settings diffcore does not take from it: " + "; ".join(notes),
                      stacklevel=2)
    return diffusion


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


def diffusers_scheduler_config(diffusion: GaussianDiffusion, *, clip_sample: bool = True) -> dict[str, Any]:
    """A ``DDPMScheduler`` config (JSON-friendly dict) for ``diffusion``: a named beta schedule when diffcore's
    betas equal one bit for bit, else ``trained_betas``; ``clip_sample`` is the pipeline's clipping of x0_hat to
    [-1, 1] (default True: what ``diffcore sample`` does by default, so ``DDPMPipeline`` samples the same chain).

    Raises :class:`ConversionError` for a respaced process (export the full one) or a variance type diffusers
    reads differently (``learned``)."""
    if not isinstance(diffusion, GaussianDiffusion):
        raise ConversionError(f"diffusion: expected a GaussianDiffusion, got {type(diffusion).__name__}")
    if diffusion.timestep_map is not None:
        raise ConversionError("diffusion: a respaced process cannot be exported; export the full T-step process "
                              "(diffusers' schedulers choose their sampling steps themselves)")
    if diffusion.variance_type.name == "LEARNED":
        raise ConversionError(f"diffusion: variance_type 'learned' cannot be exported: {DIFFUSERS_LEARNED_VARIANCE}")
    betas = diffusion.schedule.betas.detach().to("cpu", torch.float64)
    prediction = {v: k for k, v in PREDICTION_TYPE_ALIASES.items()}[diffusion.prediction_type]
    variance = diffusion.variance_type.name.lower()
    return {"_class_name": "DDPMScheduler", "num_train_timesteps": betas.numel(), **_named_equivalent(betas),
            "variance_type": variance, "prediction_type": prediction, "clip_sample": bool(clip_sample),
            "clip_sample_range": 1.0, "thresholding": False, "timestep_spacing": "leading", "steps_offset": 0,
            "rescale_betas_zero_snr": False}
