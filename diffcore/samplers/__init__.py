"""Samplers: DDPM ancestral, DDIM (eta, any timestep subsequence, inversion), slerp interpolation, and the
probability-flow ODE (Euler = DDIM eta 0, Heun, DPM-Solver++(2M) and its SDE form); all of them by name with one
set of arguments through :func:`run_sampler` (:mod:`diffcore.samplers.registry`), over the spacings of
:mod:`diffcore.samplers.spacing` (uniform, even, trailing, karras, ...).

Every sampler takes a model, a :class:`~diffcore.diffusion.GaussianDiffusion`, and either ``shape`` or ``x_T``;
it returns a :class:`SampleResult`. Timesteps are per sample, the loop reads nothing back from the device, noise
comes from Philox keyed by one seed (x_T at offset 0, step k at offset k + 1), a tqdm bar shows progress unless
``progress=False``, and ``callback(step, t, x, pred_x0)`` (optional) sees every step and may stop the loop by returning True.

The model calling convention (the same for DPS, :func:`diffcore.inverse.dps_sample`, and for training):

- the call is ``model(x, t, **model_kwargs)``: x ``[B, C, ...]`` in the sampling dtype; t int64 ``[B]``, the
  *original* timesteps of the process the model was trained on (a respaced process maps its indices back);
  ``model_kwargs`` as given to the sampler (e.g. ``y=labels``);
- it returns the prediction ``[B, C, ...]`` (eps, x0 or v per the process's ``prediction_type``), or
  ``[B, 2C, ...]`` (prediction, then the variance output) for a learned-variance process;
- the output may be a tensor or wrapped as diffusers' models return it: an object with ``.sample``
  (``UNet2DOutput``), a tuple (its first element is used, ``return_dict=False``) or a dict with ``"sample"``;
  so a diffusers ``UNet2DModel`` is called as it is (it takes ``(sample, timestep)`` positionally);
- the output is unwrapped, its shape checked and cast to x's dtype in one place,
  :meth:`GaussianDiffusion.call_model <diffcore.diffusion.GaussianDiffusion.call_model>`, once per step.

The reverse step shared by DDPM, DDIM and DPS, and the two clipping conventions (improved-diffusion's, the
default, and diffusers' DDIMScheduler's), are in :mod:`diffcore.samplers.step`.
"""
from .ddim import ddim_invert, ddim_sample, ddim_sequence, inversion_timesteps
from .ddpm import ddpm_sample
from .interpolation import slerp, slerp_path
from .loop import SampleResult, StepCallback, draw_seed, initial_noise
from .ode import ODE_SOLVERS, OdeSolver, ode_sample, ode_sigmas
from .registry import (SAMPLER_INFO, SAMPLERS, SamplerChoice, SamplerInfo, check_sampler, default_sampler, run_sampler,
                       steps_for_evaluations)
from .spacing import KARRAS_SIGMA_MAX, SPACINGS, Spacing, karras_timesteps, sampling_timesteps, trailing_timesteps
from .step import SAMPLER_NAMES, ReverseStep, SamplerName, reverse_step

__all__ = ["SampleResult", "StepCallback", "draw_seed", "initial_noise", "ddpm_sample", "ddim_sample", "ddim_invert",
           "ddim_sequence", "slerp", "slerp_path", "ode_sample", "ode_sigmas", "OdeSolver", "ODE_SOLVERS",
           "SamplerName", "SAMPLER_NAMES", "ReverseStep", "reverse_step", "inversion_timesteps", "SamplerChoice",
           "SAMPLERS", "SamplerInfo", "SAMPLER_INFO", "run_sampler", "default_sampler", "check_sampler", "steps_for_evaluations", "Spacing", "SPACINGS",
           "sampling_timesteps", "karras_timesteps", "trailing_timesteps", "KARRAS_SIGMA_MAX"]
