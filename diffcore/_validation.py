"""Input checks shared by every op wrapper: each error names the argument, what was expected and what came."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_float(name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32, float64, bfloat16 or float16, got {tensor.dtype}")
    if tensor.dim() < 1:
        raise ValueError(f"{name}: expected a tensor with a batch dimension, got a 0-d tensor")


def check_same(name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``tensor`` must have ``ref``'s shape, dtype and device."""
    check_float(name, tensor)
    if tensor.shape != ref.shape:
        raise ValueError(f"{name}: expected shape {tuple(ref.shape)} (that of {ref_name}), got {tuple(tensor.shape)}")
    if tensor.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (that of {ref_name}), got {tensor.dtype}")
    check_device(name, tensor, ref_name, ref)


def check_device(name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if tensor.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref.device} (where {ref_name} is), got one on {tensor.device}")


def check_table(name: str, table: torch.Tensor, ref_name: str, ref: torch.Tensor, min_length: int = 1) -> None:
    if not isinstance(table, torch.Tensor) or table.dtype != torch.float64 or table.dim() != 1:
        got = f"{table.dtype} tensor of shape {tuple(table.shape)}" if isinstance(table, torch.Tensor) else type(table)
        raise TypeError(f"{name}: expected a 1-D float64 schedule table, got {got}")
    if table.numel() < min_length:
        raise ValueError(f"{name}: expected at least {min_length} timesteps, got {table.numel()}")
    check_device(name, table, ref_name, ref)


def check_timesteps(name: str, t: torch.Tensor, batch: int, num_timesteps: int, ref_name: str, ref: torch.Tensor,
                    allow_negative: bool = False, check_values: bool = True) -> None:
    """``t`` must be int64 ``[batch]`` with values in [0, T) (or < 0 too when ``allow_negative``).

    Value checks read the tensor: on CUDA that is a host-device sync, which samplers skip with
    ``check_values=False`` for timesteps they made themselves.
    """
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name}: expected an int64 tensor of timesteps, got {got}")
    if t.shape != (batch,):
        raise ValueError(f"{name}: expected shape ({batch},) (one timestep per sample of {ref_name}), "
                         f"got {tuple(t.shape)}")
    check_device(name, t, ref_name, ref)
    if check_values and t.numel() > 0 and not torch.compiler.is_compiling():
        high = int(t.max())
        low = int(t.min())
        lowest = -(2**62) if allow_negative else 0
        if high >= num_timesteps or low < lowest:
            allowed = f"< {num_timesteps}" if allow_negative else f"in [0, {num_timesteps})"
            raise ValueError(f"{name}: expected timesteps {allowed}, got values in [{low}, {high}]")


def check_channels(name: str, model_output: torch.Tensor, x_name: str, x: torch.Tensor, learned: bool) -> None:
    """model_output must be shaped like x, with 2C channels along dim 1 when the variance is learned."""
    check_float(name, model_output)
    if x.dim() < 2 and learned:
        raise ValueError(f"{x_name}: a learned variance needs a channel dimension (dim 1), got shape {tuple(x.shape)}")
    expected = list(x.shape)
    if learned:
        expected[1] *= 2
    if list(model_output.shape) != expected:
        what = "2C channels: the prediction then the variance output" if learned else f"the shape of {x_name}"
        raise ValueError(f"{name}: expected shape {tuple(expected)} ({what}), got {tuple(model_output.shape)}")
    if model_output.dtype != x.dtype:
        raise TypeError(f"{name}: expected dtype {x.dtype} (that of {x_name}), got {model_output.dtype}")
    check_device(name, model_output, x_name, x)
