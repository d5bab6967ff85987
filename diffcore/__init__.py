"""diffcore: denoising diffusion models (DDPM, Improved DDPM, DDIM, DPS) on fused C++/CUDA kernels."""
from __future__ import annotations

__version__ = "0.1.0"

from . import ops, reference  # noqa: E402
from .extension import build_info  # noqa: E402
from .types import PredictionType, VarianceType  # noqa: E402

# imported on first use: name -> (module, attribute or None for the module itself)
_LAZY_EXPORTS = {
    "sample": (".pipelines.sample", "sample"),
    "save_image_grid": (".images", "save_image_grid"),
    "GaussianDiffusion": (".diffusion", "GaussianDiffusion"),
    "make_schedule": (".schedules", "make_schedule"),
    "UNet": (".unet", "UNet"),
    "UNetConfig": (".unet", "UNetConfig"),
    "samplers": (".samplers", None),
    "guidance": (".guidance", None),
    "inverse": (".inverse", None),
    "metrics": (".metrics", None),
    "data": (".data", None),
    "train": (".train", None),
    "checkpoint": (".checkpoint", None),
    "pretrained": (".pretrained", None),
    "pipelines": (".pipelines", None),
    "images": (".images", None),
}

__all__ = ["ops", "reference", "build_info", "PredictionType", "VarianceType", "__version__", *_LAZY_EXPORTS]


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        import importlib

        module_name, attribute = _LAZY_EXPORTS[name]
        module = importlib.import_module(module_name, __name__)
        return module if attribute is None else getattr(module, attribute)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
