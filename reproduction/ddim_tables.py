"""The DDIM paper's tables on the packaged model: Table 1 (FID against the number of steps S and eta), the
ancestral sampler of the learned variance at the same step counts (I-DDPM's respacing), and Table 2 (how well
x_0 is recovered after encoding it to x_T with the DDIM ODE and decoding it back, against S)."""
from __future__ import annotations

import time
from typing import Any

import torch

from diffcore.samplers import ddim_invert, ddim_sample
from diffcore.images import save_image_grid
from reproduction.context import Context
from reproduction.sampling_runs import mean_sem, sample_and_score


def describe(bundle) -> dict[str, Any]:
    """The packaged model's process and size, for the report's text."""
    config = bundle.config
    return {"schedule": config.schedule, "num_timesteps": config.num_timesteps,
            "prediction_type": config.prediction_type, "variance_type": config.variance_type,
            "train_steps": int(bundle.step), "parameters": sum(p.numel() for p in bundle.model.parameters())}


def run_ddim_table(ctx: Context) -> dict[str, Any]:
    """FID (and KID, precision, recall) of DDIM for every S in ``ddim_steps`` and eta in ``ddim_etas``, all from
    the same x_T; plus the floor of real images at the same count and the model's description."""
    s = ctx.settings
    bundle = ctx.packaged_model()
    runs = []
    for eta in s.ddim_etas:
        for steps in s.ddim_steps:
            grid = f"table1_eta{eta:g}_S{steps}" if steps in (min(s.ddim_steps), max(s.ddim_steps)) else None
            runs.append(sample_and_score(ctx, bundle.model, bundle.diffusion, bundle.image_shape, sampler="ddim",
                                         steps=steps, eta=eta, grid_name=grid))
    return {"model": "packaged", "description": describe(bundle), "runs": runs,
            "floor": ctx.scorer.floor(s.num_samples)}


def run_ddim_long(ctx: Context, eta: float) -> dict[str, Any]:
    """Table 1's costly column: DDIM with S = ``ddim_long_steps`` at ``eta``, from the same x_T."""
    s = ctx.settings
    bundle = ctx.packaged_model()
    run = sample_and_score(ctx, bundle.model, bundle.diffusion, bundle.image_shape, sampler="ddim",
                           steps=s.ddim_long_steps, eta=eta, grid_name=f"table1_eta{eta:g}_S{s.ddim_long_steps}")
    return {"model": "packaged", "runs": [run]}


def run_packaged_samplers(ctx: Context) -> dict[str, Any]:
    """Ancestral sampling of the packaged model's learned variance on processes respaced to each S in
    ``ddim_steps`` and ``respaced_steps``, and DDIM (eta 0) at the respaced counts Table 1 lacks."""
    s = ctx.settings
    bundle = ctx.packaged_model()
    runs = []
    for steps in sorted(set(s.ddim_steps) | set(s.respaced_steps)):
        runs.append(sample_and_score(ctx, bundle.model, bundle.diffusion, bundle.image_shape, sampler="ddpm",
                                     steps=steps, grid_name=f"ancestral_S{steps}"))
        if steps not in s.ddim_steps:
            runs.append(sample_and_score(ctx, bundle.model, bundle.diffusion, bundle.image_shape, sampler="ddim",
                                         steps=steps, eta=0.0))
    return {"model": "packaged", "runs": runs, "floor": ctx.scorer.floor(s.num_samples)}


def run_ddim_spacing(ctx: Context) -> dict[str, Any]:
    """DDIM (eta 0) at each S in ``ddim_steps`` with the "even" spacing of improved-diffusion's respacing, whose
    first step is t = T - 1, against Table 1's "uniform" spacing range(0, T, T // S) (ermongroup/ddim), whose first
    step is t = T - T/S: there x_T ~ N(0, I) is taken for x_{T - T/S}, which under the cosine schedule still holds
    a visible share sqrt(abar) of the image (0.15 at S = 10)."""
    s = ctx.settings
    bundle = ctx.packaged_model()
    abar = bundle.diffusion.alphas_cumprod.double().cpu()
    T = bundle.diffusion.num_timesteps
    runs = []
    for steps in s.ddim_steps:
        run = sample_and_score(ctx, bundle.model, bundle.diffusion, bundle.image_shape, sampler="ddim",
                               steps=steps, eta=0.0, skip_type="even")
        run["uniform_first_sqrt_abar"] = float(abar[T - T // steps].sqrt()) if T // steps > 0 else None
        runs.append(run)
    return {"model": "packaged", "runs": runs}


@torch.no_grad()
def run_inversion_table(ctx: Context) -> dict[str, Any]:
    """Encode ``inversion_images`` held-out test images to x_T by DDIM inversion with S steps and decode them
    back with DDIM (eta 0, same S); the per-dimension squared error ||x_0 - x_0'||^2 / d in [-1, 1] pixel units
    (divide by 4 for [0, 1] units), mean and standard error over images, for every S in ``inversion_steps``."""
    s = ctx.settings
    bundle = ctx.packaged_model()
    x0 = ctx.scorer.held_out(s.inversion_images)
    rows, pictures = [], [x0[:8]]
    for steps in s.inversion_steps:
        started = time.perf_counter()
        encoded = ddim_invert(bundle.model, bundle.diffusion, x0, steps=steps, progress=ctx.progress)
        latent = encoded.sample
        recon = ddim_sample(bundle.model, bundle.diffusion, x_T=latent, steps=list(encoded.timesteps), eta=0.0,
                            progress=ctx.progress).sample
        error = (recon - x0).square().flatten(1).mean(1)
        rows.append({"steps": int(steps), "mse": mean_sem(error), "latent_std": float(latent.std()),
                     "seconds": round(time.perf_counter() - started, 2)})
        pictures.append(recon[:8].clamp(-1, 1))
    save_image_grid(torch.cat(pictures), ctx.figures / "table2_reconstructions.png", nrow=8)
    return {"model": "packaged", "images": int(x0.shape[0]), "rows": rows}
