"""DPS against each task's baseline on held-out test images with the packaged model: PSNR and SSIM against the
ground truth, and FID/KID of the restorations against the reference set (the ground truths' own scores are the
floor at that count)."""
from __future__ import annotations

import time
from typing import Any

import torch

from diffcore.pipelines.restore import restoration_metrics, restore
from diffcore.images import save_image_grid
from reproduction.context import Context
from reproduction.sampling_runs import mean_sem


def _summary(per_image: dict[str, list] | None) -> dict[str, Any] | None:
    if per_image is None:
        return None
    psnr = torch.tensor([v if v is not None else float("nan") for v in per_image["psnr"]])
    return {"psnr": mean_sem(psnr[psnr.isfinite()]), "ssim": mean_sem(torch.tensor(per_image["ssim"]))}


def run_dps_task(ctx: Context, task: str) -> dict[str, Any]:
    """Restore ``dps_images`` held-out images degraded by ``task`` (Gaussian noise ``dps_sigma_y``) with DPS
    (``dps_steps`` respaced ancestral steps, ``dps_zeta``) and with the task's baseline (see
    :func:`diffcore.pipelines.restore.restore`); score both."""
    s = ctx.settings
    bundle = ctx.packaged_model()
    truth = ctx.scorer.held_out(s.dps_images)
    started = time.perf_counter()
    result = restore(bundle.model, bundle.diffusion, truth, task, sigma_y=s.dps_sigma_y, steps=s.dps_steps,
                     sampler="ddpm", zeta=s.dps_zeta, seed=s.seed, progress=ctx.progress,
                     batch_size=s.dps_images)  # one batch, as the stored results were computed (float32 DPS
    # trajectories of a few images can fork between batch sizes: restore's docstring)
    seconds = time.perf_counter() - started
    quality = restoration_metrics(result)
    rows = [truth[:8]]
    if result.degraded_comparable:
        rows.append(result.degraded[:8].clamp(-1, 1))
    rows += [result.baseline[:8], result.restored[:8]]
    save_image_grid(torch.cat(rows), ctx.figures / f"dps_{task}.png", nrow=8)
    return {"task": task, "images": int(truth.shape[0]), "baseline_name": result.baseline_name,
            "settings": {k: v for k, v in result.settings.items() if k != "operator_kwargs"},
            "seconds": round(seconds, 1),
            "degraded": _summary(quality["degraded"]), "baseline": _summary(quality["baseline"]),
            "restored": _summary(quality["restored"]),
            "fid": {"baseline": ctx.scorer.score(result.baseline, seed=s.seed),
                    "restored": ctx.scorer.score(result.restored, seed=s.seed),
                    "degraded": (ctx.scorer.score(result.degraded.clamp(-1, 1), seed=s.seed)
                                 if result.degraded_comparable else None),
                    "floor": ctx.scorer.floor(s.dps_images)}}
