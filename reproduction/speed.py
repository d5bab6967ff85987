"""Sampling speed of each sampler configuration on the packaged model: wall time of whole sampling calls at one
batch size, as images per second (median of ``speed_repeats`` runs; the 1000-step ancestral run once)."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from diffcore.pipelines.restore import restore
from diffcore.samplers import ddim_sample, ddpm_sample, ode_sample
from reproduction.context import Context


def _configurations(ctx: Context, bundle) -> list[tuple[str, int, int, Callable[[], Any]]]:
    """(name, network evaluations per image, repeats, run) of every timed configuration."""
    s = ctx.settings
    model, diffusion = bundle.model, bundle.diffusion
    shape = (s.speed_batch, *bundle.image_shape)
    common = dict(seed=s.seed, progress=False, clip_denoised=True)

    def ddim(steps, eta=0.0, impl="auto"):
        return lambda: ddim_sample(model, diffusion, shape, steps=steps, eta=eta, impl=impl, **common)

    def ancestral(steps):
        return lambda: ddpm_sample(model, diffusion, shape, steps=steps, **common)

    def dpm(steps):
        return lambda: ode_sample(model, diffusion, shape, steps=steps, solver="dpmpp_2m", **common)

    truth = ctx.scorer.held_out(s.speed_batch)
    T = diffusion.num_timesteps
    configs = [(f"ancestral, all {T} steps", T, 1, ancestral(None))] if s.speed_full_ancestral else []
    configs += [(f"ancestral, respaced {k}", k, s.speed_repeats, ancestral(k)) for k in (25, 50, 100)]
    configs += [(f"DDIM eta=0, {k} steps", k, s.speed_repeats, ddim(k)) for k in (10, 20, 50, 100)]
    configs += [("DDIM eta=1, 50 steps", 50, s.speed_repeats, ddim(50, 1.0)),
                ("DDIM eta=0, 50 steps, reference (pure-torch) step ops", 50, s.speed_repeats,
                 ddim(50, impl="reference"))]
    configs += [(f"DPM-Solver++(2M), {k} steps", k, s.speed_repeats, dpm(k)) for k in (10, 20)]
    configs.append((f"DPS sr4, {s.dps_steps} ancestral steps (+ gradient)", s.dps_steps, s.speed_repeats,
                    lambda: restore(model, diffusion, truth, "sr4", steps=s.dps_steps, seed=s.seed,
                                    progress=False)))
    return configs


def run_speed(ctx: Context) -> dict[str, Any]:
    """Time every configuration (after one warm-up network call); images/s = batch / median seconds."""
    s = ctx.settings
    bundle = ctx.packaged_model()
    with torch.no_grad():  # warm-up: first calls allocate
        x = torch.zeros(s.speed_batch, *bundle.image_shape)
        bundle.model(x, torch.zeros(s.speed_batch, dtype=torch.long))
    rows = []
    for name, evaluations, repeats, run in _configurations(ctx, bundle):
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        median = statistics.median(times)
        rows.append({"config": name, "network_evaluations": evaluations, "repeats": repeats,
                     "seconds": round(median, 3), "images_per_s": s.speed_batch / median,
                     "ms_per_image_step": 1000 * median / (s.speed_batch * evaluations)})
        if ctx.progress:
            print(f"  {name}: {s.speed_batch / median:.2f} images/s", flush=True)
    return {"batch": s.speed_batch, "threads": torch.get_num_threads(), "rows": rows,
            "parameters": sum(p.numel() for p in bundle.model.parameters())}
