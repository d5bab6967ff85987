"""Whether a loaded checkpoint fits: its state dict against a model (:func:`load_state_strict`), its stored
configuration against the current one (:func:`config_differences`)."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .manifest import CheckpointError


def load_state_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str = "model") -> None:
    """Load ``state_dict`` into ``module`` only if its keys, shapes and dtypes (float vs not) match exactly.

    Raises :class:`~diffcore.checkpoint.CheckpointError` listing missing and unexpected keys and shape mismatches
    (the usual sign that the checkpoint was trained with another model configuration); nothing is loaded in that
    case.
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                parts.append(f"{len(items)} {label} ({', '.join(items[:5])}{', ...' if len(items) > 5 else ''})")
        raise CheckpointError(f"{what}: the checkpoint does not match the model configuration: " + "; ".join(parts))
    module.load_state_dict(dict(state_dict), strict=True)


def config_differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """The leaves where two JSON-like configs differ, as ``"key.path: saved != current"`` strings."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current)):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in saved or key not in current:
                out.append(f"{name}: {saved.get(key, '<absent>')!r} != {current.get(key, '<absent>')!r}")
            else:
                out.extend(config_differences(saved[key], current[key], name))
        return out
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)):
        saved, current = list(saved), list(current)
    return [] if saved == current else [f"{prefix or '<root>'}: {saved!r} != {current!r}"]
