"""diffcore: denoising diffusion models (DDPM, Improved DDPM, DDIM, DPS) on fused C++/CUDA kernels."""
from __future__ import annotations

__version__ = "0.1.0"

from . import ops, reference  # noqa: E402
from ._extension import build_info  # noqa: E402
from .types import PredictionType, VarianceType  # noqa: E402

__all__ = ["ops", "reference", "build_info", "PredictionType", "VarianceType", "__version__"]
