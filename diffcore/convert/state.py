"""What every converter shares: the conversion error, safe loading of ``.pt`` state dicts, and a strict comparison
of a state dict against the tensors a model expects (missing / unexpected / mis-shaped keys, all listed)."""
from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Mapping

import torch

__all__ = ["ConversionError", "load_pt_state_dict", "check_state_dict", "describe_mismatch", "WRAPPER_KEYS"]


class ConversionError(ValueError):
    """A model file that cannot be converted: unreadable, not a state dict, or another architecture."""


#: where training checkpoints keep a model's weights, in the order taken: EMA weights first (what one samples from,
#: as diffcore's own checkpoints load by default), then the trained ones
WRAPPER_KEYS = ("ema", "model_ema", "ema_model", "state_dict", "model")


def _is_tensor_mapping(obj) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj, path: Path) -> Mapping[str, torch.Tensor]:
    # ADM saves the bare state dict; other trainers save a training checkpoint {"model": ..., "ema": ..., "opt": ...}
    if isinstance(obj, Mapping) and obj and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = [key for key in WRAPPER_KEYS if _is_tensor_mapping(obj.get(key))]
        if found:
            if len(found) > 1:
                warnings.warn(f"{path}: a training checkpoint with weights under {found}: took {found[0]!r}",
                              stacklevel=3)
            return obj[found[0]]
        if {"state", "param_groups"} <= set(obj):
            raise ConversionError(f"{path}: this is an optimizer state (keys 'state', 'param_groups'), not model "
                                  f"weights; ADM runs save the weights as model*.pt / ema_*.pt next to it")
    if not isinstance(obj, Mapping) or not obj:
        raise ConversionError(f"{path}: expected a state dict (a mapping of parameter names to tensors), got "
                              f"{'an empty mapping' if isinstance(obj, Mapping) else type(obj).__name__}")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{path}: expected a state dict of tensors, but {len(bad)} entries are not "
                              f"(e.g. {', '.join(bad[:3])}); a training checkpoint should keep the weights under "
                              f"one of {list(WRAPPER_KEYS)}")
    return obj


def load_pt_state_dict(path: "str | os.PathLike") -> dict[str, torch.Tensor]:
    """Read a PyTorch ``.pt`` state dict (improved-diffusion / guided-diffusion / DPS checkpoints) on the CPU.

    Loads with ``torch.load(weights_only=True)``: only tensors, numbers, strings and containers are unpickled, never
    arbitrary objects. A training checkpoint (a dict that keeps the weights under one of :data:`WRAPPER_KEYS`,
    e.g. ``{"model": ..., "ema": ..., "opt": ..., "step": ...}``) is unwrapped: the EMA weights when it has them
    (with a warning naming the key taken when there are several), else ``state_dict`` / ``model``.

    Returns ``{name: tensor}`` in the file's dtypes (fp16 files stay fp16). Raises :class:`ConversionError` with
    one line naming the file and what is wrong: missing, truncated or damaged, holds other objects, or is not a
    state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConversionError(f"{path}: refused to unpickle it: it holds objects other than tensors and plain "
                              f"containers, or is damaged ({first})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConversionError(f"{path}: not a readable PyTorch file (truncated or damaged?): {first}") from None
    return dict(_unwrap(obj, path))


def describe_mismatch(expected: Mapping[str, tuple[int, ...]], given: Mapping[str, torch.Tensor],
                      limit: int = 8) -> str:
    """'' when ``given`` has exactly the keys and shapes of ``expected``, else a one-line summary listing the
    missing, unexpected and mis-shaped keys (the first ``limit`` of each, with counts)."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} {tuple(given[k].shape)} (expected {tuple(expected[k])})"
              for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k])]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
        if items:
            more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def check_state_dict(expected: Mapping[str, tuple[int, ...]], given: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise :class:`ConversionError` unless ``given`` has exactly the keys and shapes of ``expected``
    (``{name: shape}``); the message names ``what`` and lists what did not fit."""
    problem = describe_mismatch(expected, given)
    if problem:
        raise ConversionError(f"{what}: the state dict does not fit this architecture/configuration: {problem}")
