"""Loading one checkpoint directory, every file verified against its manifest first (:func:`load_checkpoint`)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .manifest import FORMAT_VERSION, CheckpointError, read_manifest, read_verified
from .state_tree import unflatten_state


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        path: its directory.
        step: the optimizer step it was written at.
        config: the configuration (JSON object) it was written with.
        model: the model's state dict (CPU tensors unless ``map_location`` said otherwise).
        ema: the EMA weights as a state dict of the same model, or None.
        state: the training state (nested dicts/lists of numbers, strings and tensors), ``{}`` if none was saved.
        version: the format version it was written in (one of :data:`~diffcore.checkpoint.SUPPORTED_VERSIONS`).
    """

    path: Path
    step: int
    config: dict
    model: dict[str, torch.Tensor]
    ema: Optional[dict[str, torch.Tensor]] = None
    state: dict = field(default_factory=dict)
    version: int = FORMAT_VERSION


def load_checkpoint(path: "str | os.PathLike", *, map_location: "torch.device | str" = "cpu",
                    load_state: bool = True) -> Checkpoint:
    """Load and verify a checkpoint directory written by :func:`~diffcore.checkpoint.save_checkpoint`.

    Every file is checked against the manifest before anything is returned; ``load_state=False`` skips the
    training state (to sample from a checkpoint). Raises :class:`~diffcore.checkpoint.CheckpointError` on a
    missing, truncated, corrupted, malformed or foreign checkpoint.
    """
    from safetensors.torch import load

    path = Path(path)
    manifest = read_manifest(path)
    files = manifest["files"]
    wanted = ["model.safetensors", "config.json"] + (["ema.safetensors"] if "ema.safetensors" in files else [])
    if load_state:
        wanted += ["state.safetensors", "state.json"]
    blobs = {}
    for name in wanted:
        if name not in files:
            raise CheckpointError(f"checkpoint {path}: its manifest lists no {name}")
        blobs[name] = read_verified(path, name, files[name])

    def tensors(name: str) -> dict[str, torch.Tensor]:
        try:
            loaded = load(blobs[name])
        except Exception as error:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"checkpoint {path}: {name} is not a valid safetensors file: {error}") from error
        return {k: v.to(map_location) for k, v in loaded.items()}

    try:
        config = json.loads(blobs["config.json"])
        tree = json.loads(blobs["state.json"]) if load_state else {}
    except ValueError as error:
        raise CheckpointError(f"checkpoint {path}: a JSON file is unreadable: {error}") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {path}: config.json must hold a JSON object, got {type(config).__name__}")
    state = unflatten_state(tree, tensors("state.safetensors")) if load_state else {}
    return Checkpoint(path=path, step=manifest["step"], config=config, model=tensors("model.safetensors"),
                      ema=tensors("ema.safetensors") if "ema.safetensors" in blobs else None, state=state,
                      version=manifest["version"])
