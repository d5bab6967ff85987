"""Drawing and scoring one sampler configuration, and saving a few of its samples as a picture."""
from __future__ import annotations

import time
from typing import Any

import torch

from diffcore.pipelines.evaluate import generate
from diffcore.images import save_image_grid
from reproduction.context import Context


def sample_and_score(ctx: Context, model, diffusion, image_shape, *, sampler: str, steps: int, eta: float = 0.0,
                     grid_name: str | None = None, skip_type: str | None = None) -> dict[str, Any]:
    """``settings.num_samples`` images from ``sampler`` ("ddim" with ``eta`` or "ddpm": ancestral on the process
    respaced to ``steps``; ``skip_type`` as in :func:`diffcore.sample`), seeds ``settings.seed + k`` per batch (the same x_T for every configuration), scored
    against the reference set. Returns the metrics plus ``seconds`` of sampling; the first 16 images go to
    ``figures/<grid_name>.png`` when a name is given."""
    s = ctx.settings
    started = time.perf_counter()
    images = generate(model, diffusion, image_shape, s.num_samples, steps=steps, eta=eta, sampler=sampler,
                      seed=s.seed, batch_size=s.batch_size, progress=ctx.progress, skip_type=skip_type)
    seconds = time.perf_counter() - started
    if grid_name is not None:
        save_image_grid(images[:16], ctx.figures / f"{grid_name}.png", nrow=8)
    result = ctx.scorer.score(images, seed=s.seed)
    result.update(sampler=sampler, steps=int(steps), eta=float(eta) if sampler == "ddim" else None,
                  skip_type=skip_type, seconds=round(seconds, 2))
    return result


def mean_sem(values: torch.Tensor) -> dict[str, float]:
    """Mean and standard error of the mean of a 1-D tensor (sem 0 for one value)."""
    values = values.double().flatten()
    sem = float(values.std() / values.numel() ** 0.5) if values.numel() > 1 else 0.0
    return {"mean": float(values.mean()), "sem": sem}
