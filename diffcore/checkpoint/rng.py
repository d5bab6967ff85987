"""The global random number generators' states, captured into a training state and restored from it."""
from __future__ import annotations

import random
from typing import Any, Mapping

import numpy as np
import torch


def capture_rng_state() -> dict:
    """The global RNG states: torch CPU, torch CUDA (every device, when CUDA is initialised), Python's ``random``
    and numpy's legacy global generator. Restore with :func:`restore_rng_state`."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {"torch_cpu": torch.get_rng_state(),
             "python": [version, list(internal), gauss],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the global RNG states saved by :func:`capture_rng_state` (CUDA ones when CUDA is available and the
    device count matches; otherwise they are skipped)."""
    torch.set_rng_state(state["torch_cpu"].to(torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    cuda = state.get("torch_cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in cuda])
