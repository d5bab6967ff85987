"""DDIM (Song et al. 2021): the generalized sampler with eta over any timestep subsequence (eq. 12), and the
deterministic inversion x_0 -> x_T used for reconstruction (Table 2) and interpolation (sec. 5.3)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import ops
from ..diffusion import GaussianDiffusion, Model
from ..ops import Impl
from ..respace import SkipType, StepsSpec, resolve_timesteps
from ._common import Intermediates, SampleResult, model_prediction, prepare, steps_progress, timestep_rows

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
                x_T: Optional[torch.Tensor] = None, clip_denoised: bool = False, model_kwargs: Optional[dict] = None,
                seed: Optional[int] = None, generator: Optional[torch.Generator] = None, progress: bool = True,
                return_intermediates: bool = False, dtype: torch.dtype = torch.float32,
                device: "torch.device | str | None" = None, impl: Impl = "auto") -> SampleResult:
    """DDIM sampling over a timestep subsequence with stochasticity ``eta`` (0: deterministic, 1: DDPM-like).

    x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z,
    sigma = eta sqrt((1 - abar_s)/(1 - abar_t)) sqrt(1 - abar_t/abar_s), by :func:`diffcore.ops.ddim_step`.

    Args:
        model: ``model(x, t int64 [B] original timesteps, **model_kwargs)`` -> ``[B, C, ...]`` (or ``[B, 2C, ...]``
            for a learned-variance process; the variance channels are ignored).
        diffusion: the process; ``steps`` index its tables.
        shape: ``(B, C, ...)`` when ``x_T`` is not given (x_T is then Philox noise of ``seed``).
        steps: a count (spaced by ``skip_type``: ``"uniform"`` (ermongroup/ddim), ``"quad"``, ``"even"``), a
            respacing string (``"ddim50"``, ``"250"``) or the kept timesteps. At most T.
        eta: >= 0. clip_denoised: clamp x0_hat to [-1, 1].
        seed / generator: Philox seed for x_T and the eta noise. progress, return_intermediates: see
            :class:`SampleResult`. impl: ``"auto" | "fused" | "reference"``.
    Returns: :class:`SampleResult` with ``sample`` ``[B, C, ...]``.
    """
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not eta >= 0.0:
        raise ValueError(f"eta: expected a float >= 0, got {eta!r}")
    ts, t_prevs = ddim_sequence(diffusion, steps, skip_type)
    diffusion, x, seed = prepare(diffusion, shape, x_T, dtype=dtype, device=device, seed=seed,
                                 generator=generator, needs_noise=eta > 0)
    rows = timestep_rows(ts, x.shape[0], x.device)
    prev_rows = timestep_rows(t_prevs, x.shape[0], x.device)
    abar = diffusion.alphas_cumprod
    record = Intermediates(return_intermediates)
    for k in steps_progress(len(ts), progress, "DDIM"):
        prediction = model_prediction(diffusion, model, x, rows[k], model_kwargs)
        x, pred_x0 = ops.ddim_step(x, prediction, rows[k], prev_rows[k], abar, float(eta),
                                   prediction_type=diffusion.prediction_type, clip_denoised=clip_denoised,
                                   seed=seed if eta > 0 else None, offset=k + 1, impl=impl, check_values=False)
        record.add(x, pred_x0)
    return record.result(x, (diffusion.original_timesteps[t] for t in ts), seed)


@torch.no_grad()
def ddim_invert(model: Model, diffusion: GaussianDiffusion, x0: torch.Tensor, *, steps: StepsSpec = 50,
                skip_type: SkipType = "uniform", model_kwargs: Optional[dict] = None, progress: bool = True,
                return_intermediates: bool = False, impl: Impl = "auto") -> SampleResult:
    """Deterministic DDIM inversion x_0 -> x_{t_last} along the same timesteps :func:`ddim_sample` would use.

    The ODE is integrated forward with one model call per kept timestep: first x_{t_0} = sqrt(abar_{t_0}) x0 +
    sqrt(1 - abar_{t_0}) eps_hat(x0, t_0) (x0 taken as the state at t_0), then
    x_{t_{i+1}} = sqrt(abar_{t_{i+1}}) x0_hat(x_{t_i}) + sqrt(1 - abar_{t_{i+1}}) eps_hat(x_{t_i}). Reconstruct with
    ``ddim_sample(model, diffusion, x_T=result.sample, steps=steps, skip_type=skip_type, eta=0)``; the error
    shrinks as the number of steps grows (both directions are first-order), as long as the kept timesteps avoid a
    t with abar_t ~ 0: the cosine schedule's t = T - 1 (abar ~ 2e-9 with betas clipped at 0.999, kept by
    ``steps=T``) makes decoding's first x0 estimate divide the encoder/decoder eps mismatch by sqrt(abar) and the
    reconstruction blows up (docs/reproduction.md, Table 2); keep fewer steps or pass the timesteps explicitly.

    Args: x0 ``[B, C, ...]``; the rest as in :func:`ddim_sample`. Returns :class:`SampleResult` with ``sample``
    the latent ``[B, C, ...]`` and ``timesteps`` in increasing order.
    """
    ts = resolve_timesteps(diffusion.num_timesteps, steps, skip_type)
    diffusion, x, _ = prepare(diffusion, None, x0, dtype=x0.dtype, device=None, seed=None, generator=None,
                              needs_noise=False)
    rows = timestep_rows(ts, x.shape[0], x.device)
    abar = diffusion.alphas_cumprod
    record = Intermediates(return_intermediates)
    for k in steps_progress(len(ts), progress, "DDIM inversion"):
        # step k moves to ts[k]; the model is evaluated at the current state and its timestep ts[k - 1]
        # (for k = 0 at x0, taken as the state at ts[0])
        t_now = rows[max(k - 1, 0)]
        prediction = model_prediction(diffusion, model, x, t_now, model_kwargs)
        if k == 0:
            pred_x0, eps = x, diffusion.predict_x0_eps(prediction, x, t_now)[1]
            x = ops.q_sample(x, eps.to(x.dtype), rows[0], abar, impl=impl, check_values=False)
        else:
            x, pred_x0 = ops.ddim_step(x, prediction, t_now, rows[k], abar, 0.0,
                                       prediction_type=diffusion.prediction_type, impl=impl, check_values=False)
        record.add(x, pred_x0)
    return record.result(x, (diffusion.original_timesteps[t] for t in ts), None)
