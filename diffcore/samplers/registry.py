"""One sampler interface: every sampler by name, with the same arguments.

    from diffcore.samplers import run_sampler
    result = run_sampler("dpm++2m", model, diffusion, (16, 1, 28, 28), steps=20, seed=0)

| name | what | order | model calls for ``steps`` S | noise |
|---|---|---|---|---|
| ``ddim`` | DDIM (eta = 0: Euler on the probability-flow ODE) | 1 | S | eta > 0 |
| ``ancestral`` | DDPM ancestral steps on the respaced process (learned or fixed variance) | 1 | S | yes |
| ``euler`` | Euler on the probability-flow ODE in (sigma, x / sqrt(abar)) | 1 | S | no |
| ``heun`` | Heun (Karras et al. 2022, Alg. 1) | 2 | 2 S - 1 | no |
| ``dpm++2m`` | DPM-Solver++(2M) | 2 | S | no |
| ``dpm++2m-sde`` | DPM-Solver++(2M) SDE (eta = 1 default) | 1 (strong) | S | yes |

Each name maps to a plain function over the shared step ops (:func:`~diffcore.samplers.ddim_sample`,
:func:`~diffcore.samplers.ddpm_sample`, :func:`~diffcore.samplers.ode_sample`); :func:`run_sampler` calls it with
the common arguments ``model, diffusion, shape / x_T, steps, schedule, eta, model_kwargs, seed, generator,
callback, progress, dtype, device, clip_denoised``. ``clip_denoised`` defaults to False everywhere: a sampler does
not assume its data live in [-1, 1] (clipping is an image prior, and it makes the ODE samplers leave the ODE's
solution: their exact-model tests need it off); :func:`diffcore.sample` clamps its final images to [-1, 1].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence, get_args

import torch

from ..diffusion import GaussianDiffusion, Model
from ..ops import Impl
from ..respace import StepsSpec
from .ddim import ddim_sample
from .ddpm import ddpm_sample
from .loop import SampleResult, StepCallback
from .ode import ODE_DEFAULT_SPACINGS, ode_sample
from .spacing import Spacing

#: the samplers by name (``diffcore.sample(sampler=...)``, ``diffcore sample --sampler``)
SamplerChoice = Literal["ddim", "ancestral", "euler", "heun", "dpm++2m", "dpm++2m-sde"]
SAMPLERS: tuple[str, ...] = get_args(SamplerChoice)

__all__ = ["SamplerChoice", "SAMPLERS", "SamplerInfo", "SAMPLER_INFO", "run_sampler", "steps_for_evaluations",
           "default_sampler", "check_sampler"]


@dataclass(frozen=True)
class SamplerInfo:
    """What a sampler costs and does: ``order`` of convergence in the steps (deterministic error, or strong order for
    stochastic samplers), ``calls_per_step`` model calls per step (Heun: 2, but 1 for its last step), whether it
    draws noise after x_T (``stochastic``, or only with eta > 0: ``eta_default``), and its default spacing."""

    order: int
    calls_per_step: int
    stochastic: bool
    eta_default: Optional[float]
    default_schedule: Spacing

    def model_calls(self, steps: int) -> int:
        """Model calls for ``steps`` steps."""
        return steps if self.calls_per_step == 1 else self.calls_per_step * steps - 1


SAMPLER_INFO: dict[str, SamplerInfo] = {
    "ddim": SamplerInfo(1, 1, False, 0.0, "uniform"),
    "ancestral": SamplerInfo(1, 1, True, None, "even"),
    "euler": SamplerInfo(1, 1, False, None, ODE_DEFAULT_SPACINGS["euler"]),
    "heun": SamplerInfo(2, 2, False, None, ODE_DEFAULT_SPACINGS["heun"]),
    "dpm++2m": SamplerInfo(2, 1, False, None, ODE_DEFAULT_SPACINGS["dpmpp_2m"]),
    "dpm++2m-sde": SamplerInfo(1, 1, True, 1.0, ODE_DEFAULT_SPACINGS["dpmpp_2m_sde"]),
}


def steps_for_evaluations(sampler: SamplerChoice, evaluations: int) -> int:
    """The most steps of ``sampler`` that cost at most ``evaluations`` model calls (>= 1)."""
    info = SAMPLER_INFO[check_sampler(sampler)]
    return max(1, (evaluations + 1) // 2 if info.calls_per_step == 2 else evaluations)


def check_sampler(sampler: str) -> str:
    """``sampler`` checked against :data:`SAMPLERS`."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {', '.join(map(repr, SAMPLERS))}, got {sampler!r}")
    return sampler


def run_sampler(sampler: SamplerChoice, model: Model, diffusion: GaussianDiffusion,
                shape: Optional[Sequence[int]] = None, *, x_T: Optional[torch.Tensor] = None,
                steps: Optional[StepsSpec] = 50, schedule: Optional[Spacing] = None, eta: Optional[float] = None,
                model_kwargs: Optional[dict] = None, seed: Optional[int] = None,
                generator: Optional[torch.Generator] = None, callback: Optional[StepCallback] = None,
                progress: bool = True, dtype: torch.dtype = torch.float32,
                device: "torch.device | str | None" = None, clip_denoised: bool = False,
                return_intermediates: bool = False, impl: Impl = "auto", first_row: int = 0) -> SampleResult:
    """Run the sampler ``sampler`` (one of :data:`SAMPLERS`) from x_T (given, or Philox noise of ``seed`` in
    ``shape`` ``(B, C, ...)``) to x_0; returns its :class:`SampleResult` (``sample`` ``[B, C, ...]`` in x_T's dtype).

    Args:
        steps: a count of steps (``"heun"`` costs 2 steps - 1 model calls), a respacing string or the kept
            timesteps; None: every timestep for ``"ancestral"``, 50 otherwise.
        schedule: the spacing of the steps (:data:`~diffcore.samplers.spacing.SPACINGS`; None: the sampler's
            default in :data:`SAMPLER_INFO`).
        eta: stochasticity of ``"ddim"`` (default 0) and ``"dpm++2m-sde"`` (default 1); the other samplers take
            None (or 0).
        the rest: as in :func:`~diffcore.samplers.ddim_sample` (``impl`` applies to the fused-step samplers
        ``"ddim"`` and ``"ancestral"``; ``first_row``, the image index of row 0, to every sampler).
    """
    info = SAMPLER_INFO[check_sampler(sampler)]
    schedule = info.default_schedule if schedule is None else schedule
    if info.eta_default is None and eta not in (None, 0, 0.0):
        raise ValueError(f"eta: the {sampler!r} sampler takes no eta (use 'ddim' or 'dpm++2m-sde'), got {eta!r}")
    common = dict(x_T=x_T, model_kwargs=model_kwargs, seed=seed, generator=generator, callback=callback,
                  progress=progress, dtype=dtype, device=device, clip_denoised=clip_denoised,
                  return_intermediates=return_intermediates, first_row=first_row)
    if sampler == "ancestral":
        return ddpm_sample(model, diffusion, shape, steps=steps, skip_type=schedule, impl=impl, **common)
    steps = 50 if steps is None else steps
    if sampler == "ddim":
        return ddim_sample(model, diffusion, shape, steps=steps, skip_type=schedule,
                           eta=info.eta_default if eta is None else eta, impl=impl, **common)
    solver = {"euler": "euler", "heun": "heun", "dpm++2m": "dpmpp_2m", "dpm++2m-sde": "dpmpp_2m_sde"}[sampler]
    return ode_sample(model, diffusion, shape, steps=steps, skip_type=schedule, solver=solver,
                      eta=eta if sampler == "dpm++2m-sde" else None, **common)


#: the plain function behind each name (for documentation and introspection)
SAMPLER_FUNCTIONS: dict[str, Callable[..., SampleResult]] = {
    "ddim": ddim_sample, "ancestral": ddpm_sample, "euler": ode_sample, "heun": ode_sample,
    "dpm++2m": ode_sample, "dpm++2m-sde": ode_sample}


def default_sampler(diffusion: GaussianDiffusion) -> SamplerChoice:
    """The sampler ``diffcore.sample`` and ``diffcore sample`` use when none is named, by the kind of model: respaced
    ``"ancestral"`` for a learned variance (it uses the variance; FID 51 against DDIM's 131 at 50 model calls on the
    packaged model, docs/reproduction.md), ``"ddim"`` (eta 0) for a fixed variance. Both run on the fused step ops."""
    return "ancestral" if diffusion.variance_type.is_learned else "ddim"
