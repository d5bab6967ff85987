"""Loads the compiled extension ``diffcore._C`` if it was built, and says what it contains.

``import diffcore`` never fails because of the extension: when it is missing the ops run on the pure-torch
reference (``diffcore.reference``).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

BUILD_HINT = (
    "build it with `pip install torch==2.13.0 numpy pybind11 ninja && pip install -e . --no-build-isolation` "
    "(add FORCE_CUDA=1 on a machine with a CUDA toolkit and a CUDA build of torch for the CUDA kernels)"
)


_state: dict = {}  # "module" and "error" once load() has run (a plain dict: torch.compile traces it cleanly)


def load() -> Optional[Any]:
    """The ``diffcore._C`` module (its import registers ``torch.ops.diffcore``), or None if it is not built."""
    if "module" not in _state:
        try:
            from . import _C

            _state["module"], _state["error"] = _C, None
        except ImportError as error:  # not built, or built against another torch
            _state["module"], _state["error"] = None, str(error)
    return _state["module"]


def load_error() -> Optional[str]:
    """Why the extension could not be imported, or None."""
    load()
    return _state["error"]


def build_info() -> dict:
    """What was built: version, CUDA on or off, CUDA arch list, compiler; ``{"built": False}`` when missing."""
    ext = load()
    if ext is None:
        return {"built": False, "error": load_error(), "hint": BUILD_HINT}
    info = dict(ext.build_info())
    info["built"] = True
    return info


def has_fused_kernels(device: "torch.device | str") -> bool:
    """True when fused kernels for ``device``'s type (cpu or cuda) are compiled in."""
    ext = load()
    if ext is None:
        return False
    device_type = torch.device(device).type
    if device_type == "cpu":
        return True
    if device_type == "cuda":
        return bool(ext.build_info().get("with_cuda", False))
    return False
