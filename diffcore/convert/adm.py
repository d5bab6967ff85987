"""Import improved-diffusion / guided-diffusion / DPS (ADM) U-Net state dicts into diffcore's :class:`UNet`.

The two networks are the same, parameter for parameter; only names and two layouts differ:

- names: ADM's ResBlock ``in_layers.0 / in_layers.2 / emb_layers.1 / out_layers.0 / out_layers.3 /
  skip_connection`` are diffcore's ``in_norm / in_conv / emb_proj / out_norm / out_conv / skip``; every other name
  (``time_embed``, ``label_emb``, ``input_blocks.i.j``, ``middle_block``, ``output_blocks``, ``out``, attention
  ``norm / qkv / proj_out``, ``op`` / ``conv`` of the resamplers) is the same.
- attention projections: ADM's ``qkv`` and ``proj_out`` are ``Conv1d`` weights ``[3C, C, 1]`` / ``[C, C, 1]``;
  diffcore's are ``Linear`` ``[3C, C]`` / ``[C, C]``.
- qkv row order: diffcore (and ADM's ``use_new_attention_order=True``) orders the 3C rows (q|k|v, head, channel);
  ADM's default legacy order (``QKVAttentionLegacy``, and all of improved-diffusion) is (head, q|k|v, channel).
  The import permutes the rows, so the converted model computes the same attention.
- class conditioning: ADM has K label rows, diffcore K + 1 (the last is the null class of classifier-free
  guidance); the import appends a zero row and says so with a warning (that row was never trained).
- weights saved in fp16 (``use_fp16``) are cast to float32.
- improved-diffusion's ``rescale_timesteps=True`` models see t * 1000 / T: the imported config has
  ``timestep_scale = 1000 / T``, so the model does it itself.

The ADM configuration is given as the flags of its scripts (``image_size``, ``num_channels``, ``num_res_blocks``,
``attention_resolutions`` ...), a named preset (:mod:`diffcore.convert.presets`) or an :class:`ADMSpec`.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Literal, Mapping, Optional

import torch

from ..unet import UNet, UNetConfig
from ..unet.blocks import AttentionBlock
from .state import ConversionError, check_state_dict, load_pt_state_dict

__all__ = ["ADMSpec", "adm_spec", "adm_key_map", "expected_adm_shapes", "from_adm_state_dict", "load_adm_model",
           "ADM_FLAG_DEFAULTS", "legacy_qkv_to_new"]

AttentionOrder = Literal["legacy", "new"]
Codebase = Literal["guided-diffusion", "improved-diffusion"]

#: ADM ResBlock sub-module names -> diffcore's.
_RESBLOCK_NAMES = {"in_layers.0": "in_norm", "in_layers.2": "in_conv", "emb_layers.1": "emb_proj",
                   "out_layers.0": "out_norm", "out_layers.3": "out_conv", "skip_connection": "skip"}

#: The defaults of guided-diffusion's ``model_and_diffusion_defaults()`` (and ``sigma_small``); improved-diffusion
#: differs in the entries of :data:`_IMPROVED_OVERRIDES`.
ADM_FLAG_DEFAULTS: dict[str, Any] = dict(
    image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1, num_head_channels=-1,
    attention_resolutions="16,8", channel_mult="", dropout=0.0, class_cond=False, use_scale_shift_norm=True,
    resblock_updown=False, use_fp16=False, use_new_attention_order=False, learn_sigma=False, sigma_small=False,
    diffusion_steps=1000, noise_schedule="linear", use_kl=False, predict_xstart=False, rescale_timesteps=False,
    rescale_learned_sigmas=False, num_classes=1000)
_IMPROVED_OVERRIDES = dict(rescale_timesteps=True, rescale_learned_sigmas=True)
#: flags of the ADM scripts that do not change the network or the process (accepted and ignored)
_IGNORED_FLAGS = frozenset({"use_checkpoint", "timestep_respacing", "model_path", "clip_denoised", "num_samples",
                            "batch_size", "use_ddim", "codebase"})
_DEFAULT_MULT = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}


@dataclasses.dataclass(frozen=True)
class ADMSpec:
    """An ADM model as diffcore builds it: the U-Net's config, the checkpoint's qkv order and the process.

    unet: the :class:`UNetConfig` (``timestep_scale`` already set for rescale_timesteps models).
    attention_order: ``"legacy"`` (ADM's default, all improved-diffusion models) or ``"new"``
        (``use_new_attention_order=True``).
    schedule, num_timesteps, prediction_type, variance_type, loss_type: the diffusion process (diffcore names).
    """

    unet: UNetConfig
    attention_order: AttentionOrder = "legacy"
    schedule: str = "linear"
    num_timesteps: int = 1000
    prediction_type: str = "eps"
    variance_type: str = "fixed_large"
    loss_type: str = "mse"

    def train_config(self):
        """The :class:`~diffcore.train.TrainConfig` that describes this model and process (what a converted
        checkpoint stores; the training fields keep their defaults)."""
        from ..train.config import TrainConfig

        return TrainConfig(model=self.unet, schedule=self.schedule, num_timesteps=self.num_timesteps,
                           prediction_type=self.prediction_type, variance_type=self.variance_type,
                           loss_type=self.loss_type)  # type: ignore[arg-type]


def _flag_bool(flags: Mapping[str, Any], name: str) -> bool:
    value = flags[name]
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise ConversionError(f"{name}: expected true or false, got {value!r}")
    return value


def _flag_int(flags: Mapping[str, Any], name: str) -> int:
    value = flags[name]
    if isinstance(value, str) and value.lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConversionError(f"{name}: expected an integer, got {value!r}")
    return value


def _int_list(flags: Mapping[str, Any], name: str) -> tuple[int, ...]:
    value = flags[name]
    items = value.split(",") if isinstance(value, str) else [value] if isinstance(value, int) else value
    try:
        out = tuple(int(str(item).strip()) for item in items)
    except (TypeError, ValueError):
        raise ConversionError(f"{name}: expected integers like \"32,16,8\", got {value!r}") from None
    if not out or any(str(item).strip() != str(int(str(item).strip())) for item in items):
        raise ConversionError(f"{name}: expected integers like \"32,16,8\", got {value!r}")
    return out


def adm_spec(flags: Mapping[str, Any]) -> ADMSpec:
    """The :class:`ADMSpec` of an ADM model from its scripts' flags (``--image_size 256 --num_channels 256 ...``
    as a dict of flag name -> value; strings like ``"True"`` / ``"32,16,8"`` are accepted).

    Missing flags take guided-diffusion's defaults, or improved-diffusion's with ``"codebase":
    "improved-diffusion"`` (which differ in ``rescale_timesteps`` and ``rescale_learned_sigmas``: True there).
    ``num_classes`` (default 1000, ImageNet) applies with ``class_cond``. Unknown flags raise
    :class:`ConversionError` listing them; flags that do not change the network or the process
    (``timestep_respacing``, ``use_checkpoint``, ...) are ignored.
    """
    if not isinstance(flags, Mapping):
        raise ConversionError(f"config: expected a mapping of ADM flags, got {type(flags).__name__}")
    codebase = flags.get("codebase", "guided-diffusion")
    if codebase not in ("guided-diffusion", "improved-diffusion"):
        raise ConversionError(f"codebase: expected 'guided-diffusion' or 'improved-diffusion', got {codebase!r}")
    unknown = sorted(set(flags) - set(ADM_FLAG_DEFAULTS) - _IGNORED_FLAGS)
    if unknown:
        raise ConversionError(f"config: unknown ADM flags {unknown}; known flags are "
                              f"{sorted(set(ADM_FLAG_DEFAULTS) | _IGNORED_FLAGS)}")
    full = dict(ADM_FLAG_DEFAULTS)
    if codebase == "improved-diffusion":
        full.update(_IMPROVED_OVERRIDES)
    full.update({k: v for k, v in flags.items() if k in ADM_FLAG_DEFAULTS})

    image_size = _flag_int(full, "image_size")
    if full["channel_mult"] in ("", None):
        if image_size not in _DEFAULT_MULT:
            raise ConversionError(f"channel_mult: no default for image_size={image_size} (ADM has defaults for "
                                  f"{sorted(_DEFAULT_MULT)}); give channel_mult, e.g. \"1,2,2,2\"")
        channel_mult = _DEFAULT_MULT[image_size]
    else:
        channel_mult = _int_list(full, "channel_mult")
    if channel_mult[0] != 1:
        raise ConversionError(f"channel_mult: diffcore's U-Net needs channel_mult[0] == 1 (its first conv has "
                              f"num_channels outputs), got {list(channel_mult)}")
    steps = _flag_int(full, "diffusion_steps")
    learn_sigma = _flag_bool(full, "learn_sigma")
    head_channels = _flag_int(full, "num_head_channels")
    heads_up = _flag_int(full, "num_heads_upsample")
    schedule = full["noise_schedule"]
    if schedule not in ("linear", "cosine"):
        raise ConversionError(f"noise_schedule: expected 'linear' or 'cosine' (ADM's schedules), got {schedule!r}")
    try:
        unet = UNetConfig(
            in_channels=3, model_channels=_flag_int(full, "num_channels"), channel_mult=channel_mult,
            num_res_blocks=_flag_int(full, "num_res_blocks"),
            attention_resolutions=tuple(sorted(set(_int_list(full, "attention_resolutions")), reverse=True)),
            image_size=image_size, dropout=float(full["dropout"]), learn_sigma=learn_sigma,
            num_heads=_flag_int(full, "num_heads"), num_head_channels=None if head_channels == -1 else head_channels,
            use_scale_shift_norm=_flag_bool(full, "use_scale_shift_norm"),
            resblock_updown=_flag_bool(full, "resblock_updown"), conv_resample=True,
            num_classes=_flag_int(full, "num_classes") if _flag_bool(full, "class_cond") else None, norm_groups=32,
            num_heads_upsample=None if heads_up == -1 else heads_up,
            timestep_scale=1000.0 / steps if _flag_bool(full, "rescale_timesteps") else 1.0)
    except (TypeError, ValueError) as error:
        if isinstance(error, ConversionError):
            raise
        raise ConversionError(f"config: these ADM flags do not make a valid U-Net: {error}") from None
    _flag_bool(full, "use_fp16")  # validated; fp16 weights are cast to float32 on import
    if _flag_bool(full, "use_kl"):
        loss = "rescaled_kl"
    elif _flag_bool(full, "rescale_learned_sigmas"):
        loss = "rescaled_mse"
    else:
        loss = "mse"
    variance = "learned_range" if learn_sigma else ("fixed_small" if _flag_bool(full, "sigma_small") else "fixed_large")
    return ADMSpec(unet=unet, attention_order="new" if _flag_bool(full, "use_new_attention_order") else "legacy",
                   schedule=schedule, num_timesteps=steps,
                   prediction_type="x0" if _flag_bool(full, "predict_xstart") else "eps", variance_type=variance,
                   loss_type=loss)


def _as_spec(config: "ADMSpec | UNetConfig | Mapping[str, Any] | str", attention_order: Optional[str]) -> ADMSpec:
    if isinstance(config, str):
        from .presets import adm_preset

        spec = adm_preset(config).spec
    elif isinstance(config, ADMSpec):
        spec = config
    elif isinstance(config, UNetConfig):
        spec = ADMSpec(unet=config)
    elif isinstance(config, Mapping):
        spec = adm_spec(config)
    else:
        raise ConversionError(f"config: expected a preset name, a dict of ADM flags, an ADMSpec or a UNetConfig, "
                              f"got {type(config).__name__}")
    if attention_order is not None:
        if attention_order not in ("legacy", "new"):
            raise ConversionError(f"attention_order: expected 'legacy' or 'new', got {attention_order!r}")
        spec = dataclasses.replace(spec, attention_order=attention_order)  # type: ignore[arg-type]
    return spec


def adm_key_map(model: torch.nn.Module) -> dict[str, str]:
    """diffcore state-dict key -> the ADM key holding the same tensor, for ``model``'s configuration (a
    :class:`UNet`, or any module built from its blocks, e.g. :class:`~diffcore.unet.encoder.EncoderClassifier`)."""
    out = {}
    for key in model.state_dict():
        name = key
        for adm, ours in _RESBLOCK_NAMES.items():
            name = name.replace(f".{ours}.", f".{adm}.")
        out[key] = name
    return out


def _attention_prefixes(model: UNet) -> dict[str, int]:
    return {f"{name}.": module.num_heads for name, module in model.named_modules() if isinstance(module, AttentionBlock)}


def expected_adm_shapes(model: UNet) -> dict[str, tuple[int, ...]]:
    """ADM key -> shape of the checkpoint an ADM model of ``model``'s configuration writes (Conv1d attention
    projections, K label rows)."""
    own = model.state_dict()
    attention = _attention_prefixes(model)
    shapes = {}
    for key, adm in adm_key_map(model).items():
        shape = tuple(own[key].shape)
        if any(key.startswith(p) for p in attention) and key.endswith(("qkv.weight", "proj_out.weight")):
            shape = shape + (1,)
        if key == "label_emb.weight":
            shape = (shape[0] - 1,) + shape[1:]
        shapes[adm] = shape
    return shapes


def legacy_qkv_to_new(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder the 3C rows of a qkv weight ``[3C, ...]`` or bias ``[3C]`` with ``heads`` heads from ADM's legacy
    order (head, q|k|v, channel) to diffcore's (q|k|v, head, channel)."""
    rows = tensor.shape[0]
    d = rows // (3 * heads)
    return tensor.reshape(heads, 3, d, *tensor.shape[1:]).transpose(0, 1).reshape(rows, *tensor.shape[1:])


#: a key only guided-diffusion's noisy classifiers (EncoderUNetModel, attention pooling) have
CLASSIFIER_POOL_KEY = "out.2.positional_embedding"


def from_adm_state_dict(state_dict: Mapping[str, torch.Tensor],
                        config: "ADMSpec | UNetConfig | Mapping[str, Any] | str", *,
                        attention_order: Optional[AttentionOrder] = None) -> UNet:
    """A diffcore :class:`UNet` (float32, eval mode) with the weights of an ADM state dict.

    Args:
        state_dict: the ADM checkpoint's tensors (``torch.load``-ed, or :func:`load_pt_state_dict`).
        config: a preset name (``"guided-256-uncond"``, ``"dps-ffhq256"``, ...; see
            :func:`diffcore.convert.presets.adm_preset_names`), a dict of ADM flags (see :func:`adm_spec`), an
            :class:`ADMSpec`, or a :class:`UNetConfig` (then ``attention_order`` says the qkv order; default legacy).
        attention_order: override the spec's qkv order (``"legacy"`` or ``"new"``).

    Raises :class:`ConversionError` listing the missing, unexpected and mis-shaped keys when the state dict does
    not fit the configuration (nothing is half-loaded). Warns when it adds the null-class row.
    """
    spec = _as_spec(config, attention_order)
    if not isinstance(state_dict, Mapping):
        raise ConversionError(f"state_dict: expected a mapping of names to tensors, got {type(state_dict).__name__}")
    if CLASSIFIER_POOL_KEY in state_dict:
        raise ConversionError(f"state_dict: this is a guided-diffusion classifier (it has {CLASSIFIER_POOL_KEY!r}), "
                              f"not a diffusion model: convert it with --from adm-classifier (a --preset "
                              f"guided-*-classifier) and pass it to `diffcore sample` as --classifier")
    model = UNet(spec.unet)
    check_state_dict(expected_adm_shapes(model), state_dict, "ADM checkpoint")
    attention = _attention_prefixes(model)
    converted = {}
    for key, adm in adm_key_map(model).items():
        tensor = state_dict[adm]
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32)
        prefix = next((p for p in attention if key.startswith(p)), None)
        if prefix is not None and key[len(prefix):] in ("qkv.weight", "proj_out.weight"):
            tensor = tensor.squeeze(-1)
        if prefix is not None and spec.attention_order == "legacy" and key[len(prefix):] in ("qkv.weight", "qkv.bias"):
            tensor = legacy_qkv_to_new(tensor, attention[prefix])
        if key == "label_emb.weight":
            tensor = torch.cat([tensor, tensor.new_zeros(1, tensor.shape[1])])
            warnings.warn(f"class-conditional ADM model: added a zero row for diffcore's null class (label "
                          f"{spec.unet.num_classes}); it was not trained, so classifier-free guidance with this model "
                          f"is not meaningful; use labels 0..{spec.unet.num_classes - 1}", stacklevel=2)
        converted[key] = tensor
    model.load_state_dict(converted, strict=True)
    return model.eval()


def load_adm_model(path: "str | os.PathLike", config: "ADMSpec | Mapping[str, Any] | str", *,
                   attention_order: Optional[AttentionOrder] = None) -> tuple[UNet, ADMSpec]:
    """(:class:`UNet`, :class:`ADMSpec`) from an ADM ``.pt`` file read with weights_only loading (see
    :func:`~diffcore.convert.state.load_pt_state_dict`) and a preset name / flags / spec."""
    spec = _as_spec(config, attention_order)
    state = load_pt_state_dict(path)
    try:
        return from_adm_state_dict(state, spec), spec
    except ConversionError as error:
        raise ConversionError(f"{path}: {error}") from None
