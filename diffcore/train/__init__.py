"""Training: timestep samplers, EMA, the configuration and the Trainer (DDP-ready, exact resume).

``Trainer(TrainConfig(...)).train()`` trains; ``torchrun --nproc_per_node N -m diffcore.cli train ...`` trains
with DDP.
"""
from __future__ import annotations

from .config import CONFIG_FIELDS_ADDED, RESUMABLE_CHANGES, TrainConfig, config_from_checkpoint
from .ema import EMA
from .load import TrainedModel, export_model, load_trained_model
from .logging import JsonlLog, plot_loss_curves
from .timestep_sampler import LossSecondMomentSampler, TimestepSamplerName, UniformSampler, make_timestep_sampler
from .trainer import Trainer, TrainingDiverged, build_diffusion

__all__ = ["TrainConfig", "RESUMABLE_CHANGES", "CONFIG_FIELDS_ADDED", "config_from_checkpoint", "TrainingDiverged",
           "EMA", "JsonlLog", "plot_loss_curves", "UniformSampler",
           "LossSecondMomentSampler", "TimestepSamplerName", "make_timestep_sampler", "Trainer", "build_diffusion",
           "TrainedModel", "load_trained_model", "export_model"]
