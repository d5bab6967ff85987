"""The denoising U-Net (improved-diffusion / ADM design): :class:`UNet`, its :class:`UNetConfig` and its blocks.

``model.py`` assembles the network, ``config.py`` holds its hyper-parameters and presets, ``blocks.py`` the layers
(residual blocks, attention, up/downsampling, timestep embedding) shared with the noisy classifier
(:mod:`diffcore.guidance.noisy_classifier`).
"""
from .blocks import timestep_embedding
from .config import UNetConfig
from .model import UNet

__all__ = ["UNet", "UNetConfig", "timestep_embedding"]
