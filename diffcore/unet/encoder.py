"""ADM's noisy classifier: the U-Net's encoder (down path and middle block) with attention pooling to K logits, the
network of guided-diffusion's classifiers (Dhariwal & Nichol 2021, ``EncoderUNetModel`` with ``pool="attention"``),
built from diffcore's U-Net blocks.

Layout (module names follow ADM's, so a checkpoint maps onto it key for key, see
:mod:`diffcore.convert.adm_classifier`): ``time_embed`` (Linear, SiLU, Linear: ``model_channels -> 4 model_channels``);
``input_blocks.0`` a 3x3 conv to ``channel_mult[0] * model_channels`` channels; per level ``num_res_blocks`` residual
blocks (each followed by self-attention at the ``attention_resolutions``) and, between levels, a down-sampling
(a residual block with ``down`` when ``resblock_updown``, else a stride-2 conv); ``middle_block`` = residual block,
attention, residual block; ``out`` = GroupNorm, SiLU, :class:`AttentionPool2d`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import AttentionBlock, Downsample, EmbedSequential, ResBlock, conv3x3, normalization, timestep_embedding
from .config import UNetConfig

__all__ = ["EncoderConfig", "AttentionPool2d", "EncoderClassifier"]


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Hyper-parameters of :class:`EncoderClassifier` (the names of guided-diffusion's ``create_classifier``).

    Fields:
        image_size: input H = W in pixels. in_channels: C.
        model_channels: width of the timestep embedding's input (the embedding has ``4 * model_channels``
            features) and the unit of ``channel_mult``.
        channel_mult: width multiple per level (floats allowed, e.g. 0.5: guided-diffusion's 512x512 classifier);
            level i has ``int(channel_mult[i] * model_channels)`` channels; H must be a multiple of
            ``2 ** (len(channel_mult) - 1)``.
        num_res_blocks: residual blocks per level (``classifier_depth``).
        attention_resolutions: feature-map sizes in pixels with self-attention after each residual block
            (``classifier_attention_resolutions``, e.g. (32, 16, 8)); the middle block always has attention.
        num_head_channels: channels per attention head (64 in guided-diffusion), also of the pooling.
        use_scale_shift_norm, resblock_updown, conv_resample, dropout, norm_groups: as in :class:`UNetConfig`.
        num_classes: K, the number of logits.
    """

    image_size: int = 64
    in_channels: int = 3
    model_channels: int = 128
    channel_mult: tuple[float, ...] = (1, 2, 3, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    num_head_channels: int = 64
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    conv_resample: bool = True
    dropout: float = 0.0
    norm_groups: int = 32
    num_classes: int = 1000

    def __post_init__(self) -> None:
        for name in ("image_size", "in_channels", "model_channels", "num_res_blocks", "num_head_channels",
                     "norm_groups", "num_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        mult = self.channel_mult
        if isinstance(mult, (str, bytes)) or not isinstance(mult, (tuple, list)) or not mult or any(
                isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0 for m in mult):
            raise ValueError(f"channel_mult: expected a non-empty sequence of numbers > 0, got {mult!r}")
        object.__setattr__(self, "channel_mult", tuple(mult))
        widths = [m * self.model_channels for m in mult]
        if any(w != int(w) for w in widths):
            raise ValueError(f"channel_mult: every channel_mult[i] * model_channels must be a whole number, got "
                             f"{widths}")
        if self.image_size % self.size_multiple:
            raise ValueError(f"image_size: expected a multiple of {self.size_multiple} ({len(mult)} levels), got "
                             f"{self.image_size}")
        res = self.attention_resolutions
        if isinstance(res, (str, bytes)) or not isinstance(res, (tuple, list)) or any(
                isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in res):
            raise ValueError(f"attention_resolutions: expected a sequence of ints >= 1, got {res!r}")
        object.__setattr__(self, "attention_resolutions", tuple(res))
        for name in ("use_scale_shift_norm", "resblock_updown", "conv_resample"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "dropout", float(self.dropout))
        for width in set(self.level_channels):
            self.block_config.heads_for(width, "a level")

    @property
    def size_multiple(self) -> int:
        """H and W must be multiples of this: ``2 ** (len(channel_mult) - 1)``."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def level_channels(self) -> tuple[int, ...]:
        """Channels of each level: ``int(channel_mult[i] * model_channels)``."""
        return tuple(int(m * self.model_channels) for m in self.channel_mult)

    @property
    def pooled_size(self) -> int:
        """H = W of the feature map the pooling sees: ``image_size // 2 ** (len(channel_mult) - 1)``."""
        return self.image_size // self.size_multiple

    @property
    def block_config(self) -> UNetConfig:
        """The :class:`UNetConfig` the shared blocks read (embedding width, norm groups, heads, conditioning)."""
        return UNetConfig(in_channels=self.in_channels, model_channels=self.model_channels, channel_mult=(1,),
                          num_res_blocks=1, attention_resolutions=(), image_size=self.image_size,
                          dropout=self.dropout, num_head_channels=self.num_head_channels,
                          use_scale_shift_norm=self.use_scale_shift_norm, conv_resample=self.conv_resample,
                          norm_groups=self.norm_groups)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict of every field; :meth:`from_dict` inverts it."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EncoderConfig":
        """Build a config from :meth:`to_dict`'s output; unknown keys raise a ValueError listing them."""
        if not isinstance(data, Mapping):
            raise TypeError(f"data: expected a mapping of EncoderConfig fields, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in data if k not in names)
        if unknown:
            raise ValueError(f"data: unknown EncoderConfig keys {unknown}; valid keys are {names}")
        return cls(**dict(data))


class AttentionPool2d(nn.Module):
    """Attention pooling (CLIP's, as guided-diffusion's classifiers use it): ``[B, C, H, W] -> [B, out_features]``.

    The tokens are the mean of the H*W positions followed by the positions, ``[B, 1 + HW, C]``, plus a learned
    ``positional_embedding`` ``[1 + HW, C]``; multi-head attention (``C / head_channels`` heads, qkv features
    ordered (q|k|v, head, channel)) of the mean token over all tokens, then the linear ``c_proj`` to
    ``out_features``. H = W = ``spatial_size``.
    """

    def __init__(self, spatial_size: int, channels: int, head_channels: int, out_features: int):
        super().__init__()
        if channels % head_channels:
            raise ValueError(f"head_channels: {channels} channels are not a multiple of {head_channels}")
        self.num_heads = channels // head_channels
        self.positional_embedding = nn.Parameter(torch.randn(spatial_size ** 2 + 1, channels) / math.sqrt(channels))
        self.qkv_proj = nn.Linear(channels, 3 * channels)
        self.c_proj = nn.Linear(channels, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        tokens = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        tokens = tokens + self.positional_embedding.to(tokens.dtype)
        qkv = self.qkv_proj(tokens).unflatten(-1, (3, self.num_heads, c // self.num_heads))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, 1 + HW, d]
        pooled = F.scaled_dot_product_attention(q[:, :, :1], k, v)  # only the mean token's output is used
        return self.c_proj(pooled.reshape(b, c))


class EncoderClassifier(nn.Module):
    """ADM's noisy classifier ``classifier(x_t [B, C, H, W], t [B]) -> logits [B, K]`` (see the module notes).

    Args:
        config: an :class:`EncoderConfig`. Attributes: ``config``, ``num_classes`` (K).
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        if not isinstance(config, EncoderConfig):
            raise TypeError(f"config: expected an EncoderConfig, got {type(config).__name__}")
        self.config, self.num_classes = config, config.num_classes
        blocks = config.block_config
        emb_dim = blocks.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(config.model_channels, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))
        widths = config.level_channels
        ch = widths[0]
        self.input_blocks = nn.ModuleList([EmbedSequential(conv3x3(config.in_channels, ch))])
        size = config.image_size
        for level, width in enumerate(widths):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(blocks, ch, width)]
                ch = width
                if size in config.attention_resolutions:
                    layers.append(AttentionBlock(blocks, ch))
                self.input_blocks.append(EmbedSequential(*layers))
            if level != len(widths) - 1:
                down = ResBlock(blocks, ch, ch, down=True) if config.resblock_updown else \
                    Downsample(ch, config.conv_resample)
                self.input_blocks.append(EmbedSequential(down))
                size //= 2
        self.middle_block = EmbedSequential(ResBlock(blocks, ch, ch), AttentionBlock(blocks, ch),
                                            ResBlock(blocks, ch, ch))
        self.out = nn.Sequential(normalization(blocks, ch), nn.SiLU(),
                                 AttentionPool2d(config.pooled_size, ch, config.num_head_channels,
                                                 config.num_classes))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, K]`` (the parameters' dtype) for x ``[B, in_channels, image_size, image_size]`` (float) at
        timesteps t ``[B]`` (int64 original steps, or float)."""
        cfg = self.config
        expected = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != expected:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected a tensor [B, {', '.join(map(str, expected))}], got {got}")
        if not isinstance(t, torch.Tensor) or t.shape != (x.shape[0],):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"t: expected a tensor [{x.shape[0]}] of timesteps, got {got}")
        weight = self.time_embed[0].weight
        emb = self.time_embed(timestep_embedding(t, cfg.model_channels).to(weight.dtype))
        h = x.to(weight.dtype)
        for block in self.input_blocks:
            h = block(h, emb)
        return self.out(self.middle_block(h, emb))
