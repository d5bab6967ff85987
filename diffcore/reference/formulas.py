"""The formulas of DESIGN.md section 3 in pure torch, one function each.

Every function works elementwise on broadcastable tensors, so schedule quantities of shape ``[B, 1, ..., 1]``
combine with images of shape ``[B, ...]``. Schedule tables are float64; callers choose the compute dtype.
The C++ twin of each function lives in ``csrc/formulas.h`` (host-device templates shared by the CPU and CUDA kernels).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..types import PredictionType, VarianceType

LOG2 = math.log(2.0)


@dataclass(frozen=True)
class StepTables:
    """Schedule quantities gathered at per-sample timesteps, each ``[B]`` float64."""

    abar: torch.Tensor  #: alpha-bar at t
    abar_prev: torch.Tensor  #: alpha-bar at t-1 (1 at t = 0)
    beta: torch.Tensor  #: 1 - abar / abar_prev
    log_posterior_variance: torch.Tensor  #: log beta~_t, with entry 0 replaced by entry 1 ("clipped")
    log_beta_large: torch.Tensor  #: log beta_t, with entry 0 replaced by log beta~_1 (fixed_large)

    @property
    def posterior_mean_coef1(self) -> torch.Tensor:
        return self.beta * self.abar_prev.sqrt() / (1.0 - self.abar)

    @property
    def posterior_mean_coef2(self) -> torch.Tensor:
        return (1.0 - self.abar_prev) * (1.0 - self.beta).sqrt() / (1.0 - self.abar)


def gather_tables(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> StepTables:
    """Gather the per-sample schedule quantities of ``t`` (int64 ``[B]``) from ``alphas_cumprod`` (float64 ``[T]``)."""
    abar_all = alphas_cumprod.double()
    abar_prev_all = torch.cat([abar_all.new_ones(1), abar_all[:-1]])
    beta_all = 1.0 - abar_all / abar_prev_all
    post_var = beta_all * (1.0 - abar_prev_all) / (1.0 - abar_all)
    post_var_1 = post_var[1:2] if post_var.numel() > 1 else post_var[:1]
    log_post_clipped = torch.log(torch.cat([post_var_1, post_var[1:]]))
    log_large = torch.log(torch.cat([post_var_1, beta_all[1:]]))
    return StepTables(
        abar=abar_all[t],
        abar_prev=abar_prev_all[t],
        beta=beta_all[t],
        log_posterior_variance=log_post_clipped[t],
        log_beta_large=log_large[t],
    )


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape ``[B]`` values to ``[B, 1, ..., 1]`` so they broadcast against ``like`` (``[B, ...]``)."""
    return values.reshape((-1,) + (1,) * (like.dim() - 1))


def q_sample(x0, noise, abar):
    """x_t = sqrt(abar) x0 + sqrt(1 - abar) noise."""
    return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise


def x0_from_eps(x_t, eps, abar):
    """x0 = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps."""
    return (1.0 / abar).sqrt() * x_t - (1.0 / abar - 1.0).sqrt() * eps


def eps_from_x0(x_t, x0, abar):
    """eps = (sqrt(1/abar) x_t - x0) / sqrt(1/abar - 1)."""
    return ((1.0 / abar).sqrt() * x_t - x0) / (1.0 / abar - 1.0).sqrt()


def v_target(x0, eps, abar):
    """v = sqrt(abar) eps - sqrt(1 - abar) x0."""
    return abar.sqrt() * eps - (1.0 - abar).sqrt() * x0


def predict_x0_eps(prediction, x_t, abar, prediction_type: PredictionType, clip_denoised: bool):
    """(x0_hat, eps_hat) from a model prediction of the given type; clipping clamps x0 and re-derives eps."""
    if prediction_type == PredictionType.EPS:
        x0, eps = x0_from_eps(x_t, prediction, abar), prediction
    elif prediction_type == PredictionType.X0:
        x0, eps = prediction, eps_from_x0(x_t, prediction, abar)
    else:
        x0 = abar.sqrt() * x_t - (1.0 - abar).sqrt() * prediction
        eps = abar.sqrt() * prediction + (1.0 - abar).sqrt() * x_t
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
        eps = eps_from_x0(x_t, x0, abar)
    return x0, eps


def training_target(x0, noise, abar, prediction_type: PredictionType):
    """What the model's prediction is regressed on: noise, x0 or v."""
    if prediction_type == PredictionType.EPS:
        return noise
    if prediction_type == PredictionType.X0:
        return x0
    return v_target(x0, noise, abar)


def model_log_variance(variance_type: VarianceType, tables: StepTables, var_output, like):
    """log sigma^2 of p(x_{t-1} | x_t) for each variance type; ``var_output`` is the model's extra channels."""
    if variance_type == VarianceType.FIXED_SMALL:
        return per_sample(tables.log_posterior_variance, like)
    if variance_type == VarianceType.FIXED_LARGE:
        return per_sample(tables.log_beta_large, like)
    if variance_type == VarianceType.LEARNED:
        return var_output
    min_log = per_sample(tables.log_posterior_variance, like)
    max_log = per_sample(tables.beta.log(), like)
    frac = (var_output + 1.0) / 2.0
    return frac * max_log + (1.0 - frac) * min_log


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def branch_inputs(keep, *tensors):
    """``tensors`` where ``keep`` holds and 0 elsewhere (each broadcast against ``keep``): the inputs of one branch
    of a ``torch.where`` ("double where").

    The backward of ``torch.where(c, a, b)`` passes 0 to the branch it did not select, and 0 * inf = 0 * NaN = NaN,
    so a non-finite intermediate of the unselected branch would turn the gradient NaN where the selected branch's
    is finite. A branch computed on these inputs meets only zeros where it is not selected, while where it is
    selected it sees its inputs unchanged (its values, NaN and inf included, are the same bit for bit).
    Returns a tuple with one tensor per input, in the dtype of that input.
    """
    return tuple(torch.where(keep, tensor, 0.0) for tensor in tensors)


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log-probability (nats) of x in [-1, 1] under a Gaussian discretized into 256 bins of width 2/255.

    The edge bins are open (x < -0.999 takes the CDF from -inf, x > 0.999 up to +inf); logs are clamped at 1e-12.
    A NaN x takes the inner-bin formula. Each bin edge's CDF is computed only where a selected branch reads it
    (:func:`branch_inputs`), so the gradient is that of the selected branch alone, as in the fused kernel.
    """
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    lower, upper = x < -0.999, x > 0.999
    plus_scale, plus_centered = branch_inputs(~upper, inv_stdv, centered)  # read by the lower and inner bins
    min_scale, min_centered = branch_inputs(~lower, inv_stdv, centered)  # read by the upper and inner bins
    cdf_plus = approx_standard_normal_cdf(plus_scale * (plus_centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(min_scale * (min_centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(lower, log_cdf_plus, torch.where(upper, log_one_minus_cdf_min, log_cdf_delta))


def vb_bits(x0, true_mean, true_log_var, model_mean, model_log_var, at_zero):
    """One term of the variational bound per element, in bits: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) / ln 2
    where ``at_zero`` is false and the decoder NLL -log p(x0 | x_1) / ln 2 (x0 in [-1, 1]) where it is true.

    Images are ``[B, ...]``; the log variances may be per sample (``[B, 1, ..., 1]``); ``at_zero`` (bool, t == 0)
    is ``[B, 1, ..., 1]``. Each branch runs on :func:`branch_inputs`, so NaN / inf of a sample's unused branch
    reach neither its value nor its gradient; those of the used branch propagate as in torch.
    """
    kl = normal_kl(*branch_inputs(~at_zero, true_mean, true_log_var, model_mean, model_log_var)) / LOG2
    x, mean, log_var = branch_inputs(at_zero, x0, model_mean, model_log_var)
    nll = -discretized_gaussian_log_likelihood(x, mean, 0.5 * log_var) / LOG2
    return torch.where(at_zero, nll, kl)
