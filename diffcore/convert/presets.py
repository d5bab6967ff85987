"""Named configurations of the published ADM checkpoints (improved-diffusion, guided-diffusion, DPS), as the flags
their READMEs / config files give, so that ``diffcore convert model.pt out --from adm --preset dps-ffhq256``
needs no flags.

Sources: improved-diffusion README ("Models and Hyperparameters"), guided-diffusion README (model flags of each
checkpoint), DPS ``configs/model_config.yaml`` (FFHQ) and ``configs/imagenet_model_config.yaml`` (= guided-diffusion
256x256 unconditional) with ``configs/diffusion_config.yaml`` (linear, 1000 steps, rescale_timesteps False).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .adm import ADMSpec, adm_spec
from .state import ConversionError

__all__ = ["ADMPreset", "ADM_PRESETS", "adm_preset", "adm_preset_names"]

_GUIDED_256 = dict(codebase="guided-diffusion", attention_resolutions="32,16,8", diffusion_steps=1000, image_size=256,
                   learn_sigma=True, noise_schedule="linear", num_channels=256, num_head_channels=64, num_res_blocks=2,
                   resblock_updown=True, use_fp16=True, use_scale_shift_norm=True)
_IMPROVED_64 = dict(codebase="improved-diffusion", image_size=64, num_channels=128, num_res_blocks=3, learn_sigma=True,
                    diffusion_steps=4000, noise_schedule="cosine")


@dataclass(frozen=True)
class ADMPreset:
    """A published ADM model: its ``flags`` (the scripts' names), the checkpoint ``file`` it describes, a
    ``description`` and the ``source`` of the flags. ``spec`` is the :class:`ADMSpec` diffcore builds from them."""

    name: str
    flags: Mapping[str, Any]
    file: str
    description: str
    source: str

    @property
    def spec(self) -> ADMSpec:
        return adm_spec(self.flags)


ADM_PRESETS: dict[str, ADMPreset] = {p.name: p for p in [
    ADMPreset("improved-cifar10", dict(codebase="improved-diffusion", image_size=32, num_channels=128,
                                       num_res_blocks=3, learn_sigma=True, dropout=0.3, diffusion_steps=4000,
                                       noise_schedule="cosine"),
              "cifar10_uncond_50M_500K.pt", "I-DDPM CIFAR-10 32x32, L_hybrid, cosine, T=4000 (rescaled timesteps)",
              "openai/improved-diffusion README"),
    ADMPreset("improved-imagenet64", dict(_IMPROVED_64), "imagenet64_uncond_100M_1500K.pt",
              "I-DDPM unconditional ImageNet 64x64, L_hybrid, cosine, T=4000 (rescaled timesteps)",
              "openai/improved-diffusion README"),
    ADMPreset("improved-imagenet64-cond", dict(_IMPROVED_64, num_channels=192, class_cond=True,
                                               rescale_learned_sigmas=False, rescale_timesteps=False),
              "imagenet64_cond_270M_250K.pt", "I-DDPM class-conditional ImageNet 64x64 (270M), cosine, T=4000",
              "openai/improved-diffusion README"),
    ADMPreset("guided-64-cond", dict(codebase="guided-diffusion", attention_resolutions="32,16,8", class_cond=True,
                                     diffusion_steps=1000, dropout=0.1, image_size=64, learn_sigma=True,
                                     noise_schedule="cosine", num_channels=192, num_head_channels=64,
                                     num_res_blocks=3, resblock_updown=True, use_new_attention_order=True,
                                     use_fp16=True, use_scale_shift_norm=True),
              "64x64_diffusion.pt", "ADM class-conditional ImageNet 64x64 (new attention order)",
              "openai/guided-diffusion README"),
    ADMPreset("guided-256-uncond", dict(_GUIDED_256, class_cond=False), "256x256_diffusion_uncond.pt",
              "ADM unconditional ImageNet 256x256 (also DPS's ImageNet model, imagenet256.pt)",
              "openai/guided-diffusion README; DPS configs/imagenet_model_config.yaml"),
    ADMPreset("guided-256-cond", dict(_GUIDED_256, class_cond=True), "256x256_diffusion.pt",
              "ADM class-conditional ImageNet 256x256", "openai/guided-diffusion README"),
    ADMPreset("dps-ffhq256", dict(codebase="guided-diffusion", image_size=256, num_channels=128, num_res_blocks=1,
                                  learn_sigma=True, class_cond=False, attention_resolutions="16", num_heads=4,
                                  num_head_channels=64, num_heads_upsample=-1, use_scale_shift_norm=True,
                                  dropout=0.0, resblock_updown=True, use_fp16=False, use_new_attention_order=False,
                                  diffusion_steps=1000, noise_schedule="linear", rescale_timesteps=False),
              "ffhq_10m.pt", "DPS FFHQ 256x256 unconditional model",
              "DPS2022/diffusion-posterior-sampling configs/model_config.yaml + diffusion_config.yaml"),
]}
ADM_PRESETS["dps-imagenet256"] = ADMPreset("dps-imagenet256", ADM_PRESETS["guided-256-uncond"].flags, "imagenet256.pt",
                                           "DPS's ImageNet 256x256 model (= guided-256-uncond)",
                                           "DPS configs/imagenet_model_config.yaml")


def adm_preset_names() -> list[str]:
    """The preset names, sorted."""
    return sorted(ADM_PRESETS)


def adm_preset(name: str) -> ADMPreset:
    """The preset called ``name``; a :class:`ConversionError` lists the valid names otherwise."""
    if name not in ADM_PRESETS:
        raise ConversionError(f"preset: expected one of {', '.join(adm_preset_names())}, got {name!r}")
    return ADM_PRESETS[name]
