"""DDIM (Song et al. 2021): the generalized sampler with eta over any timestep subsequence (eq. 12), and the
deterministic inversion x_0 -> x_T used for reconstruction (Table 2) and interpolation (sec. 5.3)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import ops
from ..diffusion import GaussianDiffusion, Model
from ..ops import Impl
from ..respace import SkipType, StepsSpec, resolve_timesteps
from .loop import Intermediates, SampleResult, StepCallback, prepare, steps_progress, timestep_rows
from .step import check_eta, reverse_step

__all__ = ["ddim_sample", "ddim_invert", "ddim_sequence"]


def ddim_sequence(diffusion: GaussianDiffusion, steps: StepsSpec, skip_type: SkipType) -> tuple[list[int], list[int]]:
    """(t, t_prev) lists in visiting order: t runs down the kept timesteps and t_prev is the next one in that
    materialized sequence (-1 after the last: the final step to abar = 1)."""
    kept = resolve_timesteps(diffusion.num_timesteps, steps, skip_type)
    ts = kept[::-1]
    return ts, ts[1:] + [-1]


@torch.no_grad()
def ddim_sample(model: Model, diffusion: GaussianDiffusion, shape: Optional[Sequence[int]] = None, *,
                steps: StepsSpec = 50, skip_type: SkipType = "uniform", eta: float = 0.0,
                x_T: Optional[torch.Tensor] = None, clip_denoised: bool = False,
                rederive_eps_from_clipped_x0: bool = True, model_kwargs: Optional[dict] = None,
                seed: Optional[int] = None, generator: Optional[torch.Generator] = None, progress: bool = True,
                return_intermediates: bool = False, callback: Optional[StepCallback] = None,
                dtype: torch.dtype = torch.float32, device: "torch.device | str | None" = None,
                impl: Impl = "auto") -> SampleResult:
    """DDIM sampling over a timestep subsequence with stochasticity ``eta`` (0: deterministic, 1: DDPM-like).

    x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z,
    sigma = eta sqrt((1 - abar_s)/(1 - abar_t)) sqrt(1 - abar_t/abar_s), by :func:`diffcore.ops.ddim_step`.

    Args:
        model: ``model(x, t int64 [B] original timesteps, **model_kwargs)`` -> ``[B, C, ...]`` (or ``[B, 2C, ...]``
            for a learned-variance process; the variance channels are ignored), as a tensor or wrapped
            (see :mod:`diffcore.samplers`).
        diffusion: the process; ``steps`` index its tables.
        shape: ``(B, C, ...)`` when ``x_T`` is not given (x_T is then Philox noise of ``seed``).
        steps: a count (spaced by ``skip_type``: ``"uniform"`` (ermongroup/ddim), ``"quad"``, ``"even"``), a
            respacing string (``"ddim50"``, ``"250"``) or the kept timesteps. At most T.
        eta: >= 0. clip_denoised: clamp x0_hat to [-1, 1].
        rederive_eps_from_clipped_x0: with clipping, continue from the eps re-derived from the clamped x0_hat
            (True: improved-diffusion's choice, diffusers' ``use_clipped_model_output=True``) or from the model's
            eps (False: diffusers' DDIMScheduler default); see :mod:`diffcore.samplers.step`.
        seed / generator: Philox seed for x_T and the eta noise. progress, return_intermediates: see
            :class:`SampleResult`. callback: ``callback(k, x, pred_x0)`` after each step.
            impl: ``"auto" | "fused" | "reference"``.
    Returns: :class:`SampleResult` with ``sample`` ``[B, C, ...]``.
    """
    eta = check_eta(eta)
    ts, t_prevs = ddim_sequence(diffusion, steps, skip_type)
    diffusion, x, seed = prepare(diffusion, shape, x_T, dtype=dtype, device=device, seed=seed,
                                 generator=generator, needs_noise=eta > 0)
    step = reverse_step(diffusion, "ddim", eta=eta, clip_denoised=clip_denoised,
                        rederive_eps_from_clipped_x0=rederive_eps_from_clipped_x0, seed=seed, impl=impl)
    rows = timestep_rows(ts, x.shape[0], x.device)
    prev_rows = timestep_rows(t_prevs, x.shape[0], x.device)
    record = Intermediates(return_intermediates, callback)
    for k in steps_progress(len(ts), progress, "DDIM"):
        out = diffusion.call_model(model, x, rows[k], model_kwargs)
        x, pred_x0 = step(x, out, rows[k], prev_rows[k], k)
        record.add(x, pred_x0)
    return record.result(x, (diffusion.original_timesteps[t] for t in ts), seed)


@torch.no_grad()
def ddim_invert(model: Model, diffusion: GaussianDiffusion, x0: torch.Tensor, *, steps: StepsSpec = 50,
                skip_type: SkipType = "uniform", model_kwargs: Optional[dict] = None, progress: bool = True,
                return_intermediates: bool = False, callback: Optional[StepCallback] = None,
                impl: Impl = "auto") -> SampleResult:
    """Deterministic DDIM inversion x_0 -> x_{t_last} along the same timesteps :func:`ddim_sample` would use.

    The ODE is integrated forward with one model call per kept timestep: first x_{t_0} = sqrt(abar_{t_0}) x0 +
    sqrt(1 - abar_{t_0}) eps_hat(x0, t_0) (x0 taken as the state at t_0), then
    x_{t_{i+1}} = sqrt(abar_{t_{i+1}}) x0_hat(x_{t_i}) + sqrt(1 - abar_{t_{i+1}}) eps_hat(x_{t_i}). Reconstruct with
    ``ddim_sample(model, diffusion, x_T=result.sample, steps=steps, skip_type=skip_type, eta=0)``; the error
    shrinks as the number of steps grows (both directions are first-order), as long as the kept timesteps avoid a
    t with abar_t ~ 0: the cosine schedule's t = T - 1 (abar ~ 2e-9 with betas clipped at 0.999, kept by
    ``steps=T``) makes decoding's first x0 estimate divide the encoder/decoder eps mismatch by sqrt(abar) and the
    reconstruction blows up (docs/reproduction.md, Table 2); keep fewer steps or pass the timesteps explicitly.

    Args: x0 ``[B, C, ...]``; the rest as in :func:`ddim_sample` (``callback(k, x, pred_x0)`` after each step).
    Returns :class:`SampleResult` with ``sample`` the latent ``[B, C, ...]`` and ``timesteps`` in increasing order.
    """
    ts = resolve_timesteps(diffusion.num_timesteps, steps, skip_type)
    diffusion, x, _ = prepare(diffusion, None, x0, dtype=x0.dtype, device=None, seed=None, generator=None,
                              needs_noise=False)
    step = reverse_step(diffusion, "ddim", impl=impl)  # t_prev > t: the op's deterministic reverse direction
    rows = timestep_rows(ts, x.shape[0], x.device)
    record = Intermediates(return_intermediates, callback)
    channels = x.shape[1] if x.dim() > 1 else 0
    for k in steps_progress(len(ts), progress, "DDIM inversion"):
        # step k moves to ts[k]; the model is evaluated at the current state and its timestep ts[k - 1]
        # (for k = 0 at x0, taken as the state at ts[0])
        t_now = rows[max(k - 1, 0)]
        out = diffusion.call_model(model, x, t_now, model_kwargs)
        if k == 0:
            prediction, _ = diffusion.split_output(out, channels)
            pred_x0, eps = x, diffusion.predict_x0_eps(prediction, x, t_now)[1]
            x = ops.q_sample(x, eps.to(x.dtype), rows[0], diffusion.alphas_cumprod, impl=impl, check_values=False)
        else:
            x, pred_x0 = step(x, out, t_now, rows[k], k)
        record.add(x, pred_x0)
    return record.result(x, (diffusion.original_timesteps[t] for t in ts), None)
