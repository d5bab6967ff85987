"""Samplers: DDPM ancestral, DDIM (eta, any timestep subsequence, inversion), slerp interpolation, and the
probability-flow ODE (Euler = DDIM eta 0, DPM-Solver++(2M)).

Every sampler takes ``model(x, t, **model_kwargs)`` with t int64 ``[B]`` original timesteps, a
:class:`~diffcore.diffusion.GaussianDiffusion`, and either ``shape`` or ``x_T``; it returns a
:class:`SampleResult`. Timesteps are per sample, the loop reads nothing back from the device, noise comes from
Philox keyed by one seed (x_T at offset 0, step k at offset k + 1), and a tqdm bar shows progress unless
``progress=False``.
"""
from ._common import SampleResult, draw_seed, initial_noise
from .ddim import ddim_invert, ddim_sample, ddim_sequence
from .ddpm import ddpm_sample
from .interpolation import slerp, slerp_path
from .ode import ODE_SOLVERS, OdeSolver, ode_sample, ode_sigmas

__all__ = ["SampleResult", "draw_seed", "initial_noise", "ddpm_sample", "ddim_sample", "ddim_invert",
           "ddim_sequence", "slerp", "slerp_path", "ode_sample", "ode_sigmas", "OdeSolver", "ODE_SOLVERS"]
