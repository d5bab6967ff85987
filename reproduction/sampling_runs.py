"""Drawing and scoring one sampler configuration, and saving a few of its samples as a picture."""
from __future__ import annotations

import time
from typing import Any, Optional

import torch

from diffcore.images import save_image_grid
from diffcore.pipelines.sample import sample
from reproduction.context import Context

#: the report's older names for the two fused-step samplers (stored results use them)
LEGACY_NAMES = {"ddpm": "ancestral", "ddim": "ddim"}


class CountingModel:
    """Wraps a model and counts model evaluations per image: ``rows`` is the number of image rows it has been called
    on, so ``rows / images`` is the model evaluations each image cost (independent of how batches were split)."""

    def __init__(self, model):
        self.model, self.rows = model, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs):
        self.rows += int(x.shape[0])
        return self.model(x, t, **kwargs)


def draw(ctx: Context, model, diffusion, image_shape, n: int, *, sampler: str, steps: int,
         eta: Optional[float] = None, schedule: Optional[str] = None, clip_denoised: bool,
         callback=None) -> torch.Tensor:
    """``n`` images float32 ``[n, C, H, W]`` in [-1, 1] from :func:`diffcore.sample` with ``sampler`` (a name of
    :data:`diffcore.samplers.SAMPLERS`), in batches of ``settings.batch_size``: batch k uses seed
    ``settings.seed + k``, so every configuration starts from the same x_T (image b of batch k depends only on that
    seed and b). ``callback(step, t, x, pred_x0)`` is passed to every call."""
    s = ctx.settings
    parts = []
    for k, start in enumerate(range(0, n, s.batch_size)):
        images = sample(model, n=min(s.batch_size, n - start), sampler=sampler, steps=steps, eta=eta,
                        schedule=schedule, seed=s.seed + k, device="cpu", diffusion=diffusion,
                        image_shape=image_shape, progress=ctx.progress, clip_denoised=clip_denoised, precision="fp32",
                        callback=callback)
        parts.append(images.float().cpu())
    return torch.cat(parts)


def sample_and_score(ctx: Context, model, diffusion, image_shape, *, sampler: str, steps: int, eta: float = 0.0,
                     grid_name: str | None = None, skip_type: str | None = None) -> dict[str, Any]:
    """``settings.num_samples`` images from ``sampler`` ("ddim" with ``eta`` or "ddpm": ancestral on the process
    respaced to ``steps``; ``skip_type`` as in :func:`diffcore.sample`), with x0_hat clipped to [-1, 1] at every
    step (as these stages were first run), from the same x_T for every configuration (:func:`draw`), scored
    against the reference set. Returns the metrics plus ``seconds`` of sampling; the first 16 images go to
    ``figures/<grid_name>.png`` when a name is given."""
    s = ctx.settings
    if sampler not in LEGACY_NAMES:
        raise ValueError(f"sampler: expected 'ddim' or 'ddpm', got {sampler!r}")
    if sampler == "ddpm" and eta != 0.0:
        raise ValueError(f"eta: applies to the ddim sampler only, got eta={eta} with sampler 'ddpm'")
    started = time.perf_counter()
    images = draw(ctx, model, diffusion, image_shape, s.num_samples, sampler=LEGACY_NAMES[sampler], steps=steps,
                  eta=eta if sampler == "ddim" else None, schedule=skip_type, clip_denoised=True)
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
