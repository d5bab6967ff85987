"""The training configuration: one JSON-friendly dataclass that checkpoints store in full."""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Literal, Mapping, Optional

from ..unet import UNetConfig
from .timestep_sampler import TimestepSamplerName

LossTypeName = Literal["mse", "rescaled_mse", "kl", "rescaled_kl"]

#: Fields that may differ between a checkpoint and the configuration that resumes it (they do not change the
#: numbers of the run, only how long it lasts and what it writes).
RESUMABLE_CHANGES = frozenset({"total_steps", "out_dir", "log_every", "sample_every", "sample_n", "sample_steps",
                               "checkpoint_every", "keep_checkpoints", "progress", "max_nonfinite_steps",
                               "num_workers", "skip_bad_images", "tensorboard", "wandb_project"})

#: Fields added after the first checkpoint format, with the format version that introduced them
#: (:data:`diffcore.checkpoint.FORMAT_VERSION`): the config of a checkpoint of an older version may lack them, and
#: they then take their defaults, which keep the old behaviour. Every other field that changes the model or the
#: run must be present (:func:`config_from_checkpoint`). Keys of the U-Net's fields are written ``model.<name>``.
CONFIG_FIELDS_ADDED: dict[str, int] = {"ema_warmup": 2, "max_nonfinite_steps": 2,
                                      "model.num_heads_upsample": 2, "model.timestep_scale": 2}


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run (defaults: the I-DDPM recipe on Fashion-MNIST, small U-Net).

    Data:
        data: ``"fashion_mnist"``, ``"synthetic"``, an image folder, an IDX folder or a .npy/.npz file
            (see :func:`diffcore.data.open_dataset`).
        image_size: resize/crop size for image folders (None: the data's own size).
        pad_to: pad images with black to this size (e.g. 28 -> 32), or None.
        hflip: random horizontal flips.
        num_workers: DataLoader worker processes decoding streamed data (image folders, tar shards, packed
            arrays; see :func:`diffcore.data.open_source`); 0 decodes in the training process. The batches do not
            depend on it (a run may resume with another number).
        skip_bad_images: replace an unreadable image of streamed data by the next good one and count it in the
            log (``skipped_images``), instead of stopping with an error naming the file.
    Model and diffusion:
        model: the :class:`~diffcore.unet.UNetConfig` (its ``learn_sigma`` must match ``variance_type``).
        class_dropout: with a class-conditional model, the probability that a label is replaced by the null
            class (classifier-free guidance training); ignored without ``model.num_classes``.
        schedule: noise schedule name (``"linear" | "cosine" | "scaled_linear" | "sigmoid"``).
        num_timesteps: T.
        prediction_type: ``"eps" | "x0" | "v"``.
        variance_type: ``"fixed_small" | "fixed_large" | "learned_range" | "learned"``.
        loss_type: ``"mse" | "rescaled_mse"`` (with a learned variance: the hybrid loss) ``| "kl" | "rescaled_kl"``.
        timestep_sampler: ``"uniform" | "loss-second-moment"`` (I-DDPM importance sampling).
    Optimisation:
        batch_size: images per optimizer step, over all ranks (divisible by the world size).
        micro_batch_size: images per forward pass on one rank (gradient accumulation); None = the whole share.
        lr, weight_decay, adam_betas: AdamW's.
        warmup_steps: the learning rate rises linearly from lr / warmup_steps to lr over these steps.
        grad_clip: clip the global gradient norm to this (None: no clipping; the norm is logged anyway).
        ema_rate: decay of the EMA of the weights.
        ema_warmup: ramp the EMA decay up as min(ema_rate, (1 + n) / (10 + n)) over the first updates n
            (:class:`~diffcore.train.EMA`); helps short runs, whose EMA otherwise keeps the initial weights.
        max_nonfinite_steps: a step whose loss or gradient holds NaN/inf is skipped (weights, optimizer moments,
            EMA and importance-sampler history untouched, like torch.amp's GradScaler); when more than this many
            consecutive steps are skipped, or the weights themselves stop being finite, training stops with
            :class:`~diffcore.train.TrainingDiverged`. Checked (one host sync) when logging and checkpointing, so
            the run may go on up to ``log_every`` skipped steps longer; no checkpoint is written past the last
            finite state. 0 stops at the first such step.
        total_steps: optimizer steps of the whole run.
        bf16: bf16 autocast of the model's forward pass on CUDA and on CPUs where bf16 is fast (AMX, AMD
            AVX512-BF16; :func:`diffcore.runtime.training_bf16`); elsewhere float32, with a warning.
        seed: seeds the initial weights, the data order, the timesteps and the noise.
    Output:
        out_dir: where the log (``log.jsonl``), the loss plot, sample grids and ``checkpoints/`` go.
        log_every, checkpoint_every, sample_every: in optimizer steps (0 disables samples).
        sample_n, sample_steps: images per sample grid and DDIM steps for it.
        keep_checkpoints: how many recent checkpoints to keep (None keeps all).
        progress: show a tqdm progress bar.
        tensorboard: also write the log records and sample grids as TensorBoard events to ``out_dir/tensorboard``
            (needs the ``tensorboard`` package).
        wandb_project: also log to this Weights & Biases project (needs the ``wandb`` package; its own login).
    """

    data: str = "fashion_mnist"
    image_size: Optional[int] = None
    pad_to: Optional[int] = None
    hflip: bool = False
    num_workers: int = 0
    skip_bad_images: bool = False
    model: UNetConfig = dataclasses.field(default_factory=UNetConfig.fashion_mnist_small)
    class_dropout: float = 0.1
    schedule: str = "cosine"
    num_timesteps: int = 1000
    prediction_type: str = "eps"
    variance_type: str = "learned_range"
    loss_type: LossTypeName = "rescaled_mse"
    timestep_sampler: TimestepSamplerName = "uniform"
    batch_size: int = 128
    micro_batch_size: Optional[int] = None
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    grad_clip: Optional[float] = 1.0
    ema_rate: float = 0.9999
    ema_warmup: bool = False
    max_nonfinite_steps: int = 10
    total_steps: int = 10000
    bf16: bool = True
    seed: int = 0
    out_dir: str = "runs/default"
    log_every: int = 100
    checkpoint_every: int = 1000
    sample_every: int = 0
    sample_n: int = 16
    sample_steps: int = 50
    keep_checkpoints: Optional[int] = 3
    progress: bool = True
    tensorboard: bool = False
    wandb_project: Optional[str] = None

    def __post_init__(self) -> None:
        if isinstance(self.model, Mapping):
            self.model = UNetConfig.from_dict(self.model)
        if not isinstance(self.model, UNetConfig):
            raise TypeError(f"model: expected a UNetConfig or its dict, got {type(self.model).__name__}")
        self.adam_betas = tuple(float(b) for b in self.adam_betas)  # type: ignore[assignment]
        positive = ("num_timesteps", "batch_size", "total_steps", "log_every", "checkpoint_every", "sample_n",
                    "sample_steps")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        for name in ("warmup_steps", "sample_every", "seed", "max_nonfinite_steps", "num_workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
        for name in ("micro_batch_size", "keep_checkpoints", "image_size", "pad_to"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: expected None or a positive int, got {value!r}")
        for name in ("hflip", "ema_warmup", "bf16", "progress", "skip_bad_images", "tensorboard"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        if self.wandb_project is not None and (not isinstance(self.wandb_project, str) or not self.wandb_project):
            raise ValueError(f"wandb_project: expected None or a project name, got {self.wandb_project!r}")
        for name in ("lr", "weight_decay", "ema_rate", "class_dropout") + (("grad_clip",) if self.grad_clip is not None
                                                                           else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}: expected a finite number, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive learning rate, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: expected >= 0, got {self.weight_decay}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas: expected two numbers in [0, 1), got {self.adam_betas}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip: expected None or a positive norm, got {self.grad_clip}")
        if not 0.0 <= self.ema_rate <= 1.0:
            raise ValueError(f"ema_rate: expected a decay in [0, 1], got {self.ema_rate}")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ValueError(f"class_dropout: expected a probability in [0, 1), got {self.class_dropout}")
        if self.timestep_sampler not in ("uniform", "loss-second-moment"):
            raise ValueError(f"timestep_sampler: expected 'uniform' or 'loss-second-moment', "
                             f"got {self.timestep_sampler!r}")
        if self.loss_type not in ("mse", "rescaled_mse", "kl", "rescaled_kl"):
            raise ValueError(f"loss_type: expected 'mse', 'rescaled_mse', 'kl' or 'rescaled_kl', "
                             f"got {self.loss_type!r}")
        from ..types import as_prediction_type, as_variance_type

        learned = as_variance_type(self.variance_type).is_learned
        as_prediction_type(self.prediction_type)
        if learned != self.model.learn_sigma:
            raise ValueError(f"model.learn_sigma: variance_type={self.variance_type!r} needs learn_sigma={learned}, "
                             f"got {self.model.learn_sigma}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (the model as ``UNetConfig.to_dict()``, tuples as lists)."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, UNetConfig):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise a ValueError listing them."""
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"config: unknown TrainConfig keys {unknown}; valid keys are {sorted(names)}")
        return cls(**dict(data))

    def to_json(self) -> str:
        """:meth:`to_dict` as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def config_from_checkpoint(data: Any, version: int, where: str = "checkpoint") -> TrainConfig:
    """The :class:`TrainConfig` stored in a checkpoint's ``config.json``, checked for completeness.

    Every field that changes the model or the run must be present: all fields except
    :data:`RESUMABLE_CHANGES` (output and run-length settings, which take their defaults) and those that
    :data:`CONFIG_FIELDS_ADDED` says were introduced after format ``version``; ``model`` must hold every U-Net
    field likewise. So a config without ``num_timesteps`` is an error, not a silent T = 1000.

    Args:
        data: the parsed ``config.json``.
        version: the checkpoint's format version (:attr:`diffcore.checkpoint.Checkpoint.version`).
        where: names the checkpoint in messages.
    Raises :class:`~diffcore.checkpoint.CheckpointError` naming the missing field, or why the config is invalid.
    """
    from ..checkpoint import CheckpointError

    if not isinstance(data, Mapping):
        raise CheckpointError(f"{where}: config.json must be a JSON object, got {type(data).__name__}")

    def required(names: Any, prefix: str) -> list[str]:
        return [name for name in names if prefix + name not in RESUMABLE_CHANGES
                and CONFIG_FIELDS_ADDED.get(prefix + name, 0) <= version]

    kind = data.get("kind")
    if kind is not None:  # diffusion checkpoints carry no kind; a noisy classifier's says "noisy-classifier"
        hint = " (a classifier for guidance: pass it as --classifier)" if kind == "noisy-classifier" else ""
        raise CheckpointError(f"{where}: expected a diffusion model checkpoint, got a {kind!r} checkpoint{hint}")
    model = data.get("model")
    if "model" in data and not isinstance(model, Mapping):
        raise CheckpointError(f"{where}: config.json field 'model' must be an object, got {type(model).__name__}")
    missing = [n for n in required((f.name for f in dataclasses.fields(TrainConfig)), "") if n not in data]
    if isinstance(model, Mapping):
        missing += [f"model.{n}" for n in required((f.name for f in dataclasses.fields(UNetConfig)), "model.")
                    if n not in model]
    if missing:
        optional = sorted(n for n, v in CONFIG_FIELDS_ADDED.items() if v > version)
        raise CheckpointError(f"{where}: config.json lacks {', '.join(repr(n) for n in missing)}, which "
                              f"{'changes' if len(missing) == 1 else 'change'} the model or the run; a format "
                              f"version {version} checkpoint must state "
                              f"{'it' if len(missing) == 1 else 'them'} (only fields added later may be absent"
                              f"{': ' + ', '.join(optional) if optional else ''})")
    try:
        return TrainConfig.from_dict(data)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{where}: its config.json is not a valid diffcore TrainConfig: {error}") from error
