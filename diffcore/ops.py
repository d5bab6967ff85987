"""The fused diffusion ops: typed wrappers that pick the fused kernel or the pure-torch reference per call.

:func:`group_norm_act` is the U-Net's GroupNorm + scale-shift + SiLU; every other op takes per-sample timesteps
``t`` (int64 ``[B]``) and the schedule table ``alphas_cumprod`` (float64 ``[T]``, on the tensors' device);
coefficients are gathered inside the kernel. Inputs may be float32, float64,
bfloat16 or float16 (arithmetic in float32, float64 stays float64), any batch size including 0, any trailing
shape, contiguous or not (channels_last included). ``impl`` chooses the path: ``"auto"`` (fused when built for
the device, else reference), ``"fused"`` (error if not built) or ``"reference"``. :func:`which_impl` tells
which path a call takes.

Noise for the steps is either passed in (``noise``) or drawn inside the kernel from Philox4x32-10 keyed by
``seed`` at counter ``offset``; the same ``(seed, offset)`` gives the same noise on CPU, CUDA and the
reference (up to float rounding of the Box-Muller transform). Row b of x draws the noise of image
``first_row + b`` of the seed (``first_row`` defaults to 0; ``first_row + B <= 2**32``), so a batch split into
chunks, each called with ``first_row`` = its first row's index, draws the same noise as the whole batch. With
neither given, a seed is drawn from ``generator`` (or torch's default CPU generator), which needs no device sync.

Every argument is checked before anything runs, and an error names the argument, what was expected and what
came. ``check_values=False`` skips reading the timestep values back (a device sync on CUDA): on CPU they are
still checked, without a Python-level read, so both paths raise; on CUDA unchecked out-of-range timesteps are
clamped into range by the kernels and the reference alike. ``torch.ops.diffcore.*`` called directly checks the same in C++, and its fake (meta)
implementations check the same again (devices, shapes, dtypes, enums) for FakeTensor / torch.compile tracing.

Gradients: q_sample, ddim_step, ddpm_step and group_norm_act are differentiable in every tensor input on both paths (the fused
backward is the reference's, see :mod:`diffcore.reference.autograd`); hybrid_loss differentiates model_output
only and raises if a backward pass reaches x0, x_t, noise or alphas_cumprod.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import torch

from . import extension
from . import checks as V
from . import reference
from .reference.philox import check_first_row
from .types import PredictionType, VarianceType, as_prediction_type, as_variance_type

Impl = Literal["auto", "fused", "reference"]

__all__ = ["q_sample", "ddim_step", "ddpm_step", "hybrid_loss", "group_norm_act", "which_impl", "fused_available", "check_seed",
           "check_first_row", "Impl"]


def fused_available(device: "torch.device | str" = "cpu") -> bool:
    """True when the fused kernels are built for ``device``'s type."""
    return extension.has_fused_kernels(device)


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
            reason = extension.load_error() or f"it was built without kernels for {torch.device(device).type}"
            raise RuntimeError(f"impl='fused': the diffcore extension is not available ({reason}); "
                               f"{extension.BUILD_HINT}")
        return "fused"
    if impl != "auto":
        raise ValueError(f"impl: expected 'auto', 'fused' or 'reference', got {impl!r}")
    return "fused" if available else "reference"


def check_seed(seed: int) -> int:
    """``seed`` as the ops take it: an int in [0, 2**63) (the error names the argument)."""
    return V.check_int64("seed", seed)


def _seed_and_offset(noise, seed, offset, generator, draws: bool = True) -> tuple[int, int]:
    """The (seed, offset) handed to the op, both checked even when unused; (0, 0) when noise is given or the step
    draws none (``draws=False``: DDIM with eta = 0)."""
    offset = V.check_int64("offset", offset)
    if seed is not None:
        seed = V.check_int64("seed", seed)
    if noise is not None or not draws:
        return 0, 0
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return seed, offset


def _dispatch_validated(name: str, x: torch.Tensor, impl: Impl, args: tuple):
    """Call op ``name`` on the fused path when it is built for x's device (or ``impl="fused"``), else on the
    reference, with arguments a sampling loop already checked."""
    fused = impl == "fused" or (impl == "auto" and fused_available(x.device))
    return getattr(torch.ops.diffcore if fused else reference, name)(*args)


def _check_noise(noise, x):
    if noise is not None:
        V.check_same("noise", noise, "x", x)


def q_sample(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, *,
             impl: Impl = "auto", check_values: bool = True, validated: bool = False) -> torch.Tensor:
    """Forward noising q(x_t | x0): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.

    Args: x0, noise ``[B, ...]``; t int64 ``[B]``; alphas_cumprod float64 ``[T]``. Returns x_t like x0.
    ``validated=True`` skips the Python checks (see :func:`ddim_step`).
    """
    if validated:
        fused = impl == "fused" or (impl == "auto" and fused_available(x0.device))
        return (torch.ops.diffcore.q_sample if fused else reference.q_sample)(x0, noise, t, alphas_cumprod)
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
              first_row: int = 0, generator: Optional[torch.Generator] = None, impl: Impl = "auto",
              check_values: bool = True, validated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized DDIM update (DDIM eq. 12) from t to t_prev, per sample; returns (x_prev, pred_x0).

    sigma = eta sqrt((1 - abar_s)/(1 - abar_t)) sqrt(1 - abar_t / abar_s);
    x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z.
    t_prev < 0 is the final step (abar_s = 1); t_prev > t is the deterministic reverse (inversion) step,
    where sigma is 0. With ``clip_denoised`` x0_hat is clamped to [-1, 1] and eps_hat re-derived from it.

    Args: x ``[B, ...]``; model_output like x (eps, x0 or v per ``prediction_type``); t, t_prev int64 ``[B]``;
    eta >= 0. ``noise`` like x, or None: Philox noise of (``seed``, ``offset``), row b being image
    ``first_row + b`` of the seed (an int, 0 <= first_row <= 2**32 - B). Returns two tensors like x.

    ``validated=True`` is for sampling loops that checked their arguments once before the loop (the samplers
    do): it skips every Python-level check and reads nothing back; ``prediction_type`` must then be a
    :class:`PredictionType`, ``seed`` an int when ``noise`` is None and ``eta > 0``, and ``impl`` "auto" or a path
    known to exist. The C++ op still checks devices, shapes and dtypes.
    """
    if validated:
        args = (x, model_output, t, t_prev, alphas_cumprod, float(eta), int(prediction_type), bool(clip_denoised),
                noise, 0 if seed is None else seed, offset, first_row)
        return _dispatch_validated("ddim_step", x, impl, args)
    eta = V.check_eta(eta)
    clip_denoised = V.check_flag("clip_denoised", clip_denoised)
    prediction_type = as_prediction_type(prediction_type)
    V.check_float("x", x)
    V.check_channels("model_output", model_output, "x", x, learned=False)
    V.check_table("alphas_cumprod", alphas_cumprod, "x", x)
    T = alphas_cumprod.numel()
    V.check_timesteps("t", t, x.shape[0], T, "x", x, check_values=check_values)
    V.check_timesteps("t_prev", t_prev, x.shape[0], T, "x", x, allow_negative=True, check_values=check_values)
    _check_noise(noise, x)
    first_row = check_first_row(first_row, x.shape[0])
    seed, offset = _seed_and_offset(noise, seed, offset, generator, draws=eta > 0)
    args = (x, model_output, t, t_prev, alphas_cumprod, eta, int(prediction_type), clip_denoised,
            noise, seed, offset, first_row)
    if which_impl(x, impl) == "fused":
        return torch.ops.diffcore.ddim_step(*args)
    return reference.ddim_step(*args)


def ddpm_step(x: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, *,
              prediction_type: "PredictionType | str" = PredictionType.EPS,
              variance_type: "VarianceType | str" = VarianceType.FIXED_SMALL, clip_denoised: bool = False,
              noise: Optional[torch.Tensor] = None, seed: Optional[int] = None, offset: int = 0,
              first_row: int = 0, generator: Optional[torch.Generator] = None, impl: Impl = "auto",
              check_values: bool = True, validated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral step x_{t-1} = mu~(x0_hat, x_t) + [t > 0] exp(0.5 log sigma^2) z; returns (x_prev, pred_x0).

    Args: x ``[B, C, ...]``; model_output ``[B, C, ...]`` for fixed variances or ``[B, 2C, ...]`` (prediction,
    then variance output v) for ``learned_range`` / ``learned``; t int64 ``[B]``; alphas_cumprod float64 ``[T]``
    with T >= 2; ``noise``, ``seed``, ``offset``, ``first_row`` as in :func:`ddim_step`. ``validated=True``: as in
    :func:`ddim_step` (``variance_type`` a :class:`VarianceType`, ``seed`` an int when ``noise`` is None).
    """
    if validated:
        args = (x, model_output, t, alphas_cumprod, int(prediction_type), int(variance_type), bool(clip_denoised),
                noise, 0 if seed is None else seed, offset, first_row)
        return _dispatch_validated("ddpm_step", x, impl, args)
    prediction_type = as_prediction_type(prediction_type)
    variance_type = as_variance_type(variance_type)
    clip_denoised = V.check_flag("clip_denoised", clip_denoised)
    V.check_float("x", x)
    V.check_channels("model_output", model_output, "x", x, learned=variance_type.is_learned)
    V.check_table("alphas_cumprod", alphas_cumprod, "x", x, min_length=2)
    V.check_timesteps("t", t, x.shape[0], alphas_cumprod.numel(), "x", x, check_values=check_values)
    _check_noise(noise, x)
    first_row = check_first_row(first_row, x.shape[0])
    seed, offset = _seed_and_offset(noise, seed, offset, generator)
    args = (x, model_output, t, alphas_cumprod, int(prediction_type), int(variance_type), clip_denoised,
            noise, seed, offset, first_row)
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
    if which_impl(x0, impl) == "fused":
        return torch.ops.diffcore.hybrid_loss(model_output, x0, x_t, noise, t, alphas_cumprod, int(prediction_type),
                                              int(variance_type))
    x0, x_t, noise, alphas_cumprod = (reference.autograd.refuse_gradient(v, HYBRID_LOSS_GRADIENTS)
                                      for v in (x0, x_t, noise, alphas_cumprod))
    return reference.hybrid_loss(model_output, x0, x_t, noise, t, alphas_cumprod, int(prediction_type),
                                 int(variance_type))


def group_norm_act(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], num_groups: int,
                   *, eps: float = 1e-5, scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None,
                   silu: bool = False, impl: Impl = "auto") -> torch.Tensor:
    """GroupNorm, then the optional per-sample scale-shift and SiLU, in two passes over memory.

    y = (x - mean_bg) / sqrt(var_bg + eps) * weight[c] + bias[c] (mean and biased variance over the C / num_groups
    channels of group g and every spatial position of image b, as ``torch.nn.functional.group_norm``);
    y = y * (1 + scale[b, c]) + shift[b, c] when given; y = y * sigmoid(y) when ``silu``.

    Args: x ``[B, C, *spatial]`` (float32, float64, bfloat16, float16; contiguous or channels_last, other strides
    are made contiguous first); weight, bias ``[C]`` or None; num_groups a positive divisor of C; eps a finite
    float > 0; scale, shift ``[B, C]`` or None. weight, bias, scale and shift are float32 or x's dtype.
    Returns y like x (its dtype; channels_last for a channels_last 4-D x, else contiguous). Statistics and
    arithmetic in float32 (float64 for float64 x). Differentiable in x, weight, bias, scale and shift.
    """
    silu = V.check_flag("silu", silu)
    eps = check_group_norm_args(x, weight, bias, num_groups, eps, scale, shift)
    fn = torch.ops.diffcore.group_norm_act if which_impl(x, impl) == "fused" else reference.group_norm_act
    return fn(x, weight, bias, num_groups, eps, scale, shift, silu)


def check_group_norm_args(x, weight, bias, num_groups, eps, scale, shift, *,
                          errors: V.Errors = V.python_errors) -> float:
    """What ``group_norm_act`` (and the C++ op) checks; returns eps as a float."""
    V.check_float("x", x, errors=errors)
    errors(x.dim() >= 2, ValueError,
           lambda: f"x: expected a tensor [B, C, *spatial] with at least 2 dimensions, got shape {tuple(x.shape)}")
    channels = x.shape[1]
    errors(isinstance(num_groups, int) and not isinstance(num_groups, bool), TypeError,
           lambda: f"num_groups: expected an int, got {type(num_groups).__name__}")
    errors(num_groups >= 1 and channels % num_groups == 0, ValueError,
           lambda: f"num_groups: expected a positive divisor of the {channels} channels of x, got {num_groups}")
    errors(isinstance(eps, (int, float)) and not isinstance(eps, bool), TypeError,
           lambda: f"eps: expected a float, got {type(eps).__name__}")
    errors(eps > 0 and math.isfinite(eps), ValueError, lambda: f"eps: expected a finite float > 0, got {eps}")
    for name, param, shape, text in (("weight", weight, (channels,), "[C], C = x.shape[1]"),
                                     ("bias", bias, (channels,), "[C], C = x.shape[1]"),
                                     ("scale", scale, (x.shape[0], channels), "[B, C] of x"),
                                     ("shift", shift, (x.shape[0], channels), "[B, C] of x")):
        if param is None:
            continue
        errors(isinstance(param, torch.Tensor), TypeError,
               lambda: f"{name}: expected a torch.Tensor or None, got {type(param).__name__}")
        errors(param.dtype in (torch.float32, x.dtype), TypeError,
               lambda: f"{name}: expected dtype float32 or {x.dtype} (that of x), got {param.dtype}")
        errors(tuple(param.shape) == shape, ValueError,
               lambda: f"{name}: expected shape {shape} ({text}), got {tuple(param.shape)}")
        V.check_device(name, param, "x", x, errors=errors)
    return float(eps)


# ---------------------------------------------------------------- fake implementations and autograd

HYBRID_LOSS_GRADIENTS = (
    "hybrid_loss: x0, x_t, noise and alphas_cumprod get no gradient, by design (they are data, and vb's mean is "
    "computed with its gradient stopped); only model_output is differentiated. Detach them (or leave "
    "requires_grad off)")


def _check_image_op(x, model_output, t, alphas_cumprod, prediction_type, *, x_name="x", learned=False,
                    min_length=1):
    """What the C++ host functions check before any kernel runs, as torch._check (for the fake ops)."""
    errors = V.torch_errors
    V.check_float(x_name, x, errors=errors)
    V.check_enum("prediction_type", prediction_type, PredictionType, errors=errors)
    V.check_channels("model_output", model_output, x_name, x, learned=learned, errors=errors)
    V.check_table("alphas_cumprod", alphas_cumprod, x_name, x, min_length, errors=errors)
    V.check_timestep_tensor("t", t, x.shape[0], x_name, x, errors=errors)


def _check_step_noise(noise, x, seed, offset, first_row):
    check_first_row(first_row, x.shape[0], errors=V.torch_errors)
    if noise is not None:
        V.check_same("noise", noise, "x", x, errors=V.torch_errors)
    else:
        V.check_int64("seed", seed, errors=V.torch_errors)
        V.check_int64("offset", offset, errors=V.torch_errors)


def _like_kernel(x: torch.Tensor) -> torch.Tensor:
    """An output like the kernels allocate it: x's shape, dtype and device, in x's kernel memory format."""
    return torch.empty_like(x, memory_format=reference.philox.kernel_memory_format(x))


def _fake_q_sample(x0, noise, t, alphas_cumprod):
    errors = V.torch_errors
    V.check_float("x0", x0, errors=errors)
    V.check_same("noise", noise, "x0", x0, errors=errors)
    V.check_table("alphas_cumprod", alphas_cumprod, "x0", x0, errors=errors)
    V.check_timestep_tensor("t", t, x0.shape[0], "x0", x0, errors=errors)
    return _like_kernel(x0)


def _fake_ddim_step(x, model_output, t, t_prev, alphas_cumprod, eta, prediction_type, clip_denoised, noise, seed,
                    offset, first_row=0):
    _check_image_op(x, model_output, t, alphas_cumprod, prediction_type)
    V.check_timestep_tensor("t_prev", t_prev, x.shape[0], "x", x, errors=V.torch_errors)
    V.check_eta(eta, finite=False, errors=V.torch_errors)
    _check_step_noise(noise, x, seed, offset, first_row)
    return _like_kernel(x), _like_kernel(x)


def _fake_ddpm_step(x, model_output, t, alphas_cumprod, prediction_type, variance_type, clip_denoised, noise, seed,
                    offset, first_row=0):
    V.check_enum("variance_type", variance_type, VarianceType, errors=V.torch_errors)
    _check_image_op(x, model_output, t, alphas_cumprod, prediction_type,
                    learned=VarianceType(variance_type).is_learned, min_length=2)
    _check_step_noise(noise, x, seed, offset, first_row)
    return _like_kernel(x), _like_kernel(x)


def _check_hybrid(model_output, x0, x_t, noise, t, alphas_cumprod, prediction_type, variance_type):
    errors = V.torch_errors
    V.check_enum("variance_type", variance_type, VarianceType, errors=errors)
    errors(VarianceType(variance_type).is_learned, ValueError,
           lambda: f"variance_type: the hybrid loss needs 2 (learned_range) or 3 (learned), got {variance_type}")
    _check_image_op(x0, model_output, t, alphas_cumprod, prediction_type, x_name="x0", learned=True, min_length=2)
    V.check_same("x_t", x_t, "x0", x0, errors=errors)
    V.check_same("noise", noise, "x0", x0, errors=errors)


def _fake_hybrid_loss(model_output, x0, x_t, noise, t, alphas_cumprod, prediction_type, variance_type):
    _check_hybrid(model_output, x0, x_t, noise, t, alphas_cumprod, prediction_type, variance_type)
    dtype = reference.ops.compute_dtype(x0)
    return x0.new_empty((x0.shape[0],), dtype=dtype), x0.new_empty((x0.shape[0],), dtype=dtype)


def _fake_hybrid_loss_backward(grad_mse, grad_vb, model_output, x0, x_t, noise, t, alphas_cumprod, prediction_type,
                               variance_type):
    _check_hybrid(model_output, x0, x_t, noise, t, alphas_cumprod, prediction_type, variance_type)
    for name, grad in (("grad_mse", grad_mse), ("grad_vb", grad_vb)):
        V.torch_errors(grad.dim() == 1 and grad.shape[0] == x0.shape[0], ValueError,
                       lambda: f"{name}: expected shape ({x0.shape[0]},), got {tuple(grad.shape)}")
        V.check_device(name, grad, "x0", x0, errors=V.torch_errors)
    return _like_kernel(model_output)


def _fake_group_norm_act(x, weight, bias, num_groups, eps, scale, shift, silu):
    check_group_norm_args(x, weight, bias, num_groups, eps, scale, shift, errors=V.torch_errors)
    return _like_kernel(x)


def _save_inputs(ctx, inputs, output) -> None:
    """setup_context of the reference-backed backward: keep every input (tensors saved, the rest on ctx)."""
    ctx.save_for_backward(*(a if isinstance(a, torch.Tensor) else None for a in inputs))
    ctx.non_tensors = [None if isinstance(a, torch.Tensor) else a for a in inputs]


def _skip_noise_draw(name: str, inputs: list, needs: tuple) -> list:
    """In-kernel noise (noise=None) enters x_prev as sigma z, so the gradients with respect to x and a fixed-variance
    prediction do not depend on z: then the backward passes zeros instead of redrawing z with the pure-torch
    Philox (10x the cost of the step). z is redrawn when the table or a learned variance is differentiated."""
    if name == "ddim_step":  # (x, model_output, t, t_prev, alphas_cumprod, eta, prediction_type, clip, noise, ...)
        noise_at, needs_z = 8, needs[4]
    else:  # ddpm_step: (x, model_output, t, alphas_cumprod, prediction_type, variance_type, clip, noise, ...)
        noise_at, needs_z = 7, needs[3] or (needs[1] and VarianceType(inputs[5]).is_learned)
    if inputs[noise_at] is None and not needs_z:
        inputs[noise_at] = torch.zeros_like(inputs[0])
    return inputs


def _reference_backward(name: str):
    """The backward of a fused op: the vector-Jacobian product of its reference twin (one copy of the formulas)."""
    reference_fn = getattr(reference, name)

    def backward(ctx, *grad_outputs):
        inputs = [s if s is not None else o for s, o in zip(ctx.saved_tensors, ctx.non_tensors)]
        if name in ("ddim_step", "ddpm_step"):
            inputs = _skip_noise_draw(name, inputs, ctx.needs_input_grad)
        return reference.autograd.reference_vjp(reference_fn, inputs, ctx.needs_input_grad, grad_outputs)
    return backward


def _hybrid_setup_context(ctx, inputs, output):
    model_output, x0, x_t, noise, t, alphas_cumprod, prediction_type, variance_type = inputs
    ctx.save_for_backward(model_output, x0, x_t, noise, t, alphas_cumprod)
    ctx.types = (prediction_type, variance_type)


def _hybrid_backward(ctx, grad_mse, grad_vb):
    if any(ctx.needs_input_grad[1:4]) or ctx.needs_input_grad[5]:
        raise RuntimeError(HYBRID_LOSS_GRADIENTS)
    model_output, x0, x_t, noise, t, alphas_cumprod = ctx.saved_tensors
    grad_mse = torch.zeros_like(grad_mse) if grad_mse is None else grad_mse.contiguous()
    grad_vb = torch.zeros_like(grad_vb) if grad_vb is None else grad_vb.contiguous()
    grad = torch.ops.diffcore.hybrid_loss_backward(grad_mse, grad_vb, model_output, x0, x_t, noise, t,
                                                   alphas_cumprod, *ctx.types)
    return grad, None, None, None, None, None, None, None


def _register_fake_and_autograd() -> None:
    """Fake (meta) implementations and autograd for the C++ ops; only when the extension is loaded.

    The fake ones check what the C++ ops check (devices, shapes, dtypes, enum values; not timestep values, which
    a fake tensor does not have) through the same functions as the wrappers. The backward of q_sample,
    ddim_step, ddpm_step and group_norm_act is that of the reference (``diffcore.reference.autograd``); hybrid_loss has a fused
    backward kernel for model_output and refuses to differentiate the rest.
    """
    if extension.load() is None:
        return
    fakes = {"q_sample": _fake_q_sample, "ddim_step": _fake_ddim_step, "ddpm_step": _fake_ddpm_step,
             "hybrid_loss": _fake_hybrid_loss, "hybrid_loss_backward": _fake_hybrid_loss_backward,
             "group_norm_act": _fake_group_norm_act}
    for name, fake in fakes.items():
        torch.library.register_fake(f"diffcore::{name}", fake)
    for name in ("q_sample", "ddim_step", "ddpm_step", "group_norm_act"):
        torch.library.register_autograd(f"diffcore::{name}", _reference_backward(name),
                                        setup_context=_save_inputs)
    torch.library.register_autograd("diffcore::hybrid_loss", _hybrid_backward, setup_context=_hybrid_setup_context)


_register_fake_and_autograd()


# ---------------------------------------------------------------- attention_qkv

__all__ += ["attention_qkv", "check_attention_args"]


def attention_qkv(qkv: torch.Tensor, num_heads: int, *, impl: Impl = "auto") -> torch.Tensor:
    """Multi-head softmax attention from packed q|k|v features (the U-Net's AttentionBlock), in one pass.

    ``out[b, i, h*d + c] = sum_j softmax_j(q_bhi . k_bhj / sqrt(d)) v_bhj[c]``, the softmax over the T keys (no
    mask), with d = C / num_heads.

    Args: qkv ``[B, T, 3 * C]`` (float32, float64, bfloat16, float16; any strides with the last dimension dense,
    else it is made contiguous first), features ordered (q | k | v, head, channel): q of head h is
    ``qkv[..., h*d:(h+1)*d]``, k at ``C + h*d``, v at ``2*C + h*d``; num_heads an int >= 1 dividing C.
    Returns ``[B, T, C]`` contiguous in qkv's dtype; arithmetic in float32 (float64 for float64), one rounding at
    the end. Differentiable in qkv (the backward is the reference's).
    """
    check_attention_args(qkv, num_heads)
    fn = torch.ops.diffcore.attention_qkv if which_impl(qkv, impl) == "fused" else reference.attention_qkv
    return fn(qkv, num_heads)


def check_attention_args(qkv, num_heads, *, errors: V.Errors = V.python_errors) -> None:
    """What ``attention_qkv`` (and the C++ op) checks."""
    V.check_float("qkv", qkv, errors=errors)
    errors(qkv.dim() == 3, ValueError,
           lambda: f"qkv: expected a tensor [B, T, 3 * C] with 3 dimensions, got shape {tuple(qkv.shape)}")
    errors(isinstance(num_heads, int) and not isinstance(num_heads, bool), TypeError,
           lambda: f"num_heads: expected an int, got {type(num_heads).__name__}")
    errors(num_heads >= 1, ValueError, lambda: f"num_heads: expected an int >= 1, got {num_heads}")
    features = qkv.shape[2]
    errors(features > 0 and features % (3 * num_heads) == 0, ValueError,
           lambda: f"qkv: expected a last dimension 3 * C with C >= 1 a multiple of num_heads = {num_heads}, "
                   f"got {features}")


def _fake_attention_qkv(qkv, num_heads):
    check_attention_args(qkv, num_heads, errors=V.torch_errors)
    return qkv.new_empty((qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3))


def _register_attention() -> None:
    """Fake implementation and autograd (the reference's backward) of ``diffcore::attention_qkv``."""
    if extension.load() is None or not hasattr(torch.ops.diffcore, "attention_qkv"):
        return
    torch.library.register_fake("diffcore::attention_qkv", _fake_attention_qkv)
    torch.library.register_autograd("diffcore::attention_qkv", _reference_backward("attention_qkv"),
                                    setup_context=_save_inputs)


_register_attention()
