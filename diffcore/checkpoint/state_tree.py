"""A nested training state <-> a JSON tree plus a flat ``{key: tensor}`` dict, the two halves a checkpoint stores
(``state.json`` and ``state.safetensors``). No pickle is involved."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from .manifest import CheckpointError

_TENSOR_TAG, _INT_DICT_TAG, _TUPLE_TAG = "__tensor__", "__int_keys__", "__tuple__"


def flatten_state(state: Any, prefix: str = "s") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (dicts, lists, tuples, tensors, numbers, strings, None) into a JSON-able tree and a flat
    ``{key: tensor}`` dict for safetensors. Tensors are replaced by ``{"__tensor__": key}``; dicts with non-string
    keys (optimizer state is keyed by int) and tuples are tagged so that :func:`unflatten_state` restores them."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: Any, key: str) -> Any:
        if isinstance(obj, torch.Tensor):
            if key in tensors:
                raise ValueError(f"state: two tensors map to the key {key!r} (a dict key contains '.')")
            tensors[key] = obj.detach().cpu().contiguous().clone()
            return {_TENSOR_TAG: key}
        if isinstance(obj, Mapping):
            if all(isinstance(k, str) for k in obj):
                return {k: walk(v, f"{key}.{k}") for k, v in obj.items()}
            if all(isinstance(k, int) and not isinstance(k, bool) for k in obj):
                return {_INT_DICT_TAG: [[k, walk(v, f"{key}.{k}")] for k, v in obj.items()]}
            raise TypeError(f"state: dict keys must be all str or all int, got {[type(k).__name__ for k in obj]}")
        if isinstance(obj, tuple):
            return {_TUPLE_TAG: [walk(v, f"{key}.{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [walk(v, f"{key}.{i}") for i, v in enumerate(obj)]
        if isinstance(obj, (np.integer, np.floating)):
            return obj.item()
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"state: cannot store a {type(obj).__name__} at {key!r} in a checkpoint")

    return walk(state, prefix), tensors


def unflatten_state(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(tree, dict):
        if set(tree) == {_TENSOR_TAG}:
            key = tree[_TENSOR_TAG]
            if key not in tensors:
                raise CheckpointError(f"training state refers to tensor {key!r}, which state.safetensors lacks")
            return tensors[key]
        if set(tree) == {_INT_DICT_TAG}:
            return {int(k): unflatten_state(v, tensors) for k, v in tree[_INT_DICT_TAG]}
        if set(tree) == {_TUPLE_TAG}:
            return tuple(unflatten_state(v, tensors) for v in tree[_TUPLE_TAG])
        return {k: unflatten_state(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unflatten_state(v, tensors) for v in tree]
    return tree
