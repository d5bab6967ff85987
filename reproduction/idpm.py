"""The Improved-DDPM comparison: small models trained identically except for the loss (L_simple with the fixed
variance beta_t, or L_hybrid with a learned range) and the schedule (linear or cosine), then bits/dim on test
images and FID of ancestral (respaced) and DDIM sampling with the same step counts."""
from __future__ import annotations

from typing import Any

from diffcore.pipelines.evaluate import bits_per_dim
from diffcore.train import TrainConfig, Trainer
from diffcore.train.load import load_trained_model
from diffcore.train.logging import JsonlLog
from reproduction.context import Context
from reproduction.sampling_runs import sample_and_score
from reproduction.settings import SMALL_MODELS, small_unet

SPEC = {name: (schedule, variance, loss) for name, schedule, variance, loss in SMALL_MODELS}


def train_config(ctx: Context, name: str) -> TrainConfig:
    """The training run of small model ``name`` (one of :data:`~reproduction.settings.SMALL_MODELS`)."""
    schedule, variance, loss = SPEC[name]
    s = ctx.settings
    return TrainConfig(data="fashion_mnist", model=small_unet(variance.startswith("learned")), schedule=schedule,
                       num_timesteps=1000, prediction_type="eps", variance_type=variance, loss_type=loss,
                       timestep_sampler="uniform", batch_size=s.small_batch_size, lr=s.small_lr,
                       warmup_steps=min(100, s.small_train_steps // 10), grad_clip=1.0, ema_rate=s.small_ema_rate,
                       total_steps=s.small_train_steps, seed=s.seed, out_dir=str(ctx.work_dir / name),
                       log_every=min(50, s.small_train_steps), checkpoint_every=max(1, s.small_train_steps // 4),
                       sample_every=0, keep_checkpoints=1, progress=ctx.progress)


def run_small_model(ctx: Context, name: str) -> dict[str, Any]:
    """Train (or resume) small model ``name``, then measure it. Returns its settings, training log summary,
    bits/dim and a list of sampler results (ancestral and DDIM at each of ``settings.respaced_steps``)."""
    if name not in SPEC:
        raise ValueError(f"name: expected one of {', '.join(SPEC)}, got {name!r}")
    config = train_config(ctx, name)
    trainer = Trainer(config, device="cpu")
    trainer.train()
    del trainer
    log = JsonlLog(ctx.work_dir / name / "log.jsonl").read()
    trained = load_trained_model(config.out_dir)
    model, diffusion, shape = trained.model, trained.diffusion, trained.image_shape
    s = ctx.settings
    bpd = bits_per_dim(model, diffusion, ctx.real, shape, batches=1, batch_size=s.bpd_images, seed=s.seed,
                       progress=ctx.progress)
    runs = []
    for steps in s.respaced_steps:
        last = steps == max(s.respaced_steps)
        runs.append(sample_and_score(ctx, model, diffusion, shape, sampler="ddpm", steps=steps,
                                     grid_name=f"idpm_{name}_ancestral{steps}" if last else None))
        runs.append(sample_and_score(ctx, model, diffusion, shape, sampler="ddim", steps=steps, eta=0.0))
    schedule, variance, loss = SPEC[name]
    return {"name": name, "schedule": schedule, "variance_type": variance, "loss_type": loss,
            "parameters": sum(p.numel() for p in model.parameters()), "train_steps": trained.step,
            "train": {"log": [{k: r.get(k) for k in ("step", "loss", "mse", "vb", "images_per_s")} for r in log]},
            "bpd": {"bpd": bpd.bpd, "sem": bpd.bpd_sem, "prior": bpd.prior_bpd, "decoder": bpd.decoder_bpd,
                    "images": bpd.num_images},
            "samplers": runs}
