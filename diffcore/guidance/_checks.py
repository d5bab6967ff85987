"""Checks and small helpers shared by the guidance wrappers: guidance scales, class labels, and per-device copies
made once (never inside a loop). A wrapped model's output is unwrapped and split by
:func:`diffcore.diffusion.model_output_tensor` and :func:`diffcore.diffusion.split_model_output`, the samplers'
own."""
from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch

from ..reference import formulas

#: a guidance scale: one float for the whole batch, or a float tensor ``[B]`` (one per sample)
Scale = Union[float, torch.Tensor]

__all__ = ["Scale", "check_scale", "check_labels", "labels_of_call", "take_labels", "DeviceCache", "scale_like"]


def check_scale(scale: Scale, name: str = "scale") -> Scale:
    """``scale`` checked: a finite float >= 0, or a 1-D floating tensor of finite values >= 0 (read once here).

    Returns a Python float or a float64 CPU tensor ``[B]``.
    """
    if isinstance(scale, torch.Tensor):
        if scale.dim() != 1 or not scale.is_floating_point():
            raise ValueError(f"{name}: expected a float >= 0 or a 1-D float tensor [B] of them, got a {scale.dtype} "
                             f"tensor of shape {tuple(scale.shape)}")
        values = scale.detach().to("cpu", torch.float64)
        if values.numel() and not bool((torch.isfinite(values) & (values >= 0)).all()):
            raise ValueError(f"{name}: expected finite values >= 0, got values in "
                             f"[{float(values.min())}, {float(values.max())}]")
        return values
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{name}: expected a float >= 0 or a 1-D float tensor [B], got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale >= 0.0):
        raise ValueError(f"{name}: expected a finite float >= 0, got {scale!r}")
    return float(scale)


def check_labels(y: torch.Tensor, name: str = "y", *, high: Optional[int] = None,
                 what: str = "") -> tuple[torch.Tensor, int]:
    """``y`` checked: an int64 tensor ``[B]`` with values >= 0 (and <= ``high`` when given).

    Reads the values once (one host-device sync on an accelerator, at construction, not in a loop).
    Returns ``(y, max value)`` (max is -1 for an empty y).
    """
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64:
        got = y.dtype if isinstance(y, torch.Tensor) else type(y).__name__
        raise TypeError(f"{name}: expected an int64 tensor [B] of class labels, got {got}")
    if y.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor [B] of class labels, got shape {tuple(y.shape)}")
    if y.numel() == 0:
        return y, -1
    low, top = int(y.min()), int(y.max())
    if low < 0 or (high is not None and top > high):
        allowed = f"[0, {high}]" if high is not None else ">= 0"
        raise ValueError(f"{name}: expected labels in {allowed}{what}, got values in [{low}, {top}]")
    return y, top


class DeviceCache:
    """A tensor and its copies on other devices / dtypes, each made once on first use."""

    def __init__(self, tensor: torch.Tensor):
        self._copies = {(tensor.device, tensor.dtype): tensor}
        self._source = tensor

    def get(self, device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        key = (device, dtype or self._source.dtype)
        if key not in self._copies:
            self._copies[key] = self._source.to(device=device, dtype=key[1])
        return self._copies[key]


def scale_like(scale: Scale, cache: Optional[DeviceCache], like: torch.Tensor, name: str = "scale"
               ) -> "float | torch.Tensor":
    """The scale ready to broadcast against ``like`` ``[B, ...]``: the float itself, or the per-sample tensor
    as ``[B, 1, ..., 1]`` in like's dtype and device (its length is checked against B: shapes only, no sync)."""
    if cache is None:
        return scale
    values = cache.get(like.device, like.dtype)
    if values.shape[0] != like.shape[0]:
        raise ValueError(f"{name}: expected {like.shape[0]} per-sample scales (one per sample of x), "
                         f"got {values.shape[0]}")
    return formulas.per_sample(values, like)


def labels_of_call(y: Any, batch: int, name: str, *, high: Optional[int] = None, what: str = "") -> torch.Tensor:
    """The labels a wrapper built with ``y=None`` takes per call from ``model_kwargs[name]``, checked: an int64
    tensor ``[batch]``, with values in ``[0, high]`` checked when it lies on the CPU (reading an accelerator's
    values would be a host-device sync at every step; the CLI checks its labels once, up front)."""
    if y is None:
        raise ValueError(f"model_kwargs: expected the labels as {name}= (an int64 tensor [{batch}]: the guidance "
                         f"wrapper was built with y=None), got none")
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.shape != (batch,):
        got = f"{y.dtype} tensor of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"model_kwargs[{name!r}]: expected int64 labels [{batch}] (one per sample of x), got {got}")
    if y.device.type == "cpu":
        check_labels(y, f"model_kwargs[{name!r}]", high=high, what=what)
    return y


def take_labels(held: Optional[torch.Tensor], cache: Optional[DeviceCache], model_kwargs: dict, batch: int,
                name: str, device: torch.device, *, role: str, high: Optional[int] = None,
                what: str = "") -> tuple[torch.Tensor, dict]:
    """The labels of one call of a guidance wrapper, on ``device``, and the model_kwargs left for the model.

    A wrapper built with labels (``held``, int64 ``[B]``, copies in ``cache``) uses them and refuses
    ``model_kwargs[name]`` (``role`` says what they are, for the message); one built with ``held=None`` takes them
    from ``model_kwargs[name]`` (:func:`labels_of_call`), removed from the returned kwargs.
    """
    if held is None:
        rest = dict(model_kwargs)
        return labels_of_call(rest.pop(name, None), batch, name, high=high, what=what).to(device), rest
    if name in model_kwargs:
        raise ValueError(f"model_kwargs: {name!r} {role}; do not pass it to the sampler too (or build the wrapper "
                         f"with y=None)")
    if held.shape[0] != batch:
        raise ValueError(f"y: expected {batch} labels (one per sample of x), got {held.shape[0]}")
    return cache.get(device), model_kwargs
