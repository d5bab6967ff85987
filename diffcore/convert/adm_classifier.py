"""Import guided-diffusion's noisy classifiers (``EncoderUNetModel``, ``pool="attention"``: 64x64_classifier.pt,
128x128_classifier.pt, 256x256_classifier.pt, 512x512_classifier.pt) as diffcore noisy-classifier checkpoints that
``diffcore sample --classifier`` and :func:`diffcore.guidance.load_classifier` read.

The network is :class:`diffcore.unet.encoder.EncoderClassifier`; its state dict has ADM's names except:

- ResBlock sub-modules (renamed as for the U-Net, :func:`diffcore.convert.adm.adm_key_map`);
- attention blocks: ``qkv`` / ``proj_out`` are Conv1d ``[3C, C, 1]`` / ``[C, C, 1]`` in ADM and Linear here, and
  the classifiers use ADM's legacy qkv order (``create_classifier`` leaves ``use_new_attention_order`` False),
  permuted to diffcore's (q|k|v, head, channel) order;
- attention pooling: ``out.2.positional_embedding`` is ``[C, 1 + HW]`` in ADM and ``[1 + HW, C]`` here; ``qkv_proj``
  / ``c_proj`` are Conv1d there, Linear here; its qkv is already in the new order (``QKVAttention``).

fp16 weights (``classifier_use_fp16``) are cast to float32. The checkpoint also records the noise schedule the
classifier was trained on (the diffusion flags ``diffusion_steps``, ``noise_schedule``), so that guidance refuses a
model of another schedule. Flags are the names of guided-diffusion's scripts (``classifier_width``,
``classifier_depth``, ...); presets hold the published ones.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from ..unet.blocks import AttentionBlock
from ..unet.encoder import EncoderClassifier, EncoderConfig
from .adm import adm_key_map, legacy_qkv_to_new
from .state import ConversionError, check_state_dict, load_pt_state_dict

__all__ = ["ADMClassifierSpec", "ADM_CLASSIFIER_FLAG_DEFAULTS", "ADM_CLASSIFIER_PRESETS", "adm_classifier_spec",
           "adm_classifier_preset_names", "expected_adm_classifier_shapes", "from_adm_classifier_state_dict",
           "convert_adm_classifier"]

#: guided-diffusion's ``classifier_defaults()`` and the diffusion defaults that fix the schedule.
ADM_CLASSIFIER_FLAG_DEFAULTS: dict[str, Any] = dict(
    image_size=64, classifier_use_fp16=False, classifier_width=128, classifier_depth=2,
    classifier_attention_resolutions="32,16,8", classifier_use_scale_shift_norm=True,
    classifier_resblock_updown=True, classifier_pool="attention", diffusion_steps=1000, noise_schedule="linear",
    num_classes=1000)
#: guided-diffusion's ``create_classifier``: channel_mult by image size; 64 channels per attention head.
_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
_HEAD_CHANNELS = 64
_IGNORED = frozenset({"classifier_path", "classifier_scale", "timestep_respacing", "use_ddim", "batch_size",
                      "learn_sigma", "rescale_timesteps", "rescale_learned_sigmas", "use_kl", "predict_xstart"})
_COMMON = dict(classifier_width=128, classifier_attention_resolutions="32,16,8", classifier_pool="attention",
               classifier_resblock_updown=True, classifier_use_scale_shift_norm=True, diffusion_steps=1000)

#: the published classifiers: flags from guided-diffusion's README (classifier flags, and the schedule of the
#: diffusion model each guides: cosine at 64x64, linear otherwise).
ADM_CLASSIFIER_PRESETS: dict[str, dict[str, Any]] = {
    "guided-64-classifier": dict(_COMMON, image_size=64, classifier_depth=4, noise_schedule="cosine"),
    "guided-128-classifier": dict(_COMMON, image_size=128, classifier_depth=2, noise_schedule="linear"),
    "guided-256-classifier": dict(_COMMON, image_size=256, classifier_depth=2, noise_schedule="linear"),
    "guided-512-classifier": dict(_COMMON, image_size=512, classifier_depth=2, noise_schedule="linear"),
}


@dataclasses.dataclass(frozen=True)
class ADMClassifierSpec:
    """An ADM classifier as diffcore builds it: the network's ``encoder`` config and the process it was trained on
    (``schedule`` name and ``num_timesteps``)."""

    encoder: EncoderConfig
    schedule: str = "linear"
    num_timesteps: int = 1000

    def alphas_cumprod(self) -> torch.Tensor:
        """float64 ``[T]`` abar of the process, as diffcore builds it for a converted ADM model."""
        from ..schedules import make_schedule

        return make_schedule(self.schedule, self.num_timesteps).alphas_cumprod


def adm_classifier_preset_names() -> list[str]:
    """The classifier preset names, sorted."""
    return sorted(ADM_CLASSIFIER_PRESETS)


def _flag(full: Mapping[str, Any], name: str, kind: type) -> Any:
    value = full[name]
    if kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if kind is int and isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise ConversionError(f"{name}: expected {'true or false' if kind is bool else 'an integer'}, got {value!r}")
    return value


def adm_classifier_spec(config: "Mapping[str, Any] | str") -> ADMClassifierSpec:
    """The :class:`ADMClassifierSpec` of a preset name (:data:`ADM_CLASSIFIER_PRESETS`) or of a dict of
    guided-diffusion flags (missing ones take ``classifier_defaults()``; strings like ``"True"`` / ``"32,16,8"``
    are accepted). Only ``classifier_pool="attention"`` is supported; unknown flags are listed in the error."""
    if isinstance(config, str):
        if config not in ADM_CLASSIFIER_PRESETS:
            raise ConversionError(f"preset: expected one of {', '.join(adm_classifier_preset_names())}, "
                                  f"got {config!r}")
        config = ADM_CLASSIFIER_PRESETS[config]
    if not isinstance(config, Mapping):
        raise ConversionError(f"config: expected a preset name or a mapping of classifier flags, got "
                              f"{type(config).__name__}")
    unknown = sorted(set(config) - set(ADM_CLASSIFIER_FLAG_DEFAULTS) - _IGNORED)
    if unknown:
        raise ConversionError(f"config: unknown ADM classifier flags {unknown}; known flags are "
                              f"{sorted(set(ADM_CLASSIFIER_FLAG_DEFAULTS) | _IGNORED)}")
    full = {**ADM_CLASSIFIER_FLAG_DEFAULTS, **{k: v for k, v in config.items() if k not in _IGNORED}}
    if full["classifier_pool"] != "attention":
        raise ConversionError(f"classifier_pool: only 'attention' (the published classifiers) is supported, got "
                              f"{full['classifier_pool']!r}")
    size = _flag(full, "image_size", int)
    if size not in _CHANNEL_MULT:
        raise ConversionError(f"image_size: guided-diffusion's classifiers exist for {sorted(_CHANNEL_MULT)}, got "
                              f"{size}")
    _flag(full, "classifier_use_fp16", bool)  # validated; fp16 weights are cast to float32
    resolutions = str(full["classifier_attention_resolutions"]).split(",")
    try:
        attention = tuple(int(r) for r in resolutions)
    except ValueError:
        raise ConversionError(f"classifier_attention_resolutions: expected integers like \"32,16,8\", got "
                              f"{full['classifier_attention_resolutions']!r}") from None
    schedule = full["noise_schedule"]
    if schedule not in ("linear", "cosine"):
        raise ConversionError(f"noise_schedule: expected 'linear' or 'cosine', got {schedule!r}")
    try:
        encoder = EncoderConfig(image_size=size, in_channels=3, model_channels=_flag(full, "classifier_width", int),
                                channel_mult=_CHANNEL_MULT[size], num_res_blocks=_flag(full, "classifier_depth", int),
                                attention_resolutions=attention, num_head_channels=_HEAD_CHANNELS,
                                use_scale_shift_norm=_flag(full, "classifier_use_scale_shift_norm", bool),
                                resblock_updown=_flag(full, "classifier_resblock_updown", bool),
                                num_classes=_flag(full, "num_classes", int))
    except ValueError as error:
        raise ConversionError(f"config: these flags do not make a valid classifier: {error}") from None
    return ADMClassifierSpec(encoder, schedule, _flag(full, "diffusion_steps", int))


def _attention_prefixes(model: EncoderClassifier) -> dict[str, int]:
    return {f"{name}.": m.num_heads for name, m in model.named_modules() if isinstance(m, AttentionBlock)}


_POOL = "out.2."


def expected_adm_classifier_shapes(model: EncoderClassifier) -> dict[str, tuple[int, ...]]:
    """ADM key -> shape in a guided-diffusion classifier checkpoint of ``model``'s configuration."""
    own = model.state_dict()
    attention = _attention_prefixes(model)
    shapes = {}
    for key, adm in adm_key_map(model).items():
        shape = tuple(own[key].shape)
        local = key[len(_POOL):] if key.startswith(_POOL) else None
        if local == "positional_embedding":
            shape = shape[::-1]
        elif local in ("qkv_proj.weight", "c_proj.weight") or (
                any(key.startswith(p) for p in attention) and key.endswith(("qkv.weight", "proj_out.weight"))):
            shape = shape + (1,)
        shapes[adm] = shape
    return shapes


def from_adm_classifier_state_dict(state_dict: Mapping[str, torch.Tensor],
                                   config: "ADMClassifierSpec | Mapping[str, Any] | str") -> EncoderClassifier:
    """An :class:`EncoderClassifier` (float32, eval mode) with the weights of a guided-diffusion classifier state
    dict; ``config`` is a preset name, a dict of flags or an :class:`ADMClassifierSpec`. Raises
    :class:`ConversionError` listing missing / unexpected / mis-shaped keys (nothing is half-loaded)."""
    spec = config if isinstance(config, ADMClassifierSpec) else adm_classifier_spec(config)
    if not isinstance(state_dict, Mapping):
        raise ConversionError(f"state_dict: expected a mapping of names to tensors, got {type(state_dict).__name__}")
    model = EncoderClassifier(spec.encoder)
    check_state_dict(expected_adm_classifier_shapes(model), state_dict, "ADM classifier checkpoint")
    attention = _attention_prefixes(model)
    converted = {}
    for key, adm in adm_key_map(model).items():
        tensor = state_dict[adm]
        tensor = tensor.to(torch.float32) if tensor.is_floating_point() else tensor
        prefix = next((p for p in attention if key.startswith(p)), None)
        local = key[len(prefix):] if prefix is not None else key[len(_POOL):] if key.startswith(_POOL) else ""
        if local in ("qkv.weight", "proj_out.weight", "qkv_proj.weight", "c_proj.weight"):
            tensor = tensor.squeeze(-1)
        if prefix is not None and local in ("qkv.weight", "qkv.bias"):
            tensor = legacy_qkv_to_new(tensor, attention[prefix])
        if key.startswith(_POOL) and local == "positional_embedding":
            tensor = tensor.t()
        converted[key] = tensor.contiguous()
    model.load_state_dict(converted, strict=True)
    return model.eval()


def convert_adm_classifier(src: "str | os.PathLike", dst: "str | os.PathLike", *, preset: Optional[str] = None,
                           config: Optional[Mapping[str, Any]] = None) -> Path:
    """Read a guided-diffusion classifier ``.pt`` (weights_only loading) and write it to the new folder ``dst`` as a
    noisy-classifier checkpoint (:func:`diffcore.guidance.save_classifier`, atomically); returns ``dst``. Give
    ``preset`` or ``config`` (flags). Raises FileExistsError when ``dst`` exists, ConversionError otherwise."""
    from ..guidance.classifier_checkpoint import save_classifier

    dst = Path(dst)
    if (preset is None) == (config is None):
        raise ConversionError("preset, config: give exactly one for an ADM classifier (e.g. preset "
                              "'guided-64-classifier')")
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(f"{dst}: already exists; diffcore convert does not overwrite (choose a new folder)")
    spec = adm_classifier_spec(preset if preset is not None else config)
    state = load_pt_state_dict(src)
    try:
        model = from_adm_classifier_state_dict(state, spec)
    except ConversionError as error:
        raise ConversionError(f"{src}: {error}") from None
    size = spec.encoder.image_size
    return save_classifier(dst, model, spec.alphas_cumprod(), image_shape=(3, size, size))
