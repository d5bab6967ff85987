"""Which timesteps a sampler visits: the spacings every sampler accepts (``skip_type=`` in the sampler functions,
``schedule=`` in :func:`diffcore.sample` and ``--schedule`` on the command line).

- ``"uniform"``: range(0, T, T // steps) (ermongroup/ddim; diffusers' ``"leading"`` without its offset);
- ``"even"``: improved-diffusion's respacing, steps spread evenly from 0 to T - 1 (visits T - 1);
- ``"trailing"``: diffusers' ``"trailing"`` spacing, round(T - i T / steps) - 1 for i < steps (visits T - 1,
  ends near T / steps);
- ``"karras"``: Karras et al. 2022 (EDM, eq. 5) in the ODE's noise level sigma = sqrt(1/abar - 1):
  sigma_i = (sigma_max^(1/rho) + i / (steps - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, rho = 7, from
  sigma_max = min(the process's sigma at T - 1, :data:`KARRAS_SIGMA_MAX` = 80, EDM's value) down to the process's
  sigma at 0, each rounded to the timestep of nearest log sigma (the models take integer timesteps, as
  k-diffusion's discrete denoisers round them), kept distinct: exactly ``steps`` timesteps, dense at low noise.
  The cap matters for processes that reach far beyond the data's scale: the linear schedule (T = 1000) ends at
  sigma 157, the cosine one (betas clipped at 0.999) at 2e4, where rho = 7 would spend most steps at noise levels
  that differ only in how much they amplify the model's error (sigma 2e4 -> 1.5e4 -> 1.2e4 ...). Starting at
  sigma 80 treats x_T ~ N(0, I) as x_t there, where the data's share of x_t is sqrt(abar) < 1.3 %.
  diffusers' ``use_karras_sigmas`` and k-diffusion's discrete wrappers use the model's whole range: pass
  ``sigma_max=math.inf`` to :func:`karras_timesteps` for that;
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
KARRAS_SIGMA_MAX = 80.0  #: EDM's sigma_max: the highest noise level of the ``"karras"`` spacing

__all__ = ["Spacing", "SPACINGS", "KARRAS_RHO", "KARRAS_SIGMA_MAX", "sampling_timesteps", "trailing_timesteps", "karras_timesteps"]


def trailing_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """diffusers' ``"trailing"`` spacing, ascending: {round(T - i T / steps) - 1 : i < steps}."""
    ddim_timesteps(num_timesteps, steps, "even")  # checks T and steps (1..T) with the usual messages
    return sorted({round(num_timesteps - i * num_timesteps / steps) - 1 for i in range(steps)})


def karras_timesteps(alphas_cumprod: torch.Tensor, steps: int, rho: float = KARRAS_RHO,
                     sigma_max: float = KARRAS_SIGMA_MAX) -> list[int]:
    """Karras sigmas over the process's range, as ``steps`` distinct ascending timesteps (see the module notes).

    Args: alphas_cumprod float64 ``[T]`` (abar at T - 1 may be 0: sigma_max is then the largest finite one);
    steps in 1..T; rho > 0; sigma_max > 0, the highest noise level, capped by the process's (``math.inf``: the
    process's whole range, whose first timestep is T - 1). The first timestep is the one of nearest log sigma to
    sigma_max (T - 1 when the process's range is used).
    """
    T = alphas_cumprod.numel()
    ddim_timesteps(T, steps, "even")  # checks steps
    if not (isinstance(rho, (int, float)) and not isinstance(rho, bool) and 0 < rho < math.inf):
        raise ValueError(f"rho: expected a finite number > 0, got {rho!r}")
    if not (isinstance(sigma_max, (int, float)) and not isinstance(sigma_max, bool) and sigma_max > 0):
        raise ValueError(f"sigma_max: expected a number > 0 (math.inf: the process's whole range), got {sigma_max!r}")
    abar = alphas_cumprod.double().cpu()
    log_sigma = 0.5 * (torch.log1p(-abar) - torch.log(abar))  # log sqrt(1/abar - 1), inf where abar = 0
    finite = log_sigma[torch.isfinite(log_sigma)]
    lo, top = math.exp(float(finite.min())), math.exp(float(finite.max()))
    hi = min(top, float(sigma_max))
    distance = lambda target: (log_sigma - target).abs().nan_to_num(math.inf)  # noqa: E731
    first = T - 1 if hi >= top else int(torch.argmin(distance(math.log(hi))))
    first = max(first, steps - 1)
    if steps == 1:
        return [first]
    ramp = [i / (steps - 1) for i in range(steps)]
    targets = [math.log((hi ** (1 / rho) + r * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho) for r in ramp]
    chosen: list[int] = [first]
    for i, target in enumerate(targets[1:], start=1):  # high noise to low, strictly decreasing, room for the rest
        nearest = int(torch.argmin(distance(target)))
        chosen.append(max(min(nearest, chosen[-1] - 1), steps - 1 - i))
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
