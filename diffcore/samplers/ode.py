"""The probability-flow ODE view of DDIM, higher-order solvers for it, and a stochastic (SDE) variant.

With sigma = sqrt(1/abar - 1) and xbar = x / sqrt(abar), deterministic DDIM (eta = 0) is exactly Euler's method on
d xbar / d sigma = eps_theta(x, t) (DDIM paper, eq. 14-15): xbar_s = xbar_t + (sigma_s - sigma_t) eps_hat.
``solver="euler"`` runs that update literally (it agrees with :func:`ddim_sample` at eta = 0 to rounding).

``solver="heun"`` is Heun's second-order method on the same ODE (Karras et al. 2022, Algorithm 1): the Euler
predictor to the next kept timestep s, a second model call there, and the average of the two slopes; the last step
(to sigma = 0, abar = 1) is Euler. Two model calls per step but the last: 2 S - 1 for S timesteps.

``solver="dpmpp_2m"`` is DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), multistep and
second order in lambda = log(alpha / sigma_vp) with alpha = sqrt(abar), sigma_vp = sqrt(1 - abar), h = lambda_s -
lambda_t and data prediction x0_hat. ``solver="dpmpp_2m_sde"`` is its stochastic form (Lu et al. 2022, sec. 5 /
k-diffusion's ``sample_dpmpp_2m_sde``, midpoint) with stochasticity ``eta`` (0 gives dpmpp_2m, 1 the SDE):
    x_s = (sigma_vp_s / sigma_vp_t) exp(-eta h) x_t - alpha_s expm1(-(1 + eta) h) D
          + sigma_vp_s sqrt(-expm1(-2 eta h)) z,
    D = x0_hat_t (first step and the last step to abar = 1), else with r = h_prev / h:
    D = (1 + 1/(2r)) x0_hat_t - 1/(2r) x0_hat_prev.
Its error falls as steps^-2 where DDIM's falls as steps^-1 on timesteps whose log-SNR steps change slowly (the
exact-model tests use ``"quad_full"``, quadratic from T-1 to 0). On timesteps uniform in t the last step into t = 0 is
several times longer in lambda than the one before it, and extrapolating over it is unreliable; any step more than
twice as long (in lambda) as its predecessor is therefore taken first order (as "lower_order_final" does in
other implementations). The SDE's noise z of step k is Philox noise at offset k + 1 of the loop's seed, as for every
sampler. Schedule coefficients are Python floats computed from a host copy of abar made once before the loop; the
loop does no host-device sync.

Default spacings (:data:`ODE_DEFAULT_SPACINGS`): Euler ``"uniform"`` (it is then DDIM eta = 0 step for step); Heun
and DPM-Solver++(2M) ``"karras"`` (from sigma 80 down, :mod:`diffcore.samplers.spacing`): a schedule that reaches
sigma >> 80 (the cosine schedule ends at 2e4) breaks Heun's trapezoid even for the exact model when the first
interval spans it, and on the packaged model (cosine, clipped x0_hat, 200 samples, 50 calls) Karras spacing gave
FID 123 for Heun against 850 under ``"quad_full"``, and 127 against 174 for DPM-Solver++(2M);
DPM-Solver++(2M) SDE ``"quad_full"`` (FID 48.7 there).
"""
from __future__ import annotations

import math
from typing import Literal, Optional, Sequence, get_args

import torch

from ..diffusion import GaussianDiffusion, Model
from ..respace import StepsSpec
from .spacing import Spacing
from ..reference.philox import philox_normal_like
from .loop import Intermediates, SampleResult, StepCallback, prepare, steps_progress, timestep_rows
from .ddim import ddim_sequence
from .step import check_eta

OdeSolver = Literal["euler", "heun", "dpmpp_2m", "dpmpp_2m_sde"]
ODE_SOLVERS: tuple[str, ...] = get_args(OdeSolver)

__all__ = ["OdeSolver", "ODE_SOLVERS", "ODE_DEFAULT_SPACINGS", "ode_sigmas", "ode_sample"]

#: each solver's default ``skip_type`` (see the module notes for the measurements behind them)
ODE_DEFAULT_SPACINGS: dict[str, Spacing] = {"euler": "uniform", "heun": "karras", "dpmpp_2m": "karras",
                                            "dpmpp_2m_sde": "quad_full"}


def ode_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The ODE's noise level sigma_t = sqrt(1/abar_t - 1) (float64 ``[T]``; inf where abar = 0)."""
    abar = alphas_cumprod.double()
    return (1.0 / abar - 1.0).sqrt()


def _log_snr_half(abar: float) -> float:
    """lambda = log(sqrt(abar) / sqrt(1 - abar)), with the limits -inf at abar = 0 and +inf at abar = 1."""
    if abar <= 0.0:
        return -math.inf
    if abar >= 1.0:
        return math.inf
    return 0.5 * (math.log(abar) - math.log1p(-abar))


@torch.no_grad()
def ode_sample(model: Model, diffusion: GaussianDiffusion, shape: Optional[Sequence[int]] = None, *,
               steps: StepsSpec = 20, skip_type: Optional[Spacing] = None, solver: OdeSolver = "dpmpp_2m",
               eta: Optional[float] = None, x_T: Optional[torch.Tensor] = None, clip_denoised: bool = False,
               model_kwargs: Optional[dict] = None, seed: Optional[int] = None,
               generator: Optional[torch.Generator] = None, progress: bool = True,
               return_intermediates: bool = False, callback: Optional[StepCallback] = None,
               dtype: torch.dtype = torch.float32, device: "torch.device | str | None" = None,
               first_row: int = 0) -> SampleResult:
    """Solve the probability-flow ODE (or, for ``"dpmpp_2m_sde"``, the reverse SDE) from x_T to x_0 over the same
    timesteps as :func:`ddim_sample`.

    Args:
        solver: ``"euler"`` (DDIM eta = 0 written in (sigma, x / sqrt(abar))), ``"heun"``, ``"dpmpp_2m"`` or
            ``"dpmpp_2m_sde"``.
        eta: the SDE's stochasticity (``"dpmpp_2m_sde"`` only: default 1, 0 is ``"dpmpp_2m"``); None otherwise.
        steps, skip_type, x_T, shape, clip_denoised, model_kwargs, seed, generator, progress,
        return_intermediates, callback, dtype, device, first_row: as in :func:`ddim_sample` (seed draws x_T and
        the SDE's noise), except the default spacing: None is the solver's, :data:`ODE_DEFAULT_SPACINGS`.
    Returns: :class:`SampleResult` with ``sample`` ``[B, C, ...]``; ``callback(step, t, x, pred_x0)`` after each
    step (Heun: once per step, with the first model call's x0 estimate).
    """
    if solver not in ODE_SOLVERS:
        raise ValueError(f"solver: expected one of {', '.join(map(repr, ODE_SOLVERS))}, got {solver!r}")
    if solver == "dpmpp_2m_sde":
        eta = 1.0 if eta is None else check_eta(eta)
    elif eta is not None and eta != 0:
        raise ValueError(f"eta: the deterministic solver {solver!r} takes no eta (use 'dpmpp_2m_sde' or "
                         f"ddim_sample), got {eta!r}")
    else:
        eta = 0.0
    skip_type = ODE_DEFAULT_SPACINGS[solver] if skip_type is None else skip_type
    ts, t_prevs = ddim_sequence(diffusion, steps, skip_type)
    diffusion, x, seed = prepare(diffusion, shape, x_T, dtype=dtype, device=device, seed=seed,
                                 generator=generator, needs_noise=eta > 0, first_row=first_row)
    abar_host = diffusion.alphas_cumprod.cpu().tolist()  # once, before the loop
    abars = [abar_host[t] for t in ts]
    abars_prev = [abar_host[s] if s >= 0 else 1.0 for s in t_prevs]
    if solver in ("euler", "heun") and abars[0] <= 0.0:
        raise ValueError(f"solver: {solver!r} works in sigma = sqrt(1/abar - 1), infinite at abar = 0 (zero "
                         f"terminal SNR); use 'dpmpp_2m' or ddim_sample")
    rows = timestep_rows(ts, x.shape[0], x.device)
    prev_rows = timestep_rows([max(s, 0) for s in t_prevs], x.shape[0], x.device)
    model_ts = [diffusion.original_timesteps[t] for t in ts]
    record = Intermediates(return_intermediates, callback, model_ts)
    channels = x.shape[1] if x.dim() > 1 else 0

    def predict(state: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prediction, _ = diffusion.split_output(diffusion.call_model(model, state, t, model_kwargs), channels)
        return diffusion.predict_x0_eps(prediction, state, t, clip_denoised)

    h_prev, x0_prev = math.nan, None
    for k in steps_progress(len(ts), progress, f"ODE ({solver})"):
        x0_hat, eps_hat = predict(x, rows[k])
        a_t, a_s = abars[k], abars_prev[k]
        if solver in ("euler", "heun"):
            sigma_t, sigma_s = math.sqrt(1.0 / a_t - 1.0), math.sqrt(1.0 / a_s - 1.0)
            xbar = x.to(eps_hat.dtype) / math.sqrt(a_t)
            x_new = math.sqrt(a_s) * (xbar + (sigma_s - sigma_t) * eps_hat)
            if solver == "heun" and t_prevs[k] >= 0:  # the corrector; the last step (to abar = 1) stays Euler
                _, eps_next = predict(x_new.to(x.dtype), prev_rows[k])
                x_new = math.sqrt(a_s) * (xbar + (sigma_s - sigma_t) * 0.5 * (eps_hat + eps_next))
        else:
            h = _log_snr_half(a_s) - _log_snr_half(a_t)
            eta_h = eta * h if eta > 0 else 0.0  # inf * eta for an infinite h (zero terminal SNR, the last step)
            coef_x = math.sqrt(1.0 - a_s) / math.sqrt(1.0 - a_t) * math.exp(-eta_h)
            coef_d = -math.sqrt(a_s) * math.expm1(-(h + eta_h))
            if x0_prev is None or not (math.isfinite(h) and math.isfinite(h_prev)) or h > 2.0 * h_prev:
                # first order: the first step, the last step (to abar = 1, h infinite), after an infinite step
                # (zero terminal SNR) and a step over twice as long as its predecessor
                data = x0_hat
            else:
                half_inv_r = h / (2.0 * h_prev)
                data = (1.0 + half_inv_r) * x0_hat - half_inv_r * x0_prev
            x_new = coef_x * x.to(data.dtype) + coef_d * data
            if eta > 0 and a_s < 1.0:
                z = philox_normal_like(x, seed, k + 1, first_row).to(data.dtype)
                x_new = x_new + math.sqrt(1.0 - a_s) * math.sqrt(-math.expm1(-2.0 * eta_h)) * z
            h_prev, x0_prev = h, x0_hat
        x = x_new.to(x.dtype)
        if record.add(x, x0_hat.to(x.dtype)):
            break
    return record.result(x, model_ts, seed)
