"""diffcore: denoising diffusion models (DDPM, Improved DDPM, DDIM, DPS) on fused C++/CUDA kernels."""
from __future__ import annotations

__version__ = "0.1.0"

from . import ops, reference  # noqa: E402
from ._extension import build_info  # noqa: E402
from .types import PredictionType, VarianceType  # noqa: E402

__all__ = ["ops", "reference", "build_info", "PredictionType", "VarianceType", "__version__", "sample",
           "save_image_grid"]

_LAZY_EXPORTS = {"sample": ".sampling", "save_image_grid": ".sampling"}  # imported on first use


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_LAZY_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
