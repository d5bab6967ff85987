"""Helpers shared by several test modules (plain functions; fixtures live in conftest.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def outputs_of_cpu_variant(script: str, isa: str, out: Path) -> list:
    """Run ``script`` (Python source taking the output path and the tests folder as argv) in a fresh process forced
    to CPU kernel variant ``isa`` (``DIFFCORE_CPU_ISA``, one thread); it must ``torch.save`` a dict with ``"isa"``
    (the variant that ran) and ``"outputs"``. Returns the outputs, after checking that ``isa`` ran."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, DIFFCORE_CPU_ISA=isa, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    subprocess.run([sys.executable, "-c", script, str(out), str(root / "tests")], env=env, check=True, cwd=root,
                   timeout=120)
    result = torch.load(out)
    assert result["isa"] == isa
    return result["outputs"]
