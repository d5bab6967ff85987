"""What the reproduction report measures and how much: one dataclass, a ``full`` preset (the committed report) and
a ``quick`` preset (seconds; the tests run the whole pipeline with it)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from diffcore.samplers import KARRAS_SIGMA_MAX, SAMPLER_INFO, SAMPLERS
from diffcore.unet import UNetConfig

#: The DPS table's tasks (the DPS paper's, plus CT and outpainting's cousin, random inpainting).
DPS_TASKS = ("inpaint-box", "inpaint-random", "sr4", "deblur-gauss", "deblur-motion", "ct")

#: The I-DDPM comparison's small models: (name, schedule, variance type, loss type). L_simple uses the fixed
#: large variance (beta_t), as improved-diffusion does for a model without learned sigmas.
SMALL_MODELS = (
    ("simple-linear", "linear", "fixed_large", "mse"),
    ("simple-cosine", "cosine", "fixed_large", "mse"),
    ("hybrid-linear", "linear", "learned_range", "rescaled_mse"),
    ("hybrid-cosine", "cosine", "learned_range", "rescaled_mse"),
)


def small_unet(learn_sigma: bool) -> UNetConfig:
    """The I-DDPM comparison's U-Net: 16 base channels, (1, 2, 2), two res blocks, attention at 7 x 7 (0.44M
    parameters with learned sigmas), for 28 x 28 Fashion-MNIST."""
    return UNetConfig(in_channels=1, model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=2,
                      attention_resolutions=(7,), image_size=28, dropout=0.0, learn_sigma=learn_sigma, num_heads=4,
                      use_scale_shift_norm=True, norm_groups=8)


@dataclasses.dataclass(frozen=True)
class ReproSettings:
    """Sizes of every experiment in the report.

    Sample quality: ``num_samples`` generated images per configuration, scored against as many real test images
    (the floor: another disjoint set of as many); ``batch_size`` images per sampling batch.
    DDIM Table 1: ``ddim_steps`` x ``ddim_etas`` on the packaged model, and S = ``ddim_long_steps`` for each of
    ``ddim_long_etas`` (one stage each: the costly cells). Table 2: ``inversion_images`` test images
    encoded and decoded with each of ``inversion_steps``. I-DDPM: the :data:`SMALL_MODELS` trained
    ``small_train_steps`` steps of ``small_batch_size`` each (lr ``small_lr``, EMA ``small_ema_rate``), bits/dim
    on ``bpd_images`` test images, samples with ``respaced_steps`` (ancestral and DDIM). DPS: ``dps_images`` test
    images per task in ``dps_tasks``, ``dps_steps`` respaced ancestral steps, zeta ``dps_zeta``, sigma_y
    ``dps_sigma_y``. Speed: ``speed_batch`` images, ``speed_repeats`` timed runs (the median is reported), and one
    run of ancestral sampling over all T steps when ``speed_full_ancestral``. Sampler table: each of
    ``sampler_names`` on the packaged model at each count of model evaluations in ``sampler_evaluations``,
    ``sampler_samples`` images per cell (scored against the same reference set of ``num_samples`` images), once
    with each sampler's ``clip_denoised=False`` default (stage ``sampler-table``) and once with x0_hat clipped as
    ``diffcore.sample`` does (one stage per sampler, ``sampler-table-clipped-<sampler>``).
    """

    name: str = "full"
    seed: int = 0
    num_samples: int = 500
    batch_size: int = 100
    ddim_steps: tuple[int, ...] = (10, 20, 50, 100)
    ddim_etas: tuple[float, ...] = (0.0, 0.2, 0.5, 1.0)
    ddim_long_steps: int = 1000
    ddim_long_etas: tuple[float, ...] = (0.0, 1.0)
    inversion_images: int = 50
    inversion_steps: tuple[int, ...] = (10, 20, 50, 100, 1000)
    small_train_steps: int = 2000
    small_batch_size: int = 64
    small_lr: float = 5e-4
    small_ema_rate: float = 0.995
    small_model_names: tuple[str, ...] = tuple(m[0] for m in SMALL_MODELS)
    bpd_images: int = 64
    respaced_steps: tuple[int, ...] = (25, 50, 100)
    dps_tasks: tuple[str, ...] = DPS_TASKS
    dps_images: int = 100
    dps_steps: int = 100
    dps_zeta: float = 1.0
    dps_sigma_y: float = 0.05
    speed_batch: int = 64
    speed_repeats: int = 2
    speed_full_ancestral: bool = True
    sampler_names: tuple[str, ...] = SAMPLERS
    sampler_evaluations: tuple[int, ...] = (10, 20, 50)
    sampler_samples: int = 500
    #: the library defaults the sampler tables measured (each sampler's default spacing, the Karras spacing's
    #: sigma_max): not set here, recorded so that changing a default in diffcore reruns the stages
    sampler_defaults: tuple[str, ...] = tuple(f"{name}:{SAMPLER_INFO[name].default_schedule}" for name in SAMPLERS) \
        + (f"karras_sigma_max:{KARRAS_SIGMA_MAX:g}",)

    @classmethod
    def full(cls) -> "ReproSettings":
        """The committed report's sizes: its stages took 4.2 h of single-thread time on the 2-core CPU."""
        return cls()

    @classmethod
    def quick(cls) -> "ReproSettings":
        """Tiny sizes that exercise every stage in well under a minute (numbers meaningless)."""
        return cls(name="quick", num_samples=8, batch_size=8, ddim_steps=(2, 4), ddim_etas=(0.0, 1.0),
                   ddim_long_steps=8, ddim_long_etas=(0.0,),
                   inversion_images=4, inversion_steps=(2, 4), small_train_steps=3, small_batch_size=4,
                   small_model_names=("simple-linear", "hybrid-cosine"), bpd_images=2, respaced_steps=(2, 4),
                   dps_tasks=("inpaint-box", "sr4"), dps_images=4, dps_steps=3, speed_batch=2, speed_repeats=1,
                   speed_full_ancestral=False, sampler_evaluations=(4, 5), sampler_samples=8)

    @classmethod
    def preset(cls, name: str) -> "ReproSettings":
        if name == "full":
            return cls.full()
        if name == "quick":
            return cls.quick()
        raise ValueError(f"preset: expected 'full' or 'quick', got {name!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self, *fields: str) -> str:
        """A short hash of the named fields (all when none): a stored stage result is reused only while the
        settings it depends on are unchanged."""
        data = self.to_dict()
        chosen = {k: data[k] for k in (fields or sorted(data))}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]
