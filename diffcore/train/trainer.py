"""The training loop: AdamW with linear warm-up, gradient clipping and accumulation, EMA, bf16 autocast (on CUDA
and on CPUs where bf16 is fast), the hybrid loss through :meth:`GaussianDiffusion.training_losses` (the fused op),
importance-sampled timesteps, JSON-lines logs and a loss plot, EMA sample grids, atomic checkpoints with exact
resume, and DDP.

Divergence: a step whose loss or gradient is not finite is skipped on the device (the fused AdamW kernel's
``found_inf``, as torch.amp's GradScaler uses it, and a masked EMA update), so no per-step host sync is needed; the
skipped steps are counted on the device and checked when logging and checkpointing. More than
``config.max_nonfinite_steps`` consecutive skipped steps, or non-finite weights (e.g. from a too large learning
rate), raise :class:`TrainingDiverged` before anything non-finite is written: the last checkpoint on disk stays
the last finite one, and resuming from it is exact.

Reproducibility: the randomness of a step comes from generators that checkpoints save (the data order, a CPU
generator for timesteps and class dropout, a generator on the device for the noise, and the global RNGs for
dropout), so N steps, a checkpoint, and M more steps give the same weights as N + M steps straight (bit for
bit on the CPU), whether the data is in memory or streamed through DataLoader workers (whose number may change
between the two runs: they only decode, in the order :class:`~diffcore.data.ShardedBatches` decides). Every rank
draws the timesteps and noise of the whole global batch and keeps its share, so a DDP run matches one process
trained on the combined batch (to float rounding; dropout masks aside).
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import checkpoint as ck
from ..data import ImageDataset, ImageSource, ShardedBatches, open_source
from ..diffusion import GaussianDiffusion
from ..ops import Impl
from ..runtime import training_bf16
from ..schedules import make_schedule
from ..unet import UNet
from .config import RESUMABLE_CHANGES, TrainConfig, config_from_checkpoint
from .distributed import any_rank, default_device, gather_in_global_order, gather_objects, init_distributed
from .ema import EMA
from .logging import ExternalLoggers, JsonlLog, LossPlot
from .timestep_sampler import make_timestep_sampler


def build_diffusion(config: TrainConfig, device: "torch.device | str | None" = None) -> GaussianDiffusion:
    """The :class:`GaussianDiffusion` a :class:`TrainConfig` describes (tables on ``device``)."""
    schedule = make_schedule(config.schedule, config.num_timesteps, device=device)
    return GaussianDiffusion(schedule, config.prediction_type, config.variance_type, config.loss_type)


class TrainingDiverged(RuntimeError):
    """Training produced a non-finite loss, gradient or weights beyond what ``max_nonfinite_steps`` allows; nothing
    non-finite was saved, and the run's latest checkpoint is its last finite state."""


def resume_differences(saved: dict[str, Any], config: TrainConfig, version: int = ck.FORMAT_VERSION) -> list[str]:
    """How a checkpoint's stored configuration ``saved`` (of format ``version``) differs from ``config`` in fields
    that change the run (:data:`RESUMABLE_CHANGES` may differ). Fields added to TrainConfig after that version
    count as their defaults (which keep the old behaviour); other missing fields are reported."""
    try:
        stored = config_from_checkpoint(saved, version, where="the checkpoint").to_dict()
    except ck.CheckpointError as error:
        return [f"its config is not a valid TrainConfig: {error}"]
    current = config.to_dict()
    for name in RESUMABLE_CHANGES:
        stored.pop(name, None)
        current.pop(name, None)
    return ck.config_differences(stored, current)


class Trainer:
    """Trains a diffusion model as a :class:`TrainConfig` says.

    Args:
        config: the run's configuration.
        model: the network (default: ``UNet(config.model)``); it is called ``model(x, t)`` or, for a
            class-conditional config, ``model(x, t, y=labels)``.
        dataset: the data, in memory or streamed (default: :func:`diffcore.data.open_source` of ``config.data``:
            image folders, tar shards and packed arrays are streamed through ``config.num_workers`` DataLoader
            workers, in the same order as in memory).
        device: default ``cuda:LOCAL_RANK`` if CUDA is available, else the CPU.
        resume: continue from ``config.out_dir/checkpoints`` when it holds a checkpoint (the configurations must
            agree except for :data:`~diffcore.train.config.RESUMABLE_CHANGES`).
        impl: ``"auto" | "fused" | "reference"``: which implementation of the loss ops (q_sample, hybrid_loss)
            to use; they agree to float rounding (use one choice throughout a run for bitwise resumes).

    Under torchrun (``WORLD_SIZE > 1``) the process group is initialised here; ``config.batch_size`` is the
    global batch. Only rank 0 writes files.
    """

    def __init__(self, config: TrainConfig, *, model: Optional[nn.Module] = None,
                 dataset: "ImageDataset | ImageSource | None" = None, device: "torch.device | str | None" = None,
                 resume: bool = True, impl: Impl = "auto"):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
        self.config = config
        self.rank, self.world_size = init_distributed()
        self.device = torch.device(device) if device is not None else default_device()
        if config.batch_size % self.world_size:
            raise ValueError(f"batch_size: the global batch {config.batch_size} must be divisible by the world size "
                             f"{self.world_size}")
        self.local_batch = config.batch_size // self.world_size
        self.micro_batch = config.micro_batch_size or self.local_batch
        if self.local_batch % self.micro_batch:
            raise ValueError(f"micro_batch_size: expected a divisor of the per-rank batch {self.local_batch}, "
                             f"got {self.micro_batch}")

        torch.manual_seed(config.seed)  # the initial weights; then the global RNGs drive only dropout
        self.model = (model if model is not None else UNet(config.model)).to(self.device)
        torch.manual_seed(config.seed + 7919 * (self.rank + 1))
        self.ema = EMA(self.model, config.ema_rate, warmup=config.ema_warmup)
        self.diffusion = build_diffusion(config, self.device)
        if dataset is None:
            dataset = open_source(config.data, image_size=config.image_size, channels=config.model.in_channels,
                                  pad_to=config.pad_to, hflip=config.hflip)
        self._check_dataset(dataset)
        if isinstance(dataset, ImageDataset):
            dataset = dataset.to(self.device)
        self.batches = ShardedBatches(dataset, self.local_batch, seed=config.seed, rank=self.rank,
                                      world_size=self.world_size, num_workers=config.num_workers,
                                      skip_bad_images=config.skip_bad_images, device=self.device)
        self.conditional = config.model.num_classes is not None
        self.optimizer, self.fused_optimizer = self._make_optimizer()
        self.timestep_sampler = make_timestep_sampler(config.timestep_sampler, config.num_timesteps)
        self.t_generator = torch.Generator().manual_seed(config.seed + 1)
        self.noise_generator = torch.Generator(self.device).manual_seed(config.seed + 2)
        self.step = 0
        self.ddp_model: nn.Module = self.model
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = DistributedDataParallel(self.model, device_ids=ids)
        self.autocast = training_bf16(config.bf16, self.device)  # CUDA, or a CPU where bf16 is fast
        self.impl = impl
        self.out_dir = Path(config.out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.log = JsonlLog(self.out_dir / "log.jsonl")
        self.external: Optional[ExternalLoggers] = None  # TensorBoard / W&B while train() runs (rank 0)
        self._skipped_logged = 0
        self._last_saved = -1
        self._stop_requested = False
        # skipped (non-finite) steps, on the device: the current run of consecutive ones, the longest run since the
        # last check, and the total of this run (saved in checkpoints)
        self._nonfinite = {k: torch.zeros((), dtype=torch.int64, device=self.device)
                           for k in ("run", "worst", "total")}
        self._reset_meters()
        if resume:
            latest = ck.latest_checkpoint(self.checkpoint_dir) if self.checkpoint_dir.is_dir() else None
            if latest is not None:
                self.load(latest)

    # ------------------------------------------------------------------------------------------------ setup
    def _check_dataset(self, dataset: "ImageDataset | ImageSource") -> None:
        want_c, want_size = self.config.model.in_channels, self.config.model.image_size
        if dataset.channels != want_c:
            raise ValueError(f"data: the model takes {want_c}-channel images, the data set has {dataset.channels}")
        if dataset.image_size % self.config.model.size_multiple:
            raise ValueError(f"data: images of {dataset.image_size}px do not fit the U-Net (size must be a multiple "
                             f"of {self.config.model.size_multiple}; set pad_to)")
        if dataset.image_size != want_size and isinstance(self.model, UNet):
            raise ValueError(f"data: the model config says image_size={want_size}, the data set serves "
                             f"{dataset.image_size}px images (set pad_to or image_size)")

    def _make_optimizer(self) -> tuple[torch.optim.Optimizer, bool]:
        """AdamW, fused where torch has the fused kernel for the device (it skips a step on the device when told
        ``found_inf``); else the default implementation, and skipping then costs a host sync per step."""
        cfg = self.config
        kwargs = dict(lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
        try:
            return torch.optim.AdamW(self.model.parameters(), fused=True, **kwargs), True
        except (RuntimeError, ValueError, TypeError):
            return torch.optim.AdamW(self.model.parameters(), **kwargs), False

    @property
    def is_main(self) -> bool:
        """True on the rank that writes files (rank 0)."""
        return self.rank == 0

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based): linear warm-up, then constant."""
        warmup = self.config.warmup_steps
        return self.config.lr * (min(1.0, (step + 1) / warmup) if warmup else 1.0)

    def _model_fn(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.ddp_model(x, t, **kwargs)

    # ------------------------------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step over one global batch (all micro-batches). Returns the global batch's timesteps
        ``t`` int64 ``[B]``, per-sample ``loss``, ``mse``, ``vb`` ``[B]`` (vb zeros when not computed) and the
        gradient norm before clipping, all on the device."""
        cfg, device = self.config, self.device
        x, labels = next(self.batches)
        t_all, w_all = self.timestep_sampler.sample(cfg.batch_size, self.t_generator)
        drop_all = (torch.rand(cfg.batch_size, generator=self.t_generator) < cfg.class_dropout
                    if self.conditional else None)
        noise_all = torch.randn((cfg.batch_size, *x.shape[1:]), generator=self.noise_generator, device=device)
        mine = slice(self.rank, None, self.world_size)
        t, w, noise = t_all[mine].to(device), w_all[mine].to(device), noise_all[mine]
        if drop_all is not None:
            labels = torch.where(drop_all[mine].to(device), torch.full_like(labels, cfg.model.num_classes), labels)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        terms = []
        for start in range(0, self.local_batch, self.micro_batch):
            part = slice(start, start + self.micro_batch)
            last = start + self.micro_batch >= self.local_batch
            sync = contextlib.nullcontext() if last or self.world_size == 1 else self.ddp_model.no_sync()
            with sync:
                kwargs = {"y": labels[part]} if self.conditional else None
                losses = self.diffusion.training_losses(self._model_fn, x[part], t[part], noise[part],
                                                        model_kwargs=kwargs, impl=self.impl, check_values=False)
                ((losses.loss * w[part]).sum() / self.local_batch).backward()
            vb = losses.vb if losses.vb is not None else torch.zeros_like(losses.mse)
            terms.append(torch.stack([losses.loss.detach(), losses.mse.detach(), vb.detach()]).float())
        max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        global_terms = gather_in_global_order(torch.cat(terms, dim=1))
        # the same on every rank (all-reduced gradients, gathered losses), so every rank skips the same steps
        bad = ~(torch.isfinite(grad_norm) & torch.isfinite(global_terms[0].sum()))
        if self.fused_optimizer:
            self.optimizer.found_inf = bad.to(torch.float32)  # the fused kernel skips the step on the device
            self.optimizer.step()
        elif not bool(bad):
            self.optimizer.step()
        self.ema.update(self.model, skip=bad)
        if self.timestep_sampler.name != "uniform" and not bool(bad):  # its update syncs anyway
            self.timestep_sampler.update(t_all, global_terms[0])  # the per-sample loss, as improved-diffusion does
        n = self._nonfinite
        n["run"] = torch.where(bad, n["run"] + 1, 0)
        n["worst"] = torch.maximum(n["worst"], n["run"])
        n["total"] += bad.to(torch.int64)
        self.step += 1
        return {"t": t_all.to(device), "loss": global_terms[0], "mse": global_terms[1], "vb": global_terms[2],
                "grad_norm": grad_norm.detach(), "nonfinite": bad}

    # ------------------------------------------------------------------------------------------ divergence
    def check_divergence(self, weights: bool = False) -> None:
        """Raise :class:`TrainingDiverged` when more than ``config.max_nonfinite_steps`` consecutive steps were
        skipped since the last check, or (``weights=True``, before saving or sampling) when a weight of the model
        or the EMA is not finite. One host sync (and one pass over the weights)."""
        n, limit = self._nonfinite, self.config.max_nonfinite_steps
        worst = int(n["worst"])
        n["worst"] = n["run"].clone()
        if worst > limit:
            self._diverged(f"{worst} consecutive steps had a non-finite loss or gradient (they were skipped; "
                           f"max_nonfinite_steps={limit})")
        if weights:
            for what, tensors in (("model", self.model.state_dict()), ("EMA", self.ema.state_dict())):
                bad = ck.nonfinite_tensors(tensors)
                if bad:
                    self._diverged(f"{len(bad)} of the {what}'s {len(tensors)} tensors hold NaN or infinity "
                                   f"(e.g. {bad[0]})")

    def _diverged(self, why: str) -> None:
        last = ck.latest_checkpoint(self.checkpoint_dir) if self.checkpoint_dir.is_dir() else None
        kept = (f"the last finite checkpoint, {last}, was kept" if last is not None
                else "no checkpoint was written")
        raise TrainingDiverged(f"training diverged at step {self.step}: {why}; nothing non-finite was saved and "
                               f"{kept}. Lower the learning rate (lr={self.config.lr}), clip gradients (grad_clip) "
                               f"or check the data, then resume")

    # ------------------------------------------------------------------------------------------ logging
    def _reset_meters(self) -> None:
        self._meters: dict[str, Any] = {"sums": torch.zeros(3, device=self.device),
                                        "quarters": torch.zeros(4, device=self.device),
                                        "quarter_counts": torch.zeros(4, device=self.device),
                                        "grad_norm": torch.zeros((), device=self.device),
                                        "counted": torch.zeros(2, device=self.device),  # finite samples, steps
                                        "samples": 0, "steps": 0, "since": time.perf_counter(), "excluded": 0.0}

    def _accumulate(self, out: dict[str, torch.Tensor]) -> None:
        """Add a step's numbers to the log interval; skipped (non-finite) steps count only as skipped."""
        m, keep = self._meters, ~out["nonfinite"]
        zero = torch.zeros((), device=out["loss"].device)
        m["sums"] += torch.where(keep, torch.stack([out["loss"].sum(), out["mse"].sum(), out["vb"].sum()]), zero)
        quarter = (out["t"] * 4 // self.config.num_timesteps).clamp_(0, 3)
        m["quarters"].index_add_(0, quarter, torch.where(keep, out["loss"], zero))
        m["quarter_counts"].index_add_(0, quarter, keep.float().expand_as(out["loss"]))
        m["grad_norm"] += torch.where(keep, out["grad_norm"].float(), zero)
        m["counted"] += keep.float() * torch.tensor([out["loss"].numel(), 1.0], device=m["counted"].device)
        m["samples"] += out["loss"].numel()
        m["steps"] += 1

    def _log_record(self) -> dict[str, Any]:
        m = self._meters
        elapsed = time.perf_counter() - m["since"] - m["excluded"]  # training time only
        sums, quarters, counts = m["sums"].tolist(), m["quarters"].tolist(), m["quarter_counts"].tolist()
        samples, steps = m["counted"].tolist()
        record = {"step": self.step, "lr": self.lr_at(self.step - 1)}
        for i, name in enumerate(("loss", "mse", "vb")):
            record[name] = sums[i] / samples if samples else None
        for q in range(4):
            record[f"loss_q{q}"] = quarters[q] / counts[q] if counts[q] else None
        record["grad_norm"] = float(m["grad_norm"]) / steps if steps else None
        record["nonfinite_steps"] = m["steps"] - int(steps)
        record["images_per_s"] = m["samples"] / elapsed if elapsed > 0 else None
        record["epoch"] = self.batches.epoch
        record["skipped_images"] = self._skipped_images()
        self._reset_meters()
        return record

    def _skipped_images(self) -> int:
        """Images replaced because unreadable (``skip_bad_images``) since the last record, over all ranks (a
        collective under DDP); new ones are named in a warning."""
        new = self.batches.skipped - self._skipped_logged
        if new:
            names = self.batches.skipped_names[-min(new, 3):]
            warnings.warn(f"rank {self.rank}: skipped {new} unreadable image(s) (skip_bad_images), e.g. "
                          + "; ".join(names))
        self._skipped_logged = self.batches.skipped
        if self.world_size == 1:
            return new
        total = torch.tensor([float(new)], device=self.device)
        torch.distributed.all_reduce(total)
        return int(total.item())

    # --------------------------------------------------------------------------------------- the loop
    def train(self, max_steps: Optional[int] = None) -> list[dict[str, Any]]:
        """Train until ``config.total_steps`` (or ``max_steps`` more steps), logging, sampling and checkpointing
        on the way; a final checkpoint is written at the end, and on SIGINT/SIGTERM after the current step.
        Returns the log records written during this call."""
        cfg = self.config
        end = cfg.total_steps if max_steps is None else min(cfg.total_steps, self.step + max_steps)
        records: list[dict[str, Any]] = []
        bar = tqdm(total=end, initial=self.step, disable=not (cfg.progress and self.is_main), desc="train",
                   dynamic_ncols=True)
        self._reset_meters()
        plot = LossPlot(self.out_dir / "loss.png", self.log.read()) if self.is_main else None
        if self.is_main and (cfg.tensorboard or cfg.wandb_project):
            self.external = ExternalLoggers(self.out_dir, tensorboard=cfg.tensorboard,
                                            wandb_project=cfg.wandb_project, config=cfg.to_dict(),
                                            start_step=self.step)
        with self._stop_on_signals():
            while self.step < end:
                self._accumulate(self.train_step())
                bar.update(1)
                started, meters = time.perf_counter(), self._meters
                if self.step % cfg.log_every == 0 or self.step == end:
                    record = self._log_record()
                    records.append(record)
                    if self.is_main:
                        self.log.write(record)
                        plot.add(record)
                        if self.external is not None:
                            self.external.log(record)
                    bar.set_postfix(loss=f"{math.nan if record['loss'] is None else record['loss']:.4f}",
                                    img_s=f"{record['images_per_s'] or 0:.0f}")
                    self.check_divergence()
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    self.check_divergence(weights=True)  # on every rank: all raise together
                    if self.is_main:
                        self.sample_grid()
                if self.step % cfg.checkpoint_every == 0:
                    self.save()
                if self._meters is meters:
                    meters["excluded"] += time.perf_counter() - started
                else:  # a log record was taken: the new interval starts now
                    self._meters["since"] = time.perf_counter()
                if any_rank(self._stop_requested, self.device):
                    break
        bar.close()
        self.batches.close()  # stops the decoding workers; the next batch restarts them where the stream is
        if self._last_saved != self.step:
            self.save()
        if self.external is not None:
            self.external.close()
            self.external = None
        return records

    @contextlib.contextmanager
    def _stop_on_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):  # finish the step, checkpoint, stop
            self._stop_requested = True

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    # ---------------------------------------------------------------------------------------- outputs
    @torch.no_grad()
    def sample_grid(self) -> Optional[Path]:
        """Write a grid of ``config.sample_n`` samples from the EMA model (DDIM, ``config.sample_steps`` steps,
        seed ``config.seed``; class-conditional models cycle through the classes) to
        ``out_dir/samples/step_XXXXXXXX.png``; the training RNGs are not touched. Returns the path."""
        from ..images import save_image_grid
        from ..samplers import ddim_sample

        path = self.out_dir / "samples" / f"{ck.checkpoint_name(self.step)}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cfg = self.config
        kwargs = None
        if self.conditional:  # one row per class, cycling
            kwargs = {"y": torch.arange(cfg.sample_n, device=self.device) % cfg.model.num_classes}
        data = self.batches.dataset
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            steps = min(cfg.sample_steps, cfg.num_timesteps)
            images = ddim_sample(self.ema.ema_model, self.diffusion,
                                 (cfg.sample_n, data.channels, data.image_size, data.image_size), steps=steps,
                                 skip_type="uniform" if cfg.num_timesteps % steps == 0 else "even", eta=0.0,
                                 clip_denoised=True, model_kwargs=kwargs, seed=cfg.seed, device=self.device,
                                 progress=False).sample
        save_image_grid(images.float().clamp(-1.0, 1.0), path)
        if self.external is not None:
            self.external.image("samples", path, self.step)
        return path

    def training_state(self) -> dict[str, Any]:
        """Everything besides the weights that a resumed run needs (see :meth:`load`)."""
        self.ema.settle()
        return {"step": self.step,
                "nonfinite": {"run": int(self._nonfinite["run"]), "total": int(self._nonfinite["total"])},
                "optimizer": self.optimizer.state_dict(),
                "lr_schedule": {"kind": "linear_warmup", "base_lr": self.config.lr,
                                "warmup_steps": self.config.warmup_steps},
                "timestep_sampler": self.timestep_sampler.state_dict(),
                "ema_updates": self.ema.num_updates,
                "data": self.batches.state_dict(),
                "generators": {"timesteps": self.t_generator.get_state(),
                               "noise": self.noise_generator.get_state()},
                "rng_per_rank": gather_objects(ck.capture_rng_state())}

    def save(self) -> Optional[Path]:
        """Write a checkpoint of the current step (rank 0 writes; every rank must call it). Raises
        :class:`TrainingDiverged` instead when the state is not finite or too many steps were skipped (see
        :meth:`check_divergence`): the checkpoint folder then keeps its last finite checkpoint."""
        self.check_divergence(weights=True)  # the same answer on every rank
        state = self.training_state()  # a collective under DDP
        self._last_saved = self.step
        if not self.is_main:
            return None
        return ck.save_to_folder(self.checkpoint_dir, self.step, keep_last=self.config.keep_checkpoints,
                                 model=self.model.state_dict(), ema=self.ema.state_dict(),
                                 config=self.config.to_dict(), state=state)

    def load(self, path: "str | Path") -> None:
        """Resume from a checkpoint (a checkpoint directory or a folder of them). Raises
        :class:`~diffcore.checkpoint.CheckpointError` when it is damaged or its configuration differs in a field
        that changes the run."""
        loaded = ck.load_checkpoint(ck.resolve_checkpoint(path))
        differences = resume_differences(loaded.config, self.config, loaded.version)
        if differences:
            raise ck.CheckpointError(f"checkpoint {loaded.path} was written with another configuration: "
                                     + "; ".join(differences[:10]))
        state = loaded.state
        ck.load_state_strict(self.model, loaded.model, what="model")
        if loaded.ema is None:
            raise ck.CheckpointError(f"checkpoint {loaded.path} has no EMA weights")
        self.ema.load_state_dict(loaded.ema, num_updates=state["ema_updates"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # a checkpoint of the unfused optimizer continues fused
            group["fused"], group["foreach"] = self.fused_optimizer, None
        nonfinite = state.get("nonfinite", {"run": 0, "total": 0})  # absent before format version 2
        for key in ("run", "total"):
            self._nonfinite[key].fill_(int(nonfinite[key]))
        self._nonfinite["worst"].copy_(self._nonfinite["run"])
        self.timestep_sampler.load_state_dict(state["timestep_sampler"])
        self.batches.load_state_dict(state["data"])
        self.t_generator.set_state(state["generators"]["timesteps"])
        self.noise_generator.set_state(state["generators"]["noise"])
        rngs = state["rng_per_rank"]
        ck.restore_rng_state(rngs[self.rank] if len(rngs) == self.world_size else rngs[0])
        self.step = self._last_saved = int(state["step"])
        if self.is_main:
            self.log.truncate_after(self.step)
