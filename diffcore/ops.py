"""The fused diffusion ops: typed wrappers that pick the fused kernel or the pure-torch reference per call.

Every op takes per-sample timesteps ``t`` (int64 ``[B]``) and the schedule table ``alphas_cumprod`` (float64
``[T]``, on the tensors' device); coefficients are gathered inside the kernel. Inputs may be float32, float64,
bfloat16 or float16 (arithmetic in float32, float64 stays float64), any batch size including 0, any trailing
shape, contiguous or not (channels_last included). ``impl`` chooses the path: ``"auto"`` (fused when built for
the device, else reference), ``"fused"`` (error if not built) or ``"reference"``. :func:`which_impl` tells
which path a call takes.

Noise for the steps is either passed in (``noise``) or drawn inside the kernel from Philox4x32-10 keyed by
``seed`` at counter ``offset``; the same ``(seed, offset)`` gives the same noise on CPU, CUDA and the
reference (up to float rounding of the Box-Muller transform). With neither given, a seed is drawn from
``generator`` (or torch's default CPU generator), which needs no device sync.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch

from . import _extension
from . import _validation as V
from . import reference
from .types import PredictionType, VarianceType, as_prediction_type, as_variance_type

Impl = Literal["auto", "fused", "reference"]

__all__ = ["q_sample", "ddim_step", "ddpm_step", "hybrid_loss", "which_impl", "fused_available", "Impl"]


def fused_available(device: "torch.device | str" = "cpu") -> bool:
    """True when the fused kernels are built for ``device``'s type."""
    return _extension.has_fused_kernels(device)


def which_impl(device: "torch.device | str | torch.Tensor", impl: Impl = "auto") -> Literal["fused", "reference"]:
    """The path an op call with this ``impl`` takes on ``device`` (or a tensor's device).

    Raises RuntimeError for ``impl="fused"`` when the kernels are not built for that device.
    """
    if isinstance(device, torch.Tensor):
        device = device.device
    if impl == "reference":
        return "reference"
    available = fused_available(device)
    if impl == "fused":
        if not available:
            reason = _extension.load_error() or f"it was built without kernels for {torch.device(device).type}"
            raise RuntimeError(f"impl='fused': the diffcore extension is not available ({reason}); "
                               f"{_extension.BUILD_HINT}")
        return "fused"
    if impl != "auto":
        raise ValueError(f"impl: expected 'auto', 'fused' or 'reference', got {impl!r}")
    return "fused" if available else "reference"


def _seed_and_offset(noise, seed, offset, generator) -> tuple[int, int]:
    if noise is not None:
        return 0, 0
    if offset < 0:
        raise ValueError(f"offset: expected >= 0, got {offset}")
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    elif not 0 <= seed < 2**63:
        raise ValueError(f"seed: expected an int in [0, 2**63), got {seed}")
    return seed, offset


def _check_noise(noise, x):
    if noise is not None:
        V.check_same("noise", noise, "x", x)


def q_sample(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, *,
             impl: Impl = "auto", check_values: bool = True) -> torch.Tensor:
    """Forward noising q(x_t | x0): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.

    Args: x0, noise ``[B, ...]``; t int64 ``[B]``; alphas_cumprod float64 ``[T]``. Returns x_t like x0.
    """
    V.check_float("x0", x0)
    V.check_same("noise", noise, "x0", x0)
    V.check_table("alphas_cumprod", alphas_cumprod, "x0", x0)
    V.check_timesteps("t", t, x0.shape[0], alphas_cumprod.numel(), "x0", x0, check_values=check_values)
    if which_impl(x0, impl) == "fused":
        return torch.ops.diffcore.q_sample(x0, noise, t, alphas_cumprod)
    return reference.q_sample(x0, noise, t, alphas_cumprod)


def ddim_step(x: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
              alphas_cumprod: torch.Tensor, eta: float = 0.0, *,
              prediction_type: "PredictionType | str" = PredictionType.EPS, clip_denoised: bool = False,
              noise: Optional[torch.Tensor] = None, seed: Optional[int] = None, offset: int = 0,
              generator: Optional[torch.Generator] = None, impl: Impl = "auto",
              check_values: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized DDIM update (DDIM eq. 12) from t to t_prev, per sample; returns (x_prev, pred_x0).

    sigma = eta sqrt((1 - abar_s)/(1 - abar_t)) sqrt(1 - abar_t / abar_s);
    x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z.
    t_prev < 0 is the final step (abar_s = 1); t_prev > t is the deterministic reverse (inversion) step,
    where sigma is 0. With ``clip_denoised`` x0_hat is clamped to [-1, 1] and eps_hat re-derived from it.

    Args: x ``[B, ...]``; model_output like x (eps, x0 or v per ``prediction_type``); t, t_prev int64 ``[B]``;
    eta >= 0. Returns two tensors like x.
    """
    if not eta >= 0.0:
        raise ValueError(f"eta: expected a float >= 0, got {eta}")
    prediction_type = as_prediction_type(prediction_type)
    V.check_float("x", x)
    V.check_channels("model_output", model_output, "x", x, learned=False)
    V.check_table("alphas_cumprod", alphas_cumprod, "x", x)
    T = alphas_cumprod.numel()
    V.check_timesteps("t", t, x.shape[0], T, "x", x, check_values=check_values)
    V.check_timesteps("t_prev", t_prev, x.shape[0], T, "x", x, allow_negative=True, check_values=check_values)
    _check_noise(noise, x)
    seed, offset = _seed_and_offset(noise, seed, offset, generator) if eta > 0 else (0, 0)
    args = (x, model_output, t, t_prev, alphas_cumprod, float(eta), int(prediction_type), bool(clip_denoised),
            noise, seed, offset)
    if which_impl(x, impl) == "fused":
        return torch.ops.diffcore.ddim_step(*args)
    return reference.ddim_step(*args)


def ddpm_step(x: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, *,
              prediction_type: "PredictionType | str" = PredictionType.EPS,
              variance_type: "VarianceType | str" = VarianceType.FIXED_SMALL, clip_denoised: bool = False,
              noise: Optional[torch.Tensor] = None, seed: Optional[int] = None, offset: int = 0,
              generator: Optional[torch.Generator] = None, impl: Impl = "auto",
              check_values: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral step x_{t-1} = mu~(x0_hat, x_t) + [t > 0] exp(0.5 log sigma^2) z; returns (x_prev, pred_x0).

    Args: x ``[B, C, ...]``; model_output ``[B, C, ...]`` for fixed variances or ``[B, 2C, ...]`` (prediction,
    then variance output v) for ``learned_range`` / ``learned``; t int64 ``[B]``; alphas_cumprod float64 ``[T]``
    with T >= 2.
    """
    prediction_type = as_prediction_type(prediction_type)
    variance_type = as_variance_type(variance_type)
    V.check_float("x", x)
    V.check_channels("model_output", model_output, "x", x, learned=variance_type.is_learned)
    V.check_table("alphas_cumprod", alphas_cumprod, "x", x, min_length=2)
    V.check_timesteps("t", t, x.shape[0], alphas_cumprod.numel(), "x", x, check_values=check_values)
    _check_noise(noise, x)
    seed, offset = _seed_and_offset(noise, seed, offset, generator)
    args = (x, model_output, t, alphas_cumprod, int(prediction_type), int(variance_type), bool(clip_denoised),
            noise, seed, offset)
    if which_impl(x, impl) == "fused":
        return torch.ops.diffcore.ddpm_step(*args)
    return reference.ddpm_step(*args)


def hybrid_loss(model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, noise: torch.Tensor,
                t: torch.Tensor, alphas_cumprod: torch.Tensor, *,
                prediction_type: "PredictionType | str" = PredictionType.EPS,
                variance_type: "VarianceType | str" = VarianceType.LEARNED_RANGE, impl: Impl = "auto",
                check_values: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample terms of the I-DDPM hybrid loss; returns (mse ``[B]``, vb ``[B]``, in bits).

    The loss is ``mse + (T / 1000) * vb`` (improved-diffusion's RESCALED_MSE). vb's mean comes from the
    prediction with its gradient stopped, so vb trains only the variance channels; at t = 0 vb is the
    discretized-Gaussian decoder NLL. Differentiable in ``model_output`` (fused backward kernel on the
    fused path). Outputs are float32 (float64 for float64 inputs).

    Args: model_output ``[B, 2C, ...]`` (prediction, then variance output); x0, x_t, noise ``[B, C, ...]``;
    t int64 ``[B]``; variance_type ``learned_range`` or ``learned``.
    """
    prediction_type = as_prediction_type(prediction_type)
    variance_type = as_variance_type(variance_type)
    if not variance_type.is_learned:
        raise ValueError(f"variance_type: the hybrid loss needs 'learned_range' or 'learned', got "
                         f"{variance_type.name.lower()!r}")
    V.check_float("x0", x0)
    V.check_channels("model_output", model_output, "x0", x0, learned=True)
    V.check_same("x_t", x_t, "x0", x0)
    V.check_same("noise", noise, "x0", x0)
    V.check_table("alphas_cumprod", alphas_cumprod, "x0", x0, min_length=2)
    V.check_timesteps("t", t, x0.shape[0], alphas_cumprod.numel(), "x0", x0, check_values=check_values)
    args = (model_output, x0, x_t, noise, t, alphas_cumprod, int(prediction_type), int(variance_type))
    if which_impl(x0, impl) == "fused":
        return torch.ops.diffcore.hybrid_loss(*args)
    return reference.hybrid_loss(*args)


def _register_fake_and_autograd() -> None:
    """Fake (meta) implementations and autograd for the C++ ops; only when the extension is loaded."""
    if _extension.load() is None:
        return

    def _like_kernel(x: torch.Tensor) -> torch.Tensor:
        fmt = reference.philox.kernel_memory_format(x)
        return torch.empty_like(x, memory_format=fmt)

    @torch.library.register_fake("diffcore::q_sample")
    def _(x0, noise, t, alphas_cumprod):
        return _like_kernel(x0)

    @torch.library.register_fake("diffcore::ddim_step")
    def _(x, model_output, t, t_prev, alphas_cumprod, eta, prediction_type, clip_denoised, noise, seed, offset):
        return _like_kernel(x), _like_kernel(x)

    @torch.library.register_fake("diffcore::ddpm_step")
    def _(x, model_output, t, alphas_cumprod, prediction_type, variance_type, clip_denoised, noise, seed, offset):
        return _like_kernel(x), _like_kernel(x)

    @torch.library.register_fake("diffcore::hybrid_loss")
    def _(model_output, x0, x_t, noise, t, alphas_cumprod, prediction_type, variance_type):
        dtype = reference.ops.compute_dtype(x0)
        return x0.new_empty((x0.shape[0],), dtype=dtype), x0.new_empty((x0.shape[0],), dtype=dtype)

    @torch.library.register_fake("diffcore::hybrid_loss_backward")
    def _(grad_mse, grad_vb, model_output, x0, x_t, noise, t, alphas_cumprod, prediction_type, variance_type):
        return _like_kernel(model_output)

    def _setup_context(ctx, inputs, output):
        model_output, x0, x_t, noise, t, alphas_cumprod, prediction_type, variance_type = inputs
        ctx.save_for_backward(model_output, x0, x_t, noise, t, alphas_cumprod)
        ctx.types = (prediction_type, variance_type)

    def _backward(ctx, grad_mse, grad_vb):
        model_output, x0, x_t, noise, t, alphas_cumprod = ctx.saved_tensors
        grad_mse = torch.zeros_like(grad_mse) if grad_mse is None else grad_mse.contiguous()
        grad_vb = torch.zeros_like(grad_vb) if grad_vb is None else grad_vb.contiguous()
        grad = torch.ops.diffcore.hybrid_loss_backward(grad_mse, grad_vb, model_output, x0, x_t, noise, t,
                                                       alphas_cumprod, *ctx.types)
        return grad, None, None, None, None, None, None, None

    torch.library.register_autograd("diffcore::hybrid_loss", _backward, setup_context=_setup_context)


_register_fake_and_autograd()
