"""What the pipelines share: evaluation mode for the duration of a call and the model's device."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

__all__ = ["eval_mode", "model_device"]


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
