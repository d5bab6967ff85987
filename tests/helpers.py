"""Helpers shared by several test modules (plain functions; fixtures live in conftest.py)."""
from __future__ import annotations

import torch

from diffcore import checkpoint as ck
from diffcore import cli
from diffcore.train import TrainConfig
from diffcore.unet import UNet, UNetConfig


def run_cli(capsys, *argv):
    """Run ``diffcore ARGV`` in-process; returns ``(exit code, stdout, stderr)``."""
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tiny_checkpoint(path, image_size, num_timesteps=20, seed=0):
    """A small learned-variance U-Net with seeded random weights (all layers perturbed, so the output is not the
    zero of a fresh ADM U-Net) saved as a checkpoint."""
    model_config = UNetConfig(in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                              attention_resolutions=(), image_size=image_size, learn_sigma=True, num_heads=1)
    config = TrainConfig(data="synthetic", model=model_config, num_timesteps=num_timesteps, schedule="cosine")
    torch.manual_seed(seed)
    model = UNet(model_config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ck.save_checkpoint(path, model=model.state_dict(), config=config.to_dict(), step=1)
    return path
