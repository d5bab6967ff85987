"""diffcore's :class:`UNet` <-> diffusers' ``UNet2DModel``: the config mapping and the state-dict key mapping.

Both are DDPM's / ADM's U-Net. A ``UNet2DModel`` config is accepted when it is exactly a diffcore network:
positional timestep embedding with ``flip_sin_to_cos=True`` and ``freq_shift=0``, ``DownBlock2D`` /
``AttnDownBlock2D`` / ``ResnetDownsampleBlock2D`` and the mirrored ``UpBlock2D`` / ``AttnUpBlock2D`` /
``ResnetUpsampleBlock2D`` blocks (resamplers all convs or all ResNet blocks: diffcore's ``resblock_updown``), a ``UNetMidBlock2D`` with
attention (and a GroupNorm in it: diffusers drops that norm for ``resnet_time_scale_shift="scale_shift"`` unless
``attn_norm_num_groups`` is set), SiLU, GroupNorm eps 1e-5, ``downsample_padding=1``, ``mid_block_scale_factor=1``,
no input centering, ``class_embed_type=None``. Anything else raises :class:`ConversionError` naming the field; it
is never loaded into a different network.

Names: ResBlock ``in_norm / in_conv / emb_proj / out_norm / out_conv / skip`` = ``norm1 / conv1 / time_emb_proj /
norm2 / conv2 / conv_shortcut``; attention ``norm / qkv / proj_out`` = ``group_norm / to_q|to_k|to_v / to_out.0``
(diffcore's qkv rows are (q|k|v, head, channel), so q, k, v are its three row blocks).
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping, Optional

import torch

from ..unet import UNet, UNetConfig
from ..unet.blocks import GroupNorm32
from .state import ConversionError, check_state_dict

__all__ = ["unet_config_from_diffusers", "diffusers_config_from_unet", "module_pairs", "unet_from_diffusers_state",
           "diffusers_state_from_unet", "DIFFCORE_CONFIG_KEY"]

#: key of the diffcore UNetConfig stored (as a private entry, ignored by diffusers) in an exported config.json
DIFFCORE_CONFIG_KEY = "_diffcore_unet_config"

_RES = {"in_norm": "norm1", "in_conv": "conv1", "emb_proj": "time_emb_proj", "out_norm": "norm2",
        "out_conv": "conv2", "skip": "conv_shortcut"}
_DOWN_TYPES = ("DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D")
_UP_TYPES = ("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D")
_ATTN = {"norm": "group_norm", "proj_out": "to_out.0"}
_REQUIRED = {"center_input_sample": False, "time_embedding_type": "positional", "freq_shift": 0,
             "flip_sin_to_cos": True, "mid_block_scale_factor": 1, "downsample_padding": 1, "act_fn": "silu",
             "add_attention": True, "class_embed_type": None, "mid_block_type": "UNetMidBlock2D", "norm_eps": 1e-5}
_DEFAULTS = {"in_channels": 3, "out_channels": 3, "layers_per_block": 2, "block_out_channels": (224, 448, 672, 896),
             "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
             "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), "dropout": 0.0,
             "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None,
             "resnet_time_scale_shift": "default", "downsample_type": "conv", "upsample_type": "conv",
             "num_class_embeds": None, "time_embedding_dim": None, "sample_size": None,
             **_REQUIRED}


def _refuse(field: str, expected: str, got: Any) -> ConversionError:
    return ConversionError(f"diffusers config {field}: diffcore's U-Net needs {expected}, got {got!r}; this model "
                           f"cannot be represented exactly, so it is not converted")


def unet_config_from_diffusers(config: Mapping[str, Any]) -> UNetConfig:
    """The :class:`UNetConfig` of a ``UNet2DModel`` ``config.json`` (a dict), or :class:`ConversionError` naming
    the first field diffcore cannot represent. An exported config's stored diffcore config is used when it
    describes the same network (so a round trip keeps e.g. ``num_heads`` vs ``num_head_channels``)."""
    if not isinstance(config, Mapping):
        raise ConversionError(f"diffusers config: expected a dict (config.json), got {type(config).__name__}")
    name = config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise ConversionError(f"diffusers config _class_name: expected 'UNet2DModel', got {name!r}")
    cfg = {**_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for field, value in _REQUIRED.items():
        got = cfg[field]
        if field == "norm_eps":
            if not isinstance(got, (int, float)) or abs(got - value) > 1e-12:
                raise _refuse(field, "1e-05 (torch's GroupNorm eps)", got)
        elif got != value:
            raise _refuse(field, repr(value), got)
    channels = [int(c) for c in cfg["block_out_channels"]]
    downs, ups = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    if len(downs) != len(channels) or len(ups) != len(channels):
        raise _refuse("down_block_types/up_block_types", f"{len(channels)} blocks each (len(block_out_channels))",
                      (downs, ups))
    if cfg["downsample_type"] not in ("conv", "resnet") or cfg["upsample_type"] not in ("conv", "resnet"):
        raise _refuse("downsample_type/upsample_type", "'conv' or 'resnet'",
                      (cfg["downsample_type"], cfg["upsample_type"]))
    attention, by_resnet = [], set()
    levels = len(channels)
    for level, (down, up) in enumerate(zip(downs, reversed(ups))):
        up_index = levels - 1 - level
        if down not in _DOWN_TYPES:
            raise _refuse(f"down_block_types[{level}]", " or ".join(map(repr, _DOWN_TYPES)), down)
        if up not in _UP_TYPES:
            raise _refuse(f"up_block_types[{up_index}]", " or ".join(map(repr, _UP_TYPES)), up)
        if (down == "AttnDownBlock2D") != (up == "AttnUpBlock2D"):
            raise _refuse(f"up_block_types[{up_index}]", "attention on the way up exactly where it is on "
                          f"the way down ({down} at level {level})", up)
        attention.append(down == "AttnDownBlock2D")
        if level != levels - 1:  # this level downsamples at its end
            by_resnet.add(cfg["downsample_type"] == "resnet" if down == "AttnDownBlock2D"
                          else down == "ResnetDownsampleBlock2D")
        if level != 0:  # its up block upsamples at its end
            by_resnet.add(cfg["upsample_type"] == "resnet" if up == "AttnUpBlock2D" else up == "ResnetUpsampleBlock2D")
    if len(by_resnet) > 1:
        raise _refuse("down_block_types/up_block_types/downsample_type/upsample_type", "every down- and upsampler "
                      "a conv or every one a ResNet block (diffcore's resblock_updown)", (downs, ups))
    resblock_updown = by_resnet == {True}
    base = channels[0]
    if any(c % base for c in channels):
        raise _refuse("block_out_channels", "multiples of block_out_channels[0]", channels)
    if cfg["time_embedding_dim"] not in (None, 4 * base):
        raise _refuse("time_embedding_dim", f"None or 4 * block_out_channels[0] = {4 * base}", cfg["time_embedding_dim"])
    shift = cfg["resnet_time_scale_shift"]
    if shift not in ("default", "scale_shift"):
        raise _refuse("resnet_time_scale_shift", "'default' or 'scale_shift'", shift)
    groups = int(cfg["norm_num_groups"])
    attn_groups = cfg["attn_norm_num_groups"]
    if attn_groups is None and shift == "scale_shift":
        raise _refuse("attn_norm_num_groups", "a GroupNorm in the middle attention block (with scale_shift, "
                      f"diffusers has none unless attn_norm_num_groups is set, e.g. to {groups})", None)
    if attn_groups is not None and int(attn_groups) != groups:
        raise _refuse("attn_norm_num_groups", f"None or norm_num_groups ({groups})", attn_groups)
    size = cfg["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise _refuse("sample_size", "a square size", size)
        size = size[0]
    in_ch, out_ch = int(cfg["in_channels"]), int(cfg["out_channels"])
    if out_ch not in (in_ch, 2 * in_ch):
        raise _refuse("out_channels", f"in_channels ({in_ch}) or 2 * in_channels (prediction + variance)", out_ch)
    if size is None:
        size = 2 ** (levels - 1) * 8
    head_dim = cfg["attention_head_dim"]
    num_classes = cfg["num_class_embeds"]
    try:
        unet = UNetConfig(
            in_channels=in_ch, model_channels=base, channel_mult=tuple(c // base for c in channels),
            num_res_blocks=int(cfg["layers_per_block"]),
            attention_resolutions=tuple(int(size) // 2 ** level for level in range(levels) if attention[level]),
            image_size=int(size), dropout=float(cfg["dropout"]), learn_sigma=out_ch == 2 * in_ch,
            num_heads=1, num_head_channels=None if head_dim is None else int(head_dim),
            use_scale_shift_norm=shift == "scale_shift", resblock_updown=resblock_updown,
            conv_resample=True, num_classes=None if num_classes is None else int(num_classes), norm_groups=groups)
    except (TypeError, ValueError) as error:
        raise ConversionError(f"diffusers config: not a valid diffcore U-Net: {error}") from None
    for channels_ in set(channels) | {c1 + c2 for c1 in channels for c2 in channels}:
        if channels_ % groups:
            raise _refuse("norm_num_groups", "a divisor of every layer's channels", groups)
    stored = config.get(DIFFCORE_CONFIG_KEY)
    if isinstance(stored, Mapping):
        try:
            candidate = UNetConfig.from_dict(stored)
            if candidate.num_classes is not None and num_classes is not None:
                derived_classes = num_classes - 1
            else:
                derived_classes = num_classes
            if (_network_fingerprint(candidate) == _network_fingerprint(
                    _replace(unet, num_classes=derived_classes, num_heads=candidate.num_heads,
                             num_head_channels=candidate.num_head_channels,
                             num_heads_upsample=candidate.num_heads_upsample))
                    and diffusers_config_from_unet(candidate)["attention_head_dim"] == head_dim):
                return candidate
        except (TypeError, ValueError):
            pass
    return unet


def _replace(config: UNetConfig, **changes: Any) -> UNetConfig:
    data = config.to_dict()
    data.update(changes)
    return UNetConfig.from_dict(data)


def _network_fingerprint(config: UNetConfig) -> dict:
    """The fields that decide the network, in a canonical form: the head split (set separately), the order of
    attention_resolutions and conv_resample under resblock_updown (unused there) do not count."""
    data = config.to_dict()
    for key in ("num_heads", "num_head_channels", "num_heads_upsample"):
        data.pop(key)
    data["attention_resolutions"] = sorted(set(data["attention_resolutions"]))
    if data["resblock_updown"]:
        data["conv_resample"] = True
    return data


def _heads_everywhere(model_or_config: UNetConfig) -> list[tuple[int, int]]:
    cfg = model_or_config
    out = []
    for level, ch in enumerate(cfg.level_channels):
        if level in cfg.attention_levels:
            out.append((ch, cfg.heads_for(ch)))
            out.append((ch, cfg.heads_for(ch, upsample=True)))
    mid = cfg.level_channels[-1]
    out.append((mid, cfg.heads_for(mid)))
    return out


def diffusers_config_from_unet(config: UNetConfig) -> dict[str, Any]:
    """The ``UNet2DModel`` config (a JSON-friendly dict) of the same network, with the diffcore config stored
    under :data:`DIFFCORE_CONFIG_KEY`. Raises :class:`ConversionError` naming the field when diffusers cannot
    represent it (``timestep_scale != 1``, ``conv_resample=False`` without ``resblock_updown``, GroupNorm group
    counts that vary between layers, head widths that vary between attention blocks)."""
    if not isinstance(config, UNetConfig):
        raise ConversionError(f"config: expected a UNetConfig, got {type(config).__name__}")
    if config.timestep_scale != 1.0:
        raise ConversionError(f"timestep_scale: diffusers' UNet2DModel embeds the timesteps as given; a model with "
                              f"timestep_scale={config.timestep_scale} (rescaled timesteps) cannot be exported")
    if not config.conv_resample and not config.resblock_updown:
        raise ConversionError("conv_resample: diffusers' UNet2DModel always resamples with convolutions; a model "
                              "with conv_resample=False cannot be exported")
    widths = {ch // heads for ch, heads in _heads_everywhere(config)}
    all_one = all(heads == 1 for _, heads in _heads_everywhere(config))
    if not all_one and len(widths) != 1:
        raise ConversionError(f"num_heads: diffusers' UNet2DModel has one attention_head_dim for every attention "
                              f"block, but this model's head widths are {sorted(widths)}; set num_head_channels")
    levels = config.num_levels
    attn = [level in config.attention_levels for level in range(levels)]
    plain_down = "ResnetDownsampleBlock2D" if config.resblock_updown else "DownBlock2D"
    plain_up = "ResnetUpsampleBlock2D" if config.resblock_updown else "UpBlock2D"
    return {
        "_class_name": "UNet2DModel", "sample_size": config.image_size, "in_channels": config.in_channels,
        "out_channels": config.out_channels, "center_input_sample": False, "time_embedding_type": "positional",
        "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
        "down_block_types": ["AttnDownBlock2D" if a else plain_down for a in attn],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if a else plain_up for a in reversed(attn)],
        "block_out_channels": list(config.level_channels), "layers_per_block": config.num_res_blocks,
        "mid_block_scale_factor": 1, "downsample_padding": 1,
        "downsample_type": "resnet" if config.resblock_updown else "conv",
        "upsample_type": "resnet" if config.resblock_updown else "conv", "dropout": config.dropout, "act_fn": "silu",
        "attention_head_dim": None if all_one else widths.pop(), "norm_num_groups": config.norm_groups,
        "attn_norm_num_groups": config.norm_groups, "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift" if config.use_scale_shift_norm else "default",
        "add_attention": True, "class_embed_type": None,
        "num_class_embeds": None if config.num_classes is None else config.num_classes + 1,
        "num_train_timesteps": None, DIFFCORE_CONFIG_KEY: config.to_dict()}


def module_pairs(config: UNetConfig) -> list[tuple[str, str, str]]:
    """(diffcore module prefix, diffusers module prefix, kind) for every parametrized module; kind is one of
    ``"plain"`` (same parameter names), ``"res"``, ``"attn"``, ``"down"`` / ``"up"`` (conv resamplers)."""
    pairs = [("input_blocks.0.0", "conv_in", "plain"), ("time_embed.0", "time_embedding.linear_1", "plain"),
             ("time_embed.2", "time_embedding.linear_2", "plain")]
    if config.num_classes is not None:
        pairs.append(("label_emb", "class_embedding", "plain"))
    n, levels = config.num_res_blocks, config.num_levels
    resample = "res" if config.resblock_updown else None
    index = 1
    for level in range(levels):
        for r in range(n):
            pairs.append((f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{r}", "res"))
            if level in config.attention_levels:
                pairs.append((f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{r}", "attn"))
            index += 1
        if level != levels - 1:
            pairs.append((f"input_blocks.{index}.0", f"down_blocks.{level}.downsamplers.0", resample or "down"))
            index += 1
    pairs += [("middle_block.0", "mid_block.resnets.0", "res"), ("middle_block.1", "mid_block.attentions.0", "attn"),
              ("middle_block.2", "mid_block.resnets.1", "res")]
    index = 0
    for up, level in enumerate(reversed(range(levels))):
        for i in range(n + 1):
            pairs.append((f"output_blocks.{index}.0", f"up_blocks.{up}.resnets.{i}", "res"))
            sub = 1
            if level in config.attention_levels:
                pairs.append((f"output_blocks.{index}.1", f"up_blocks.{up}.attentions.{i}", "attn"))
                sub = 2
            if level and i == n:
                pairs.append((f"output_blocks.{index}.{sub}", f"up_blocks.{up}.upsamplers.0", resample or "up"))
            index += 1
    pairs += [("out.0", "conv_norm_out", "plain"), ("out.2", "conv_out", "plain")]
    return pairs


def _key_pairs(model: UNet) -> list[tuple[str, str, Optional[int]]]:
    """(diffcore key, diffusers key, qkv block 0/1/2 or None) for every tensor."""
    own = model.state_dict()
    out = []
    for ours, theirs, kind in module_pairs(model.config):
        names = [k[len(ours) + 1:] for k in own if k.startswith(ours + ".")]
        for name in names:
            head, _, leaf = name.rpartition(".")
            if kind == "res":
                out.append((f"{ours}.{name}", f"{theirs}.{_RES[head]}.{leaf}", None))
            elif kind == "attn":
                if head == "qkv":
                    out += [(f"{ours}.{name}", f"{theirs}.to_{c}.{leaf}", i) for i, c in enumerate("qkv")]
                else:
                    out.append((f"{ours}.{name}", f"{theirs}.{_ATTN[head]}.{leaf}", None))
            elif kind == "down":
                out.append((f"{ours}.{name}", f"{theirs}.conv.{leaf}", None))
            else:  # plain, up (Upsample.conv -> Upsample2D.conv)
                out.append((f"{ours}.{name}", f"{theirs}.{name}", None))
    if len({k for k, _, _ in out}) != len(own):
        raise AssertionError("module_pairs does not cover the model")  # a bug in this module, not user input
    return out


def _check_group_norms(model: UNet) -> None:
    counts = {m.num_groups for m in model.modules() if isinstance(m, GroupNorm32)}
    if counts != {model.config.norm_groups}:
        raise ConversionError(f"norm_groups: diffusers uses norm_num_groups={model.config.norm_groups} for every "
                              f"GroupNorm, but this model's layers use {sorted(counts)} groups (a layer's channels "
                              f"are not a multiple of norm_groups)")


def diffusers_state_from_unet(model: UNet) -> dict[str, torch.Tensor]:
    """The ``UNet2DModel`` state dict of ``model`` (tensors are views/copies of its weights)."""
    _check_group_norms(model)
    own = model.state_dict()
    out = {}
    for ours, theirs, block in _key_pairs(model):
        tensor = own[ours]
        out[theirs] = tensor if block is None else tensor.chunk(3, dim=0)[block].clone()
    return out


def unet_from_diffusers_state(state: Mapping[str, torch.Tensor], config: UNetConfig,
                              num_class_embeds: Optional[int] = None) -> UNet:
    """A diffcore :class:`UNet` (float32, eval mode) from a ``UNet2DModel`` state dict of the network ``config``
    describes. ``num_class_embeds`` (the diffusers config's) equal to ``config.num_classes`` means the checkpoint
    has no null-class row: a zero row is appended, with a warning. Raises :class:`ConversionError` listing missing,
    unexpected and mis-shaped keys."""
    model = UNet(config)
    _check_group_norms(model)
    own = model.state_dict()
    pairs = _key_pairs(model)
    add_null = config.num_classes is not None and num_class_embeds == config.num_classes
    expected = {}
    for ours, theirs, block in pairs:
        shape = tuple(own[ours].shape)
        if block is not None:
            shape = (shape[0] // 3,) + shape[1:]
        if ours == "label_emb.weight" and add_null:
            shape = (shape[0] - 1,) + shape[1:]
        expected[theirs] = shape
    check_state_dict(expected, state, "diffusers UNet2DModel")
    converted: dict[str, Any] = {}
    for ours, theirs, block in pairs:
        tensor = state[theirs]
        tensor = tensor.to(torch.float32) if tensor.is_floating_point() else tensor
        if block is None:
            converted[ours] = tensor
        else:
            converted.setdefault(ours, [None, None, None])[block] = tensor
    converted = {k: torch.cat(v) if isinstance(v, list) else v for k, v in converted.items()}
    if add_null:
        weight = converted["label_emb.weight"]
        converted["label_emb.weight"] = torch.cat([weight, weight.new_zeros(1, weight.shape[1])])
        warnings.warn(f"class-conditional diffusers model: added a zero row for diffcore's null class (label "
                      f"{config.num_classes}); it was not trained, so classifier-free guidance with it is not "
                      f"meaningful", stacklevel=2)
    model.load_state_dict(converted, strict=True)
    return model.eval()

