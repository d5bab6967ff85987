"""Input checks shared by every op wrapper and every fake (meta) op: each error names the argument, what was
expected and what came.

Every check takes ``errors``, the policy that turns a failed condition into an exception: :func:`python_errors`
(the default, for the Python wrappers: ``ValueError`` / ``TypeError``) or :func:`torch_errors` (for the fake
implementations of ``torch.ops.diffcore``: ``RuntimeError`` through ``torch._check``, like ``TORCH_CHECK`` in the
C++ ops, and a deferred runtime assert where a condition is symbolic under ``torch.compile``). So the wrappers,
the fake implementations and the C++ ops check the same things with the same messages, written once here
(and once in ``csrc/ops.cpp``).
"""
from __future__ import annotations

import enum
import math
import numbers
import operator
from typing import Callable, Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
INT64_MAX = 2**63 - 1

#: ``errors(ok, kind, message)``: raise ``kind(message())`` (or the policy's own kind) unless ``ok``.
Errors = Callable[[bool, type, Callable[[], str]], None]


def python_errors(ok: bool, kind: type, message: Callable[[], str]) -> None:
    """The wrappers' policy: raise ``kind`` (ValueError or TypeError) with the message."""
    if not ok:
        raise kind(message())


def torch_errors(ok, kind: type, message: Callable[[], str]) -> None:
    """The fake ops' policy: ``torch._check`` (RuntimeError, as TORCH_CHECK raises in the real ops)."""
    torch._check(ok, message)


def check_float(name: str, tensor: torch.Tensor, *, errors: Errors = python_errors) -> None:
    """``tensor`` is a floating-point tensor (float32, float64, bfloat16, float16) with at least one dimension."""
    errors(isinstance(tensor, torch.Tensor), TypeError,
           lambda: f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    errors(tensor.dtype in FLOAT_DTYPES, TypeError,
           lambda: f"{name}: expected dtype float32, float64, bfloat16 or float16, got {tensor.dtype}")
    errors(tensor.dim() >= 1, ValueError, lambda: f"{name}: expected a tensor with a batch dimension, got a 0-d tensor")


def check_same(name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor, *,
               errors: Errors = python_errors) -> None:
    """``tensor`` must have ``ref``'s shape, dtype and device."""
    check_float(name, tensor, errors=errors)
    errors(tensor.shape == ref.shape, ValueError,
           lambda: f"{name}: expected shape {tuple(ref.shape)} (that of {ref_name}), got {tuple(tensor.shape)}")
    errors(tensor.dtype == ref.dtype, TypeError,
           lambda: f"{name}: expected dtype {ref.dtype} (that of {ref_name}), got {tensor.dtype}")
    check_device(name, tensor, ref_name, ref, errors=errors)


def check_device(name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor, *,
                 errors: Errors = python_errors) -> None:
    """``tensor`` sits on ``ref``'s device."""
    errors(tensor.device == ref.device, ValueError,
           lambda: f"{name}: expected a tensor on {ref.device} (where {ref_name} is), got one on {tensor.device}")


def check_table(name: str, table: torch.Tensor, ref_name: str, ref: torch.Tensor, min_length: int = 1, *,
                errors: Errors = python_errors) -> None:
    """``table`` is a 1-D float64 schedule table of at least ``min_length`` entries on ``ref``'s device."""
    def got() -> str:
        if isinstance(table, torch.Tensor):
            return f"{table.dtype} tensor of shape {tuple(table.shape)}"
        return type(table).__name__

    ok = isinstance(table, torch.Tensor) and table.dtype == torch.float64 and table.dim() == 1
    errors(ok, TypeError, lambda: f"{name}: expected a 1-D float64 schedule table, got {got()}")
    errors(table.numel() >= min_length, ValueError,
           lambda: f"{name}: expected at least {min_length} timesteps, got {table.numel()}")
    check_device(name, table, ref_name, ref, errors=errors)


def check_timestep_tensor(name: str, t: torch.Tensor, batch: int, ref_name: str, ref: torch.Tensor, *,
                          errors: Errors = python_errors) -> None:
    """``t`` is an int64 tensor ``[batch]`` on ``ref``'s device (its values are not read)."""
    def dtype_got() -> str:
        return str(t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__

    errors(isinstance(t, torch.Tensor) and t.dtype == torch.int64, TypeError,
           lambda: f"{name}: expected an int64 tensor of timesteps, got {dtype_got()}")
    errors(t.dim() == 1 and t.shape[0] == batch, ValueError,
           lambda: f"{name}: expected shape ({batch},) (one timestep per sample of {ref_name}), got {tuple(t.shape)}")
    check_device(name, t, ref_name, ref, errors=errors)


def check_timesteps(name: str, t: torch.Tensor, batch: int, num_timesteps: int, ref_name: str, ref: torch.Tensor,
                    allow_negative: bool = False, check_values: bool = True, *,
                    errors: Errors = python_errors) -> None:
    """``t`` must be int64 ``[batch]`` on ``ref``'s device with values in [0, T) (any value < T when
    ``allow_negative``: every negative ``t_prev`` means "the final step").

    Values are read only with ``check_values`` (on CUDA a read is a host-device sync, which samplers skip with
    ``check_values=False`` for timesteps they made themselves). Without it, CPU timesteps are still checked
    without a Python-level read (``torch._assert_async``, immediate on CPU, RuntimeError) so that the reference
    path raises where the fused CPU op does; on CUDA unchecked values out of range are clamped into range by the
    kernels and the reference alike, never read out of bounds. Meta tensors and ``torch.compile`` tracing have
    no values to check.
    """
    check_timestep_tensor(name, t, batch, ref_name, ref, errors=errors)
    if t.numel() == 0 or t.device.type == "meta" or torch.compiler.is_compiling():
        return
    allowed = f"< {num_timesteps}" if allow_negative else f"in [0, {num_timesteps})"
    if check_values:
        high, low = int(t.max()), int(t.min())
        ok = high < num_timesteps and (allow_negative or low >= 0)
        errors(ok, ValueError, lambda: f"{name}: expected timesteps {allowed}, got values in [{low}, {high}]")
    elif t.device.type == "cpu":
        inside = t < num_timesteps if allow_negative else (t >= 0) & (t < num_timesteps)
        torch._assert_async(inside.all(), f"{name}: expected timesteps {allowed}, got values outside that range "
                                          f"(not read back: check_values=False)")


def check_channels(name: str, model_output: torch.Tensor, x_name: str, x: torch.Tensor, learned: bool, *,
                   errors: Errors = python_errors) -> None:
    """model_output must be shaped like x, with 2C channels along dim 1 when the variance is learned."""
    check_float(name, model_output, errors=errors)
    errors(x.dim() >= 2 or not learned, ValueError,
           lambda: f"{x_name}: a learned variance needs a channel dimension (dim 1), got shape {tuple(x.shape)}")
    expected = list(x.shape)
    if learned:
        expected[1] *= 2
    what = "2C channels: the prediction then the variance output" if learned else f"the shape of {x_name}"
    errors(list(model_output.shape) == expected, ValueError,
           lambda: f"{name}: expected shape {tuple(expected)} ({what}), got {tuple(model_output.shape)}")
    errors(model_output.dtype == x.dtype, TypeError,
           lambda: f"{name}: expected dtype {x.dtype} (that of {x_name}), got {model_output.dtype}")
    check_device(name, model_output, x_name, x, errors=errors)


def check_enum(name: str, value: int, enum_cls: type[enum.IntEnum], *, errors: Errors = python_errors) -> None:
    """``value`` is the integer of a member of ``enum_cls`` (the form the op schemas take)."""
    choices = [f"{int(m)} ({m.name.lower()})" for m in enum_cls]
    listed = ", ".join(choices[:-1]) + " or " + choices[-1]
    ok = isinstance(value, int) and not isinstance(value, bool) and value in {int(m) for m in enum_cls}
    errors(ok, ValueError, lambda: f"{name}: expected {listed}, got {value!r}")


def check_eta(eta: float, *, finite: bool = True, errors: Errors = python_errors) -> float:
    """``eta`` is a real number >= 0 (and finite, for the wrappers); returns it as a float."""
    errors(isinstance(eta, numbers.Real), TypeError,
           lambda: f"eta: expected a float >= 0, got {type(eta).__name__} {eta!r}")
    value = float(eta)
    errors(value >= 0.0 and (math.isfinite(value) or not finite), ValueError,
           lambda: f"eta: expected a float >= 0{' and finite' if finite else ''}, got {eta!r}")
    return value


def check_flag(name: str, value: bool, *, errors: Errors = python_errors) -> bool:
    """``value`` is a bool (or the int 0 / 1); returns it as a bool."""
    errors(isinstance(value, (bool, int)) and value in (0, 1), TypeError,
           lambda: f"{name}: expected a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def check_int64(name: str, value: Optional[int], *, errors: Errors = python_errors) -> int:
    """``value`` is an int in [0, 2**63) (a non-negative int64: a Philox seed or counter offset); returns it."""
    try:
        index = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        index = None
    errors(index is not None, TypeError, lambda: f"{name}: expected an int in [0, 2**63), got {type(value).__name__} "
                                                 f"{value!r}")
    errors(0 <= index <= INT64_MAX, ValueError, lambda: f"{name}: expected an int in [0, 2**63), got {value}")
    return index
