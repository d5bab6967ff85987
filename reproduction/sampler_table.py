"""Every named sampler on the packaged model at equal cost: FID at each count of model evaluations (NFE) in
``sampler_evaluations``, from the same x_T, with each sampler's defaults (spacing, eta), once with
``clip_denoised=False`` (every sampler function's default) and once clipped (``diffcore.sample``'s default)."""
from __future__ import annotations

import time
from typing import Any, Optional, Sequence

from diffcore.images import save_image_grid
from diffcore.samplers import SAMPLER_INFO, steps_for_evaluations
from reproduction.context import Context
from reproduction.ddim_tables import describe
from reproduction.sampling_runs import CountingModel, draw


class VisitedSteps:
    """A ``callback(step, t, x, pred_x0)`` that keeps the model timesteps of the last run (cleared at step 0)."""

    def __init__(self):
        self.timesteps: list[int] = []

    def __call__(self, step: int, t: int, x, pred_x0) -> None:
        if step == 0:
            self.timesteps = []
        self.timesteps.append(int(t))


def run_sampler_cell(ctx: Context, bundle, sampler: str, evaluations: int, clip_denoised: bool) -> dict[str, Any]:
    """``settings.sampler_samples`` images of ``sampler`` with the most steps that cost at most ``evaluations``
    model calls per image (:func:`diffcore.samplers.steps_for_evaluations`: Heun takes 2 S - 1 calls for S
    steps), scored against the reference set. Returns the metrics, ``steps``, the model calls per image counted
    during sampling, the first and last timestep visited, seconds and images/s."""
    s = ctx.settings
    counter, visited = CountingModel(bundle.model), VisitedSteps()
    steps = steps_for_evaluations(sampler, evaluations)
    started = time.perf_counter()
    images = draw(ctx, counter, bundle.diffusion, bundle.image_shape, s.sampler_samples, sampler=sampler,
                  steps=steps, clip_denoised=clip_denoised, callback=visited)
    seconds = time.perf_counter() - started
    if evaluations == max(s.sampler_evaluations):
        save_image_grid(images[:16], ctx.figures / grid_name(sampler, evaluations, clip_denoised), nrow=8)
    result = ctx.scorer.score(images, seed=s.seed)
    info = SAMPLER_INFO[sampler]
    result.update(sampler=sampler, target_evaluations=int(evaluations), steps=int(steps),
                  evaluations=counter.rows / s.sampler_samples, planned_evaluations=info.model_calls(steps),
                  order=info.order, calls_per_step=info.calls_per_step, eta=info.eta_default,
                  schedule=info.default_schedule, first_t=visited.timesteps[0], last_t=visited.timesteps[-1],
                  visited=len(visited.timesteps), seconds=round(seconds, 2),
                  images_per_s=round(s.sampler_samples / seconds, 3))
    return result


def grid_name(sampler: str, evaluations: int, clip_denoised: bool) -> str:
    """File name of a cell's sample grid under the report's figures."""
    return f"sampler_{sampler}_nfe{evaluations}{'_clipped' if clip_denoised else ''}.png"


def run_sampler_table(ctx: Context, clip_denoised: bool, names: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Every sampler of ``names`` (default ``sampler_names``) at every count of ``sampler_evaluations`` (:func:`run_sampler_cell`),
    plus the real-vs-real floor and the FID spread of disjoint real sets at ``sampler_samples`` images."""
    s = ctx.settings
    bundle = ctx.packaged_model()
    bundle.model.eval()
    runs = [run_sampler_cell(ctx, bundle, sampler, nfe, clip_denoised) for sampler in (names or s.sampler_names)
            for nfe in s.sampler_evaluations]
    return {"model": "packaged", "description": describe(bundle), "clip_denoised": clip_denoised, "runs": runs,
            "floor": ctx.scorer.floor(s.sampler_samples), "spread": ctx.scorer.fid_spread(s.sampler_samples)}
