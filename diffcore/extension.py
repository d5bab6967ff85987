"""Loads the compiled extension ``diffcore._C`` if it was built, and says what it contains.

``import diffcore`` never fails because of the extension: when it is missing the ops run on the pure-torch
reference (``diffcore.reference``). The build writes ``_build_info.json`` next to the extension (setup.py) with
the torch version it was compiled against; an extension built for another torch is not imported (its C++ symbols
do not match this torch's) and ``import diffcore`` warns once, naming both versions and the fix.
"""
from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

BUILD_HINT = (
    "build it with `pip install torch==2.13.0 numpy pybind11 ninja && pip install -e . --no-build-isolation` "
    "(add FORCE_CUDA=1 on a machine with a CUDA toolkit and a CUDA build of torch for the CUDA kernels)"
)
REBUILD_HINT = (
    "rebuild it for this torch: `pip install -e . --no-build-isolation --no-deps` in a source checkout, or build "
    "the wheel again (`pip wheel . --no-build-isolation --no-deps`) against this torch and reinstall it"
)
BUILD_INFO_FILE = "_build_info.json"  # written next to the extension by setup.py; read by built_for_torch()


class ExtensionMismatchWarning(UserWarning):
    """The compiled extension was built for another torch; the ops run on the pure-torch reference."""


# "module", "error" and "mismatch" once load() has run (a plain dict: torch.compile traces it cleanly)
_state: dict = {}


def recorded_build() -> dict:
    """The contents of ``_build_info.json`` next to the extension (``torch_version``: the torch it was compiled
    against, ``version``: diffcore's), or ``{}`` when there is none (not built, or built before it was recorded)."""
    path = Path(__file__).with_name(BUILD_INFO_FILE)
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def built_for_torch() -> Optional[str]:
    """The torch version the extension was compiled against, or None when unknown."""
    version = recorded_build().get("torch_version")
    return str(version) if version is not None else None


def torch_mismatch() -> Optional[str]:
    """A message naming both torch versions and the fix when the extension exists but was built for another
    torch than the one imported; None otherwise."""
    built_for = built_for_torch()
    if built_for is None or built_for == str(torch.__version__):
        return None
    if importlib.util.find_spec(f"{__package__}._C") is None:  # a leftover record without the extension
        return None
    return (f"diffcore's compiled extension was built for torch {built_for} but torch {torch.__version__} is "
            f"installed, so the ops run on the slower pure-torch reference; {REBUILD_HINT}")


def load() -> Optional[Any]:
    """The ``diffcore._C`` module (its import registers ``torch.ops.diffcore``), or None if it is not built or
    was built for another torch (then warns once with :class:`ExtensionMismatchWarning`)."""
    if "module" not in _state:
        mismatch = torch_mismatch()
        if mismatch is not None:
            _state["module"], _state["error"], _state["mismatch"] = None, mismatch, True
            warnings.warn(mismatch, ExtensionMismatchWarning, stacklevel=2)
            return None
        _state["mismatch"] = False
        try:
            from . import _C

            _state["module"], _state["error"] = _C, None
        except ImportError as error:  # not built, or built against another torch without a record of it
            _state["module"], _state["error"] = None, str(error)
    return _state["module"]


def load_error() -> Optional[str]:
    """Why the extension could not be imported, or None."""
    load()
    return _state["error"]


def build_info() -> dict:
    """What was built: version, torch version it was built for, CUDA on or off, CUDA arch list, compiler, CPU
    kernel variants; ``{"built": False, "error": ..., "hint": ...}`` when it is missing or unusable (with
    ``torch_version``, the torch it was built for, and ``torch_mismatch: True`` when that is why)."""
    ext = load()
    if ext is None:
        info = {"built": False, "error": load_error()}
        if _state["mismatch"]:
            info.update(torch_version=built_for_torch(), torch_mismatch=True, hint=REBUILD_HINT)
        else:
            info["hint"] = BUILD_HINT
        return info
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
