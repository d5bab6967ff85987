"""The Gaussian diffusion process (DDPM / Improved DDPM): forward noising, posterior, model mean and variance,
training losses and the variational bound in bits per dimension.

Shapes: images (or any data) are ``[B, C, ...]`` (``[B, D]`` works too); timesteps ``t`` are int64 ``[B]``
indices into this process's tables. Arithmetic is float32 (float64 for float64 inputs) with per-sample
coefficients computed in float64.

The model calling convention (every sampler, DPS, training and the bound go through
:meth:`GaussianDiffusion.call_model`): ``model(x, t_model, **model_kwargs)`` receives the *original* timesteps
(:meth:`GaussianDiffusion.model_timesteps`, the identity unless the process was respaced) and returns
``[B, C, ...]``, or ``[B, 2C, ...]`` (prediction then variance output) for learned variances; either as a tensor
or wrapped as diffusers' models return it (:func:`model_output_tensor`). :func:`split_model_output` is the one
check of an output's shape.

Every formula comes from :mod:`diffcore.reference.formulas` or :mod:`diffcore.ops`; this module composes them.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
from tqdm.auto import tqdm

from . import ops
from .ops import Impl
from .reference import formulas
from .reference.ops import compute_dtype
from .respace import SkipType, StepsSpec, resolve_timesteps, respace_schedule
from .schedules import NoiseSchedule, schedule_from_diffusers_config
from .types import PredictionType, VarianceType, as_prediction_type, as_variance_type, parse_enum

#: ``model(x [B, C, ...], t int64 [B] original timesteps, **model_kwargs) -> [B, C or 2C, ...]`` (a tensor, or
#: wrapped: see :func:`model_output_tensor`)
Model = Callable[..., Any]

__all__ = ["LossType", "as_loss_type", "Model", "model_output_tensor", "split_model_output", "GaussianDiffusion",
           "PosteriorMeanVariance", "ModelMeanVariance", "TrainingLosses", "BpdResult", "mean_flat",
           "log2_bin_width", "DIFFUSERS_LEARNED_VARIANCE"]


class LossType(enum.IntEnum):
    """The training objective (improved-diffusion's names)."""

    MSE = 0  #: L_simple (plus the unweighted vb term when the variance is learned)
    RESCALED_MSE = 1  #: the hybrid loss: L_simple + (T/1000) vb, vb training only the variance (I-DDPM)
    KL = 2  #: the variational bound term L_{t-1} in bits/dim
    RESCALED_KL = 3  #: KL times T (an estimate of the whole bound)

    @property
    def is_kl(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


def as_loss_type(value: "LossType | str | int") -> LossType:
    """Parse ``"mse" | "rescaled_mse" | "hybrid" | "kl" | "rescaled_kl"`` (or the enum) into a :class:`LossType`."""
    return parse_enum(LossType, value, "loss_type", {"hybrid": LossType.RESCALED_MSE})


#: why diffusers' ``variance_type="learned"`` and diffcore's :attr:`VarianceType.LEARNED` are not interchangeable
#: (refused both ways: :meth:`GaussianDiffusion.from_diffusers_config`, :mod:`diffcore.convert`)
DIFFUSERS_LEARNED_VARIANCE = ("diffusers' 'learned' reads the model's extra channels as the variance itself, "
                              "diffcore's (improved-diffusion's) 'learned' as its log, so the same network would "
                              "sample with a different variance")


def model_output_tensor(output: Any) -> torch.Tensor:
    """The tensor in what a model returned: a tensor itself; ``output["sample"]`` of a dict (diffusers' outputs
    are dicts too); the first element of a tuple or list (``return_dict=False``); ``output.sample`` of an object
    that has it (diffusers' ``UNet2DOutput``). Anything else is a TypeError naming the model."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        found = output.get("sample")
    elif isinstance(output, (tuple, list)):
        found = output[0] if output else None
    else:
        found = getattr(output, "sample", None)
    if not isinstance(found, torch.Tensor):
        raise TypeError(f"model output: expected a torch.Tensor, an object with a .sample tensor (diffusers' "
                        f"UNet2DOutput), a tuple whose first element is the tensor or a dict with 'sample', "
                        f"got {type(output).__name__}")
    return found


def split_model_output(output: torch.Tensor, x: torch.Tensor, variance_type: Optional[VarianceType] = None,
                       what: str = "model output") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Check a model output against ``x`` ``[B, C, ...]`` and split it: (prediction ``[B, C, ...]``, variance
    channels ``[B, C, ...]`` or None).

    With a ``variance_type`` the output must be ``[B, 2C, ...]`` (learned variances: the prediction, then the
    variance output) or ``[B, C, ...]`` (fixed); with None (a wrapper that does not know the process, such as the
    guidance wrappers) either is accepted and the shape tells which. Shapes and dtype only: no value is read.
    A wrong shape raises a ValueError that names ``what``, the expected and the given shape; a non-tensor or a
    tensor that is not floating point (an integer, bool or complex output would be cast silently) a TypeError
    naming ``what`` and its type or dtype.
    """
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(output).__name__}")
    if not output.is_floating_point():
        raise TypeError(f"{what}: expected a floating-point tensor (e.g. float32), got dtype {output.dtype}")
    learned = None if variance_type is None else variance_type.is_learned
    got, shape = output.shape, x.shape
    if learned is not True and got == shape:
        return output, None
    if learned is not False and len(shape) >= 2 and len(got) == len(shape) and got[0] == shape[0] \
            and got[1] == 2 * shape[1] and got[2:] == shape[2:]:
        return output[:, :shape[1]], output[:, shape[1]:]
    shape, got = tuple(shape), tuple(got)
    twice = shape[:1] + (2 * shape[1],) + shape[2:] if len(shape) >= 2 else None
    if learned is None:
        expected = f"{shape}" + (f" or {twice} (learned variance)" if twice else "")
        raise ValueError(f"{what}: expected shape {expected} for x of shape {shape}, got {got}")
    if learned and twice is None:
        raise ValueError(f"x: a learned variance needs a channel dimension (dim 1), got shape {shape}")
    what_channels = ("2C channels: the prediction, then the variance output; build the model with "
                     "learn_sigma=True or use a fixed variance type") if learned else \
        "C channels like x; a 2C-channel (learned-variance) model needs variance_type 'learned_range'"
    raise ValueError(f"{what}: expected shape {twice if learned else shape} for variance_type="
                     f"{variance_type.name.lower()!r} ({what_channels}), got {got}")


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions: ``[B, ...] -> [B]``."""
    return x.mean(dim=tuple(range(1, x.dim()))) if x.dim() > 1 else x


@dataclass(frozen=True)
class PosteriorMeanVariance:
    """q(x_{t-1} | x_t, x_0): mean ``[B, ...]``; variance (beta~_t, 0 at t = 0) and log_variance (clipped: entry 0
    replaced by entry 1) ``[B, 1, ..., 1]``, broadcastable to the mean."""

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor


@dataclass(frozen=True)
class ModelMeanVariance:
    """p_theta(x_{t-1} | x_t): mean ``[B, C, ...]``; variance and log_variance broadcastable to it
    (``[B, 1, ..., 1]`` for fixed types, ``[B, C, ...]`` for learned ones); pred_x0 and pred_eps ``[B, C, ...]``
    (after clipping when asked); model_output is the raw output ``[B, C or 2C, ...]``."""

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_x0: torch.Tensor
    pred_eps: torch.Tensor
    model_output: torch.Tensor


@dataclass(frozen=True)
class TrainingLosses:
    """Per-sample training terms, each ``[B]`` (float32, float64 for float64 data).

    loss: what to average and minimize. mse: mean over dimensions of (prediction - target)^2 (target: the noise,
    x0 or v per the prediction type). vb: the variational-bound term in bits/dim (KL at t > 0, decoder NLL at t = 0),
    unweighted; None when the loss type and variance type do not compute it (mse with a fixed variance).
    """

    loss: torch.Tensor
    mse: torch.Tensor
    vb: Optional[torch.Tensor]
    x_t: torch.Tensor  #: the noised input the model saw, ``[B, C, ...]``
    noise: torch.Tensor  #: the noise used, ``[B, C, ...]``


@dataclass(frozen=True)
class BpdResult:
    """The variational bound in bits per dimension, per sample.

    total_bpd ``[B]`` = prior_bpd + vb.sum(1); prior_bpd ``[B]`` = KL(q(x_{T-1} | x0) || N(0, I));
    vb ``[B, T]``: column t is L_t (column 0 the decoder NLL -log2 p(x0 | x_0-noisy) per dimension);
    xstart_mse, mse ``[B, T]``: mean squared error of the predicted x0 and of the predicted eps at each t.
    """

    total_bpd: torch.Tensor
    prior_bpd: torch.Tensor
    vb: torch.Tensor
    xstart_mse: torch.Tensor
    mse: torch.Tensor

    @property
    def decoder_bpd(self) -> torch.Tensor:
        """The t = 0 (decoder) term, ``[B]``."""
        return self.vb[:, 0]


def _coef(values: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return formulas.per_sample(values, like).to(dtype)


class GaussianDiffusion:
    """A T-step Gaussian diffusion process with a model parameterization (immutable).

    Args:
        schedule: the :class:`~diffcore.schedules.NoiseSchedule` (tables float64, on the device to use).
        prediction_type: what the model predicts: ``"eps" | "x0" | "v"``.
        variance_type: ``"fixed_small" | "fixed_large" | "learned_range" | "learned"``.
        loss_type: ``"mse" | "rescaled_mse" (= "hybrid") | "kl" | "rescaled_kl"``.
        timestep_map: int64 ``[T]``: index -> original timestep given to the model (set by :meth:`respaced`).
    """

    def __init__(self, schedule: NoiseSchedule, prediction_type: "PredictionType | str" = PredictionType.EPS,
                 variance_type: "VarianceType | str" = VarianceType.FIXED_SMALL,
                 loss_type: "LossType | str" = LossType.MSE, *, timestep_map: Optional[torch.Tensor] = None):
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule: expected a NoiseSchedule (see diffcore.schedules.make_schedule), "
                            f"got {type(schedule).__name__}")
        self.schedule = schedule
        self.prediction_type = as_prediction_type(prediction_type)
        self.variance_type = as_variance_type(variance_type)
        self.loss_type = as_loss_type(loss_type)
        if schedule.has_zero_terminal_snr and self.prediction_type != PredictionType.V:
            raise ValueError(f"prediction_type: a zero-terminal-SNR schedule (abar_T-1 = 0) needs 'v' prediction, "
                             f"got {self.prediction_type.name.lower()!r} (singular at the last timestep)")
        if timestep_map is not None:
            if (not isinstance(timestep_map, torch.Tensor) or timestep_map.dtype != torch.int64
                    or timestep_map.shape != (schedule.num_timesteps,)):
                raise ValueError(f"timestep_map: expected an int64 tensor of shape ({schedule.num_timesteps},), "
                                 f"got {timestep_map!r}")
            timestep_map = timestep_map.to(schedule.device)
        self.timestep_map = timestep_map
        #: the original timestep of each index, on the host (read once here, never in a loop)
        self.original_timesteps: tuple[int, ...] = (
            tuple(range(schedule.num_timesteps)) if timestep_map is None else tuple(timestep_map.tolist()))

    # -- basic properties ------------------------------------------------------------------------------------
    @property
    def num_timesteps(self) -> int:
        """T, the number of steps of this (possibly respaced) process."""
        return self.schedule.num_timesteps

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """abar, float64 ``[T]``: the table every op gathers from."""
        return self.schedule.alphas_cumprod

    @property
    def device(self) -> torch.device:
        return self.schedule.device

    def __repr__(self) -> str:
        respaced = "" if self.timestep_map is None else ", respaced"
        return (f"GaussianDiffusion({self.schedule!r}, prediction={self.prediction_type.name.lower()}, "
                f"variance={self.variance_type.name.lower()}, loss={self.loss_type.name.lower()}{respaced})")

    def to(self, device: "torch.device | str") -> "GaussianDiffusion":
        """This process with its tables on ``device`` (self when already there)."""
        schedule = self.schedule.to(device)
        if schedule is self.schedule:
            return self
        return GaussianDiffusion(schedule, self.prediction_type, self.variance_type, self.loss_type,
                                 timestep_map=None if self.timestep_map is None else self.timestep_map.to(device))

    def respaced(self, use_timesteps: StepsSpec, skip_type: SkipType = "even") -> "GaussianDiffusion":
        """The process that visits only some timesteps (improved-diffusion's SpacedDiffusion).

        ``use_timesteps``: a count (spaced by ``skip_type``; ``"even"`` is improved-diffusion's spacing), a
        respacing string (``"250"``, ``"10,15,20"``, ``"ddim50"``) or the kept indices. abar is kept at those
        timesteps, beta'_i = 1 - abar_{t_i} / abar_{t_(i-1)}, and models still receive the original timesteps.
        """
        kept = resolve_timesteps(self.num_timesteps, use_timesteps, skip_type)
        schedule, index = respace_schedule(self.schedule, kept)
        new_map = index if self.timestep_map is None else self.timestep_map[index]
        return GaussianDiffusion(schedule, self.prediction_type, self.variance_type, self.loss_type,
                                 timestep_map=new_map)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The original timesteps (int64 ``[B]``) to give the model for indices ``t`` (a gather; no sync)."""
        return t if self.timestep_map is None else self.timestep_map[t]

    def wrap_model(self, model: Model) -> Model:
        """A callable taking this process's indices and calling ``model`` with the original timesteps."""
        def wrapped(x: torch.Tensor, t: torch.Tensor, **model_kwargs: Any) -> torch.Tensor:
            return model(x, self.model_timesteps(t), **model_kwargs)
        return wrapped

    # -- model outputs -----------------------------------------------------------------------------------------
    def call_model(self, model: Model, x: torch.Tensor, t: torch.Tensor,
                   model_kwargs: Optional[dict] = None) -> torch.Tensor:
        """``model(x, original t, **model_kwargs)``: the one place where diffcore calls a model.

        The output is unwrapped (:func:`model_output_tensor`), checked against the variance type
        (:func:`split_model_output`: shape, and a floating dtype) and cast to x's dtype (differentiably). Returns
        ``[B, C, ...]`` or ``[B, 2C, ...]`` (learned variances); split it with :meth:`split_output`.
        """
        out = model_output_tensor(model(x, self.model_timesteps(t), **(model_kwargs or {})))
        split_model_output(out, x, self.variance_type)
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        return out

    def split_output(self, model_output: torch.Tensor, channels: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(prediction ``[B, C, ...]``, variance output ``[B, C, ...]`` or None for fixed variances) of an output
        already checked by :meth:`call_model` (slicing only)."""
        if self.variance_type.is_learned:
            return model_output[:, :channels], model_output[:, channels:]
        return model_output, None

    def predict_x0_eps(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                       clip_denoised: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) ``[B, C, ...]`` from a prediction (the first C channels of the output) at ``t``.

        With ``clip_denoised`` x0_hat is clamped to [-1, 1] and eps_hat re-derived from it. The coefficients
        (sqrt(1/abar), sqrt(1/abar - 1), ...) are computed in float64, as the fused ops do: from a float32 abar,
        sqrt(1/abar - 1) cancels near abar = 1 (9.6e-4 relative at t = 0 of the cosine schedule). The results are
        in the compute dtype (float32; float64 for float64 inputs).
        """
        dt = compute_dtype(x_t)
        abar = formulas.per_sample(self.alphas_cumprod[t].double(), x_t)  # float64: products promote to it
        x0, eps = formulas.predict_x0_eps(prediction.to(dt), x_t.to(dt), abar, self.prediction_type, clip_denoised)
        return x0.to(dt), eps.to(dt)

    # -- the forward process -----------------------------------------------------------------------------------
    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I): (mean ``[B, ...]``, variance, log_variance
        ``[B, 1, ..., 1]``)."""
        dt = compute_dtype(x0)
        abar = formulas.per_sample(self.alphas_cumprod[t], x0)
        return (abar.sqrt().to(dt) * x0.to(dt), (1.0 - abar).to(dt), torch.log(1.0 - abar).to(dt))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None, *,
                 generator: Optional[torch.Generator] = None, impl: Impl = "auto",
                 check_values: bool = True) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (``[B, ...]`` like x0); the noise is drawn with
        ``generator`` (on x0's device) when not given."""
        if noise is None:
            noise = torch.randn(x0.shape, dtype=x0.dtype, device=x0.device, generator=generator)
        return ops.q_sample(x0, noise, t, self.alphas_cumprod, impl=impl, check_values=check_values)

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> PosteriorMeanVariance:
        """q(x_{t-1} | x_t, x0) (DDPM eq. 6-7): mean = c1 x0 + c2 x_t, variance beta~_t."""
        dt = compute_dtype(x_t)
        tables = formulas.gather_tables(self.alphas_cumprod, t)
        mean = _coef(tables.posterior_mean_coef1, x_t, dt) * x0.to(dt) + \
            _coef(tables.posterior_mean_coef2, x_t, dt) * x_t.to(dt)
        variance = _coef(self.schedule.posterior_variance[t], x_t, dt)
        return PosteriorMeanVariance(mean, variance, _coef(tables.log_posterior_variance, x_t, dt))

    # -- the reverse process -----------------------------------------------------------------------------------
    def p_mean_variance(self, model: Optional[Model], x_t: torch.Tensor, t: torch.Tensor, *,
                        clip_denoised: bool = False, model_kwargs: Optional[dict] = None,
                        model_output: Optional[torch.Tensor] = None) -> ModelMeanVariance:
        """p_theta(x_{t-1} | x_t): the model's x0_hat plugged into the posterior mean, and its variance.

        Pass ``model`` (called here) or a precomputed ``model_output`` (then ``model`` may be None).
        """
        if model_output is None:
            if model is None:
                raise ValueError("model: expected a callable when model_output is not given, got None")
            model_output = self.call_model(model, x_t, t, model_kwargs)
        else:
            split_model_output(model_output, x_t, self.variance_type)
        dt = compute_dtype(x_t)
        channels = x_t.shape[1] if x_t.dim() > 1 else 0
        prediction, var_output = self.split_output(model_output, channels)
        x0_hat, eps_hat = self.predict_x0_eps(prediction, x_t, t, clip_denoised)
        tables = formulas.gather_tables(self.alphas_cumprod, t)
        mean = _coef(tables.posterior_mean_coef1, x_t, dt) * x0_hat + \
            _coef(tables.posterior_mean_coef2, x_t, dt) * x_t.to(dt)
        var_output = None if var_output is None else var_output.to(dt)
        log_var = formulas.model_log_variance(self.variance_type, tables, var_output, x_t).to(dt)
        return ModelMeanVariance(mean, log_var.exp(), log_var, x0_hat, eps_hat, model_output)

    def vb_terms_bpd(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, *,
                     clip_denoised: bool = False, detach_mean: bool = False
                     ) -> tuple[torch.Tensor, ModelMeanVariance]:
        """The bound's term at t in bits/dim, ``[B]``: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0,
        the discretized decoder NLL -log p(x0 | x_t) at t = 0 (x0 in [-1, 1], 256 bins); and the model's
        mean/variance. ``detach_mean`` stops the gradient of the mean (the hybrid loss's vb)."""
        true = self.q_posterior_mean_variance(x0, x_t, t)
        if detach_mean and self.variance_type.is_learned:
            channels = x_t.shape[1]
            model_output = torch.cat([model_output[:, :channels].detach(), model_output[:, channels:]], dim=1)
        elif detach_mean:
            model_output = model_output.detach()
        pmv = self.p_mean_variance(None, x_t, t, clip_denoised=clip_denoised, model_output=model_output)
        at_zero = formulas.per_sample(t == 0, x_t)
        vb = formulas.vb_bits(x0.to(pmv.mean.dtype), true.mean, true.log_variance, pmv.mean, pmv.log_variance,
                              at_zero)
        return mean_flat(vb), pmv

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """KL(q(x_{T-1} | x0) || N(0, I)) in bits/dim, ``[B]`` (the bound's prior term)."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, dtype=torch.int64, device=x0.device)
        mean, _, log_var = self.q_mean_variance(x0, t)
        zeros = torch.zeros_like(mean)
        return mean_flat(formulas.normal_kl(mean, log_var, zeros, zeros)) / formulas.LOG2

    # -- training and evaluation ------------------------------------------------------------------------------
    def training_losses(self, model: Model, x0: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None,
                        *, model_kwargs: Optional[dict] = None, generator: Optional[torch.Generator] = None,
                        impl: Impl = "auto", check_values: bool = True) -> TrainingLosses:
        """Per-sample training terms at timesteps ``t`` (int64 ``[B]``) for data ``x0`` ``[B, C, ...]``.

        - mse / rescaled_mse with a learned variance: the fused :func:`diffcore.ops.hybrid_loss`;
          loss = mse + w vb with w = T/1000 for rescaled_mse (the I-DDPM hybrid loss, lambda = 0.001) and 1 for mse.
        - mse / rescaled_mse with a fixed variance: loss = mse (L_simple).
        - kl / rescaled_kl: loss = vb (times T for rescaled_kl), gradients through mean and variance; mse is
          reported, not optimized.
        ``noise`` is drawn with ``generator`` when not given. ``check_values=False`` skips reading t (no sync).
        """
        if noise is None:
            noise = torch.randn(x0.shape, dtype=x0.dtype, device=x0.device, generator=generator)
        x_t = ops.q_sample(x0, noise, t, self.alphas_cumprod, impl=impl, check_values=check_values)
        out = self.call_model(model, x_t, t, model_kwargs)
        T = self.num_timesteps
        if not self.loss_type.is_kl and self.variance_type.is_learned:
            mse, vb = ops.hybrid_loss(out, x0, x_t, noise, t, self.alphas_cumprod,
                                      prediction_type=self.prediction_type, variance_type=self.variance_type,
                                      impl=impl, check_values=False)
            weight = T / 1000.0 if self.loss_type == LossType.RESCALED_MSE else 1.0
            return TrainingLosses(mse + weight * vb, mse, vb, x_t, noise)
        dt = compute_dtype(x0)
        prediction, _ = self.split_output(out, x0.shape[1] if x0.dim() > 1 else 0)
        abar = _coef(self.alphas_cumprod[t], x0, dt)
        target = formulas.training_target(x0.to(dt), noise.to(dt), abar, self.prediction_type)
        mse = mean_flat((prediction.to(dt) - target) ** 2)
        if not self.loss_type.is_kl:
            return TrainingLosses(mse, mse, None, x_t, noise)
        vb, _ = self.vb_terms_bpd(out, x0, x_t, t, clip_denoised=False, detach_mean=False)
        weight = float(T) if self.loss_type == LossType.RESCALED_KL else 1.0
        return TrainingLosses(weight * vb, mse.detach(), vb, x_t, noise)

    @torch.no_grad()
    def calc_bpd_loop(self, model: Model, x0: torch.Tensor, *, clip_denoised: bool = True,
                      model_kwargs: Optional[dict] = None, generator: Optional[torch.Generator] = None,
                      progress: bool = False, impl: Impl = "auto") -> BpdResult:
        """The variational bound of x0 ``[B, C, ...]`` (in [-1, 1]) in bits/dim, one model call per timestep.

        For each t (T-1 down to 0) draws x_t ~ q(x_t | x0) (noise from ``generator``, on x0's device) and
        evaluates L_t; adds the prior term. An unbiased single-sample estimate of the bound per image; average
        over images for the dataset's bits/dim. ``clip_denoised`` clamps x0_hat to [-1, 1] (improved-diffusion's
        default for images).
        """
        B, T = x0.shape[0], self.num_timesteps
        dt = compute_dtype(x0)
        vb = torch.zeros(B, T, dtype=dt, device=x0.device)
        xstart_mse = torch.zeros_like(vb)
        mse = torch.zeros_like(vb)
        t_all = torch.arange(T, dtype=torch.int64, device=x0.device)[:, None].expand(T, B).contiguous()
        for t_index in tqdm(range(T - 1, -1, -1), disable=not progress, desc="bpd"):
            t = t_all[t_index]
            noise = torch.randn(x0.shape, dtype=x0.dtype, device=x0.device, generator=generator)
            x_t = ops.q_sample(x0, noise, t, self.alphas_cumprod, impl=impl, check_values=False)
            out = self.call_model(model, x_t, t, model_kwargs)
            vb_t, pmv = self.vb_terms_bpd(out, x0, x_t, t, clip_denoised=clip_denoised)
            vb[:, t_index] = vb_t
            xstart_mse[:, t_index] = mean_flat((pmv.pred_x0 - x0.to(dt)) ** 2)
            mse[:, t_index] = mean_flat((pmv.pred_eps - noise.to(dt)) ** 2)
        prior = self.prior_bpd(x0).to(dt)
        return BpdResult(vb.sum(dim=1) + prior, prior, vb, xstart_mse, mse)

    @classmethod
    def from_diffusers_config(cls, config: "Mapping[str, Any]") -> "GaussianDiffusion":
        """The process a diffusers scheduler config describes (a dict: ``scheduler.config`` or the parsed
        ``scheduler_config.json`` of DDPMScheduler / DDIMScheduler / ...); tables float64 on the CPU, loss mse.

        The betas: :func:`diffcore.schedules.schedule_from_diffusers_config`. ``prediction_type`` ``epsilon`` /
        ``sample`` / ``v_prediction`` (diffcore's eps / x0 / v); ``variance_type`` ``fixed_small``
        (``fixed_small_log``), ``fixed_large`` (``fixed_large_log``) or ``learned_range``; one difference:
        diffusers' fixed_large uses beta_0 at t = 0, diffcore (improved-diffusion) beta~_1. ``learned`` is refused
        (:data:`DIFFUSERS_LEARNED_VARIANCE`: the same network would sample with another variance). The sampler
        settings of a scheduler (``clip_sample``, ``timestep_spacing``, ...) are not part of the process: pass them
        to diffcore's samplers. Errors name the config field (ValueError).
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"config: expected a dict (a diffusers scheduler config), got {type(config).__name__}")
        variance = config.get("variance_type") or "fixed_small"
        variance = variance[:-len("_log")] if variance in ("fixed_small_log", "fixed_large_log") else variance
        try:
            prediction = as_prediction_type(config.get("prediction_type", "epsilon"))
            variance_type = as_variance_type(variance)
        except ValueError as error:
            raise ValueError(f"scheduler config {error}") from None
        if variance_type is VarianceType.LEARNED:
            raise ValueError(f"scheduler config variance_type: 'learned' is not converted: "
                             f"{DIFFUSERS_LEARNED_VARIANCE}")
        return cls(schedule_from_diffusers_config(config), prediction, variance_type)


def log2_bin_width() -> float:
    """log2 of the decoder's bin width 2/255: a continuous density's -log2 p(x) per dimension minus this is
    comparable with the bound's bits/dim."""
    return math.log2(2.0 / 255.0)
