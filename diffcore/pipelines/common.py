"""What the pipelines share: evaluation mode for the duration of a call, the model's device, and the check of a
device argument."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

__all__ = ["eval_mode", "model_device", "as_device"]


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Put an ``nn.Module`` in eval mode for the block and restore its training flag afterwards (any other
    callable is left alone)."""
    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def model_device(model: Any) -> torch.device:
    """The device of a module's first parameter or buffer; the CPU for other callables or a module without any."""
    if isinstance(model, torch.nn.Module):
        for tensor in list(model.parameters()) + list(model.buffers()):
            return tensor.device
    return torch.device("cpu")


def as_device(value: "torch.device | str", name: str = "device") -> torch.device:
    """``value`` as a torch.device this torch can use, or a ValueError naming ``name``: a string that is no device
    ("tpu"), CUDA where this torch sees none, a CUDA index past the visible devices, or another device type than
    cpu, cuda, mps and xpu."""
    if not isinstance(value, (str, torch.device)):
        raise TypeError(f"{name}: expected a torch device such as 'cpu' or 'cuda', got {type(value).__name__} "
                        f"{value!r}")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(f"{name}: expected a torch device such as cpu, cuda or cuda:1, got {value!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {value}: this torch ({torch.__version__}) sees no CUDA device; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{name} {value}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"{name}: expected cpu or cuda[:N], got {value!r}")
    return device
