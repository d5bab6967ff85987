"""The denoising U-Net (improved-diffusion / ADM design): :class:`UNet`, its :class:`UNetConfig` and its blocks.

``model.py`` assembles the network, ``config.py`` holds its hyper-parameters and presets, ``blocks.py`` the layers
(residual blocks, attention, up/downsampling, timestep embedding) shared with the noisy classifier
(:mod:`diffcore.guidance.noisy_classifier`); ``encoder.py`` is guided-diffusion's noisy classifier (the U-Net's
encoder with attention pooling, :class:`EncoderClassifier`), which ``diffcore convert --from adm-classifier`` imports.
"""
from .blocks import timestep_embedding
from .config import UNetConfig
from .encoder import EncoderClassifier, EncoderConfig
from .model import UNet

__all__ = ["UNet", "UNetConfig", "timestep_embedding", "EncoderClassifier", "EncoderConfig"]
