"""The training configuration: one JSON-friendly dataclass that checkpoints store in full."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal, Mapping, Optional

from ..unet import UNetConfig
from .timestep_sampler import TimestepSamplerName

LossTypeName = Literal["mse", "rescaled_mse", "kl", "rescaled_kl"]

#: Fields that may differ between a checkpoint and the configuration that resumes it (they do not change the
#: numbers of the run, only how long it lasts and what it writes).
RESUMABLE_CHANGES = frozenset({"total_steps", "out_dir", "log_every", "sample_every", "sample_n", "sample_steps",
                               "checkpoint_every", "keep_checkpoints", "progress"})


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run (defaults: the I-DDPM recipe on Fashion-MNIST, small U-Net).

    Data:
        data: ``"fashion_mnist"``, ``"synthetic"``, an image folder, an IDX folder or a .npy/.npz file
            (see :func:`diffcore.data.open_dataset`).
        image_size: resize/crop size for image folders (None: the data's own size).
        pad_to: pad images with black to this size (e.g. 28 -> 32), or None.
        hflip: random horizontal flips.
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
        total_steps: optimizer steps of the whole run.
        bf16: bf16 autocast of the model's forward pass on CUDA (ignored on the CPU).
        seed: seeds the initial weights, the data order, the timesteps and the noise.
    Output:
        out_dir: where the log (``log.jsonl``), the loss plot, sample grids and ``checkpoints/`` go.
        log_every, checkpoint_every, sample_every: in optimizer steps (0 disables samples).
        sample_n, sample_steps: images per sample grid and DDIM steps for it.
        keep_checkpoints: how many recent checkpoints to keep (None keeps all).
        progress: show a tqdm progress bar.
    """

    data: str = "fashion_mnist"
    image_size: Optional[int] = None
    pad_to: Optional[int] = None
    hflip: bool = False
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
        for name in ("warmup_steps", "sample_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
        for name in ("micro_batch_size", "keep_checkpoints", "image_size", "pad_to"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: expected None or a positive int, got {value!r}")
        for name in ("hflip", "ema_warmup", "bf16", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected True or False, got {getattr(self, name)!r}")
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
