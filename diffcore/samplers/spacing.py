"""Which timesteps a sampler visits: the spacings every sampler accepts (``skip_type=`` in the sampler functions,
``schedule=`` in :func:`diffcore.sample` and ``--schedule`` on the command line).

- ``"uniform"``: range(0, T, T // steps) (ermongroup/ddim; diffusers' ``"leading"`` without its offset);
- ``"even"``: improved-diffusion's respacing, steps spread evenly from 0 to T - 1 (visits T - 1);
- ``"trailing"``: diffusers' ``"trailing"`` spacing, round(T - i T / steps) - 1 for i < steps (visits T - 1,
  ends near T / steps);
- ``"karras"``: Karras et al. 2022 (EDM, eq. 5) in the ODE's noise level sigma = sqrt(1/abar - 1):
  sigma_i = (sigma_max^(1/rho) + i / (steps - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, rho = 7, between
  the process's sigma at T - 1 and at 0, each rounded to the timestep of nearest log sigma (the models take
  integer timesteps, as k-diffusion's discrete denoisers round them), kept distinct: exactly ``steps`` timesteps,
  dense at low noise;
- ``"quad"``, ``"quad_full"``: DDIM's quadratic spacing (to 0.8 T) and the quadratic spacing over all of [0, T).
"""
from __future__ import annotations

import math
from typing import Literal, get_args

import torch

from ..respace import StepsSpec, ddim_timesteps, resolve_timesteps

#: the spacings of a sampler's timesteps
Spacing = Literal["uniform", "even", "trailing", "karras", "quad", "quad_full"]
SPACINGS: tuple[str, ...] = get_args(Spacing)
KARRAS_RHO = 7.0  #: EDM's rho

__all__ = ["Spacing", "SPACINGS", "KARRAS_RHO", "sampling_timesteps", "trailing_timesteps", "karras_timesteps"]


def trailing_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """diffusers' ``"trailing"`` spacing, ascending: {round(T - i T / steps) - 1 : i < steps}."""
    ddim_timesteps(num_timesteps, steps, "even")  # checks T and steps (1..T) with the usual messages
    return sorted({round(num_timesteps - i * num_timesteps / steps) - 1 for i in range(steps)})


def karras_timesteps(alphas_cumprod: torch.Tensor, steps: int, rho: float = KARRAS_RHO) -> list[int]:
    """Karras sigmas over the process's range, as ``steps`` distinct ascending timesteps (see the module notes).

    Args: alphas_cumprod float64 ``[T]`` (abar at T - 1 may be 0: sigma_max is then the largest finite one and
    T - 1 is still visited first); steps in 1..T.
    """
    T = alphas_cumprod.numel()
    ddim_timesteps(T, steps, "even")  # checks steps
    abar = alphas_cumprod.double().cpu()
    log_sigma = 0.5 * (torch.log1p(-abar) - torch.log(abar))  # log sqrt(1/abar - 1), inf where abar = 0
    finite = log_sigma[torch.isfinite(log_sigma)]
    lo, hi = math.exp(float(finite.min())), math.exp(float(finite.max()))
    if steps == 1:
        return [T - 1]
    ramp = [i / (steps - 1) for i in range(steps)]
    targets = [math.log((hi ** (1 / rho) + r * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho) for r in ramp]
    chosen: list[int] = []
    for i, target in enumerate(targets):  # from high noise to low, strictly decreasing, room left for the rest
        nearest = int(torch.argmin((log_sigma - target).abs().nan_to_num(math.inf)))
        upper = T - 1 if not chosen else chosen[-1] - 1
        chosen.append(max(min(nearest if i else T - 1, upper), steps - 1 - i))
    return sorted(chosen)


def sampling_timesteps(alphas_cumprod: torch.Tensor, steps: StepsSpec, spacing: Spacing = "uniform") -> list[int]:
    """The kept timesteps (ascending distinct ints in [0, T)) for ``steps`` (a count spaced by ``spacing``, an
    improved-diffusion respacing string such as ``"ddim50"`` / ``"250"``, or the timesteps themselves).

    Args: alphas_cumprod float64 ``[T]`` of the process (used by ``"karras"``); spacing one of :data:`SPACINGS`.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"skip_type: expected one of {', '.join(map(repr, SPACINGS))}, got {spacing!r}")
    T = alphas_cumprod.numel()
    if isinstance(steps, int) and not isinstance(steps, bool):
        if spacing == "trailing":
            return trailing_timesteps(T, steps)
        if spacing == "karras":
            return karras_timesteps(alphas_cumprod, steps)
    elif spacing in ("trailing", "karras"):
        raise ValueError(f"steps: the {spacing!r} spacing needs a count of steps, got {steps!r}")
    return resolve_timesteps(T, steps, spacing)
