"""The stages of the reproduction: each computes one block of results and stores it as JSON (see
:class:`~reproduction.context.ResultStore`); a stored block is reused while the settings it depends on
are unchanged. ``stage_names(settings)`` lists them in the order ``run`` executes them."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from reproduction.context import Context
from reproduction.settings import ReproSettings


@dataclass(frozen=True)
class Stage:
    """``run(ctx)`` returns the stage's JSON-ready data; ``fields`` are the settings it depends on."""

    name: str
    run: Callable[[Context], dict[str, Any]]
    fields: tuple[str, ...]


COMMON = ("seed", "num_samples", "batch_size")


def _small_model_stage(name: str) -> Stage:
    from reproduction.idpm import run_small_model

    return Stage(f"idpm-{name}", lambda ctx: run_small_model(ctx, name),
                 COMMON + ("small_train_steps", "small_batch_size", "small_lr", "small_ema_rate", "bpd_images",
                           "respaced_steps"))


def _dps_stage(task: str) -> Stage:
    from reproduction.dps_table import run_dps_task

    return Stage(f"dps-{task}", lambda ctx: run_dps_task(ctx, task),
                 COMMON + ("dps_images", "dps_steps", "dps_zeta", "dps_sigma_y"))


def long_stage_name(eta: float) -> str:
    return f"ddim-table1-long-eta{eta:g}"


def _ddim_long_stage(eta: float) -> Stage:
    from reproduction.ddim_tables import run_ddim_long

    return Stage(long_stage_name(eta), lambda ctx: run_ddim_long(ctx, eta), COMMON + ("ddim_long_steps",))


def clipped_sampler_stage_name(sampler: str) -> str:
    return f"sampler-table-clipped-{sampler}"


def _clipped_sampler_stage(sampler: str) -> Stage:
    """One sampler's row of the clipped sampler table (one stage per sampler: ~8 min each on one idle core)."""
    from reproduction.sampler_table import run_sampler_table

    return Stage(clipped_sampler_stage_name(sampler),
                 lambda ctx: run_sampler_table(ctx, clip_denoised=True, names=(sampler,)),
                 COMMON + ("sampler_evaluations", "sampler_samples", "sampler_defaults"))


def all_stages(settings: ReproSettings) -> list[Stage]:
    """Every stage for these settings, in run order."""
    from reproduction.ddim_tables import run_ddim_spacing, run_ddim_table, run_inversion_table, run_packaged_samplers
    from reproduction.sampler_table import run_sampler_table
    from reproduction.speed import run_speed

    stages = [Stage("fid-noise", lambda ctx: {"spread": [ctx.scorer.fid_spread(n) for n in
                                                         sorted({settings.num_samples, settings.dps_images})]},
                    ("seed", "num_samples", "dps_images")),
              Stage("ddim-table1", run_ddim_table, COMMON + ("ddim_steps", "ddim_etas"))]
    stages += [_ddim_long_stage(eta) for eta in settings.ddim_long_etas]
    stages += [Stage("packaged-samplers", run_packaged_samplers, COMMON + ("ddim_steps", "respaced_steps")),
               Stage("ddim-spacing", run_ddim_spacing, COMMON + ("ddim_steps",)),
               Stage("ddim-table2", run_inversion_table, ("seed", "num_samples", "inversion_images",
                                                          "inversion_steps"))]
    # the unclipped table keeps its first run's result when a sampler's default spacing changes (its rows record the
    # spacing they measured, and the report shows it); the clipped table, the default's evidence, reruns
    sampler_fields = COMMON + ("sampler_names", "sampler_evaluations", "sampler_samples")
    stages.append(Stage("sampler-table", lambda ctx: run_sampler_table(ctx, clip_denoised=False), sampler_fields))
    stages += [_clipped_sampler_stage(name) for name in settings.sampler_names]
    stages += [_small_model_stage(name) for name in settings.small_model_names]
    stages += [_dps_stage(task) for task in settings.dps_tasks]
    stages.append(Stage("speed", run_speed, ("speed_batch", "speed_repeats", "speed_full_ancestral", "dps_steps")))
    return stages


def stage_names(settings: ReproSettings) -> list[str]:
    return [stage.name for stage in all_stages(settings)]


def run_stage(ctx: Context, stage: Stage) -> dict[str, Any]:
    """Run ``stage`` unless a stored result with the same settings exists (and ``ctx.force`` is off); returns the
    stored record."""
    fingerprint = ctx.settings.fingerprint(*stage.fields)
    if not ctx.force:
        stored = ctx.store.load(stage.name, fingerprint)
        if stored is not None:
            return stored
    started = time.perf_counter()
    data = stage.run(ctx)
    return ctx.store.save(stage.name, fingerprint, data, time.perf_counter() - started)
