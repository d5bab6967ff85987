"""Checkpoints: one directory per checkpoint, written atomically, replaced crash-safely and verified on load.

The package, one job a module (every public name is importable from ``diffcore.checkpoint``):

- :mod:`~diffcore.checkpoint.manifest`: the on-disk format (file layout, format versions, ``manifest.json``),
  :class:`CheckpointError`, :func:`read_manifest`, :func:`is_checkpoint`, :func:`verify_checkpoint`;
- :mod:`~diffcore.checkpoint.writing`: :func:`save_checkpoint` (atomic, crash-safe, never replacing what is not a
  diffcore checkpoint), :func:`nonfinite_tensors`;
- :mod:`~diffcore.checkpoint.atomic_replace`: moving a new checkpoint into place (``renameat2(RENAME_EXCHANGE)``
  or two renames) and removing the leftovers of interrupted saves;
- :mod:`~diffcore.checkpoint.loading`: :func:`load_checkpoint` and the :class:`Checkpoint` it returns;
- :mod:`~diffcore.checkpoint.matching`: :func:`load_state_strict`, :func:`config_differences`;
- :mod:`~diffcore.checkpoint.folder`: a run's folder of ``step_*`` checkpoints and its ``latest`` file
  (:func:`save_to_folder`, :func:`latest_checkpoint`, :func:`resolve_checkpoint`, :func:`checkpoint_name`);
- :mod:`~diffcore.checkpoint.state_tree`: nested training state <-> JSON tree + flat tensors
  (:func:`flatten_state`, :func:`unflatten_state`);
- :mod:`~diffcore.checkpoint.rng`: :func:`capture_rng_state`, :func:`restore_rng_state`.

No pickle is involved: tensors go to safetensors, everything else to JSON.
"""
from __future__ import annotations

from .folder import LATEST, checkpoint_name, latest_checkpoint, resolve_checkpoint, save_to_folder
from .loading import Checkpoint, load_checkpoint
from .manifest import (CHECKPOINT_FILES, FORMAT_NAME, FORMAT_VERSION, MANIFEST, MAX_MANIFEST_BYTES,
                       SUPPORTED_VERSIONS, CheckpointError, is_checkpoint, read_manifest, verify_checkpoint)
from .matching import config_differences, load_state_strict
from .rng import capture_rng_state, restore_rng_state
from .state_tree import flatten_state, unflatten_state
from .writing import nonfinite_tensors, save_checkpoint

__all__ = ["Checkpoint", "CheckpointError", "save_checkpoint", "load_checkpoint", "verify_checkpoint",
           "read_manifest", "is_checkpoint", "nonfinite_tensors", "load_state_strict", "config_differences",
           "save_to_folder", "latest_checkpoint", "resolve_checkpoint", "checkpoint_name", "capture_rng_state",
           "restore_rng_state", "flatten_state", "unflatten_state",
           "FORMAT_NAME", "FORMAT_VERSION", "SUPPORTED_VERSIONS", "CHECKPOINT_FILES", "MANIFEST", "LATEST",
           "MAX_MANIFEST_BYTES"]
