"""Pure-torch versions of the fused ops: the CPU fallback and the test oracle.

Each function has the signature of its op in ``diffcore.ops`` (and of the ``torch.ops.diffcore`` schema), takes
per-sample timesteps ``t`` (int64 ``[B]``) and the float64 table ``alphas_cumprod`` (``[T]``), and computes in
float32 (float64 for float64 inputs), like the kernels: per-sample coefficients in float64, cast to the compute
dtype, then the elementwise math. Inputs are assumed valid; ``diffcore.ops`` checks them.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..types import PredictionType, VarianceType
from . import formulas
from .philox import philox_normal_like


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 for float32 / bfloat16 / float16."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def in_range(t: torch.Tensor, num_timesteps: int, allow_negative: bool = False) -> torch.Tensor:
    """``t`` clamped into [0, T) (into (-inf, T) with ``allow_negative``: every negative ``t_prev`` is the last step)."""
    return t.clamp(max=num_timesteps - 1) if allow_negative else t.clamp(0, num_timesteps - 1)


def _coef(values: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return formulas.per_sample(values, like).to(dtype)


def _noise(x, noise, seed, offset, first_row, dtype):
    if noise is not None:
        return noise.to(dtype)
    return philox_normal_like(x, seed, offset, first_row).to(dtype)


def _split_model_output(model_output: torch.Tensor, channels: int, variance_type: VarianceType):
    if variance_type.is_learned:
        return model_output[:, :channels], model_output[:, channels:]
    return model_output, None


def q_sample(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; all tensors ``[B, ...]`` except t ``[B]``."""
    dt = compute_dtype(x0)
    abar = alphas_cumprod.double()[in_range(t, alphas_cumprod.numel())]
    sa = _coef(abar.sqrt(), x0, dt)
    s1ma = _coef((1.0 - abar).sqrt(), x0, dt)
    return (sa * x0.to(dt) + s1ma * noise.to(dt)).to(x0.dtype)


def _predict(x, prediction, abar, prediction_type, clip_denoised, dt):
    """(x0_hat, eps_hat) in dtype dt with coefficients cast from float64 like the kernels."""
    sr = _coef((1.0 / abar).sqrt(), x, dt)
    srm1 = _coef((1.0 / abar - 1.0).sqrt(), x, dt)
    sa = _coef(abar.sqrt(), x, dt)
    s1ma = _coef((1.0 - abar).sqrt(), x, dt)
    x, prediction = x.to(dt), prediction.to(dt)
    if prediction_type == PredictionType.EPS:
        x0, eps = sr * x - srm1 * prediction, prediction
    elif prediction_type == PredictionType.X0:
        x0 = prediction
        eps = (sr * x - x0) / srm1
    else:
        x0 = sa * x - s1ma * prediction
        eps = sa * prediction + s1ma * x
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
        eps = (sr * x - x0) / srm1
    return x0, eps


def ddim_step(
    x: torch.Tensor,
    model_output: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    eta: float = 0.0,
    prediction_type: int = PredictionType.EPS,
    clip_denoised: bool = False,
    noise: Optional[torch.Tensor] = None,
    seed: int = 0,
    offset: int = 0,
    first_row: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One generalized DDIM update t -> t_prev (DDIM eq. 12); returns (x_prev, pred_x0), both shaped like x.

    t_prev < 0 marks the final step (abar = 1). t_prev > t runs the deterministic reverse direction used for
    inversion: x_next = sqrt(abar_next) x0_hat + sqrt(1 - abar_next) eps_hat (sigma is 0 there whatever eta).
    Without ``noise``, z is Philox noise of (seed, offset) with row b as image ``first_row + b``
    (:func:`~diffcore.reference.philox.philox_normal_like`).
    """
    dt = compute_dtype(x)
    table = alphas_cumprod.double()
    t, t_prev = in_range(t, table.numel()), in_range(t_prev, table.numel(), allow_negative=True)
    abar = table[t]
    abar_s = torch.where(t_prev >= 0, table[t_prev.clamp(min=0)], torch.ones_like(abar))
    sigma = eta * ((1.0 - abar_s) / (1.0 - abar)).sqrt() * (1.0 - abar / abar_s).clamp(min=0.0).sqrt()
    sigma = torch.where(t_prev < t, sigma, torch.zeros_like(sigma))
    c_eps = (1.0 - abar_s - sigma**2).clamp(min=0.0).sqrt()
    x0, eps = _predict(x, model_output, abar, PredictionType(prediction_type), clip_denoised, dt)
    x_prev = _coef(abar_s.sqrt(), x, dt) * x0 + _coef(c_eps, x, dt) * eps
    if eta != 0.0:
        x_prev = x_prev + _coef(sigma, x, dt) * _noise(x, noise, seed, offset, first_row, dt)
    return x_prev.to(x.dtype), x0.to(x.dtype)


def ddpm_step(
    x: torch.Tensor,
    model_output: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: int = PredictionType.EPS,
    variance_type: int = VarianceType.FIXED_SMALL,
    clip_denoised: bool = False,
    noise: Optional[torch.Tensor] = None,
    seed: int = 0,
    offset: int = 0,
    first_row: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral step x_t -> x_{t-1} = mu~(x0_hat, x_t) + [t > 0] sigma z; returns (x_prev, pred_x0).

    ``model_output`` is ``[B, C, ...]`` for fixed variances and ``[B, 2C, ...]`` (prediction then variance
    output) for learned ones. Without ``noise``, z is Philox noise as in :func:`ddim_step` (``first_row``).
    """
    dt = compute_dtype(x)
    variance_type = VarianceType(variance_type)
    t = in_range(t, alphas_cumprod.numel())
    tables = formulas.gather_tables(alphas_cumprod, t)
    prediction, var_output = _split_model_output(model_output, x.shape[1] if x.dim() > 1 else 0, variance_type)
    x0, _ = _predict(x, prediction, tables.abar, PredictionType(prediction_type), clip_denoised, dt)
    mean = _coef(tables.posterior_mean_coef1, x, dt) * x0 + _coef(tables.posterior_mean_coef2, x, dt) * x.to(dt)
    log_var = _log_variance(variance_type, tables, var_output, x, dt)
    nonzero = _coef((t > 0).double(), x, dt)
    x_prev = mean + nonzero * torch.exp(0.5 * log_var) * _noise(x, noise, seed, offset, first_row, dt)
    return x_prev.to(x.dtype), x0.to(x.dtype)


def _log_variance(variance_type, tables, var_output, like, dt):
    if variance_type == VarianceType.FIXED_SMALL:
        return _coef(tables.log_posterior_variance, like, dt)
    if variance_type == VarianceType.FIXED_LARGE:
        return _coef(tables.log_beta_large, like, dt)
    var_output = var_output.to(dt)
    if variance_type == VarianceType.LEARNED:
        return var_output
    min_log = _coef(tables.log_posterior_variance, like, dt)
    max_log = _coef(tables.beta.log(), like, dt)
    frac = (var_output + 1.0) / 2.0
    return frac * max_log + (1.0 - frac) * min_log


def hybrid_loss(
    model_output: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: int = PredictionType.EPS,
    variance_type: int = VarianceType.LEARNED_RANGE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample terms of the I-DDPM hybrid objective; returns (mse ``[B]``, vb ``[B]`` in bits).

    mse = mean over non-batch dims of (prediction - target)^2 (target: noise, x0 or v).
    vb = mean over non-batch dims of KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) / ln 2 for t > 0 and of the decoder
    NLL -log p(x0|x1) / ln 2 at t = 0, with the model mean computed from the prediction with its gradient
    stopped: vb trains only the variance channels. Outputs are float32 (float64 for float64 inputs).
    Differentiable with respect to ``model_output``; the gradient of vb is that of each sample's (and each edge
    bin's) selected branch only, as the fused kernel computes it (:func:`~diffcore.reference.formulas.vb_bits`).
    """
    dt = compute_dtype(x0)
    variance_type = VarianceType(variance_type)
    prediction_type = PredictionType(prediction_type)
    t = in_range(t, alphas_cumprod.numel())
    tables = formulas.gather_tables(alphas_cumprod, t)
    channels = x0.shape[1]
    prediction, var_output = model_output[:, :channels].to(dt), model_output[:, channels:].to(dt)
    x0c, x_tc, noisec = x0.to(dt), x_t.to(dt), noise.to(dt)
    target = formulas.training_target(x0c, noisec, _coef(tables.abar, x0, dt), prediction_type)
    reduce_dims = tuple(range(1, x0.dim()))
    mse = ((prediction - target) ** 2).mean(dim=reduce_dims)

    x0_hat, _ = _predict(x_tc, prediction.detach(), tables.abar, prediction_type, False, dt)
    c1, c2 = _coef(tables.posterior_mean_coef1, x0, dt), _coef(tables.posterior_mean_coef2, x0, dt)
    true_mean, model_mean = c1 * x0c + c2 * x_tc, c1 * x0_hat + c2 * x_tc
    true_log_var = _coef(tables.log_posterior_variance, x0, dt)
    model_log_var = _log_variance(variance_type, tables, var_output, x0, dt)
    at_zero = _coef((t == 0).double(), x0, dt).bool()
    vb = formulas.vb_bits(x0c, true_mean, true_log_var, model_mean, model_log_var, at_zero).mean(dim=reduce_dims)
    return mse, vb


def hybrid_loss_backward(
    grad_mse: torch.Tensor,
    grad_vb: torch.Tensor,
    model_output: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: int = PredictionType.EPS,
    variance_type: int = VarianceType.LEARNED_RANGE,
) -> torch.Tensor:
    """Gradient of sum(grad_mse * mse + grad_vb * vb) with respect to ``model_output`` (same shape and dtype)."""
    with torch.enable_grad():
        leaf = model_output.detach().to(compute_dtype(x0)).requires_grad_(True)
        mse, vb = hybrid_loss(leaf, x0, x_t, noise, t, alphas_cumprod, prediction_type, variance_type)
        (grad,) = torch.autograd.grad((mse * grad_mse.to(mse.dtype)).sum() + (vb * grad_vb.to(vb.dtype)).sum(), leaf)
    return grad.to(model_output.dtype)
