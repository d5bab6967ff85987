"""The U-Net's configuration: a frozen, validated, JSON-friendly dataclass that checkpoints store.

The field names follow improved-diffusion / guided-diffusion (``model_channels``, ``channel_mult``,
``num_res_blocks``, ``attention_resolutions``, ``use_scale_shift_norm``, ``resblock_updown``, ...), with one
difference: ``attention_resolutions`` holds resolutions in pixels (16 means "at the 16x16 feature maps of a
32x32 model"), as improved-diffusion's command line takes them, not the downsampling factors its model class takes.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

__all__ = ["UNetConfig"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not _is_int(value):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")


def _int_tuple(name: str, value: Any, minimum: int, allow_empty: bool, distinct: bool) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
        raise TypeError(f"{name}: expected a tuple or list of ints, got {type(value).__name__} {value!r}")
    if not value and not allow_empty:
        raise ValueError(f"{name}: expected at least one entry, got an empty sequence")
    for i, item in enumerate(value):
        if not _is_int(item):
            raise TypeError(f"{name}[{i}]: expected an int, got {type(item).__name__} {item!r}")
        if item < minimum:
            raise ValueError(f"{name}[{i}]: expected an int >= {minimum}, got {item}")
    if distinct and len(set(value)) != len(value):
        raise ValueError(f"{name}: expected distinct values, got {list(value)}")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of :class:`diffcore.unet.UNet` (improved-diffusion / ADM design).

    Fields:
        in_channels: image channels C (3 for RGB, 1 for grayscale).
        model_channels: base width; level ``i`` has ``model_channels * channel_mult[i]`` channels, and the
            timestep embedding has ``4 * model_channels`` features.
        channel_mult: width multiplier per resolution level; ``len(channel_mult)`` levels, so the input is
            downsampled ``len(channel_mult) - 1`` times by 2 and H, W must be multiples of
            ``2 ** (len(channel_mult) - 1)``.
        num_res_blocks: residual blocks per level on the way down (``num_res_blocks + 1`` on the way up).
        attention_resolutions: feature-map sizes in pixels (relative to ``image_size``) where self-attention
            follows each residual block, e.g. ``(16,)`` for a 32x32 model. The middle block always has attention.
        image_size: the training resolution in pixels (square images). Inputs of other sizes are accepted when
            H and W are multiples of ``2 ** (len(channel_mult) - 1)``; attention then stays at the same depth.
        dropout: dropout probability inside the residual blocks, in [0, 1).
        learn_sigma: when True the model outputs 2C channels (the prediction, then the variance output v used
            by learned / learned_range variances); see :attr:`out_channels`.
        num_heads: attention heads per block (used when ``num_head_channels`` is None).
        num_head_channels: when set, channels per head instead; each attention block then has
            ``channels // num_head_channels`` heads and ``num_heads`` is ignored (guided-diffusion's rule).
        use_scale_shift_norm: ADM's conditioning ``GroupNorm(h) * (1 + scale) + shift`` with (scale, shift)
            from the timestep embedding; when False the embedding is added before the norm (DDPM).
        resblock_updown: BigGAN-style residual blocks do the down/up-sampling instead of plain layers.
        conv_resample: down-sample with a stride-2 3x3 conv (else 2x2 average pooling) and follow the nearest
            up-sampling with a 3x3 conv (else nothing).
        num_classes: number of classes for class conditioning, or None. The embedding has ``num_classes + 1``
            rows: label ``num_classes`` is the null class (unconditional) for classifier-free guidance.
        norm_groups: the most GroupNorm groups; a layer with C channels uses the largest divisor of C that is
            ``<= norm_groups`` (32 as in improved-diffusion; fewer for small C, e.g. 24 for 48, 3 for 3).
        num_heads_upsample: attention heads of the blocks on the way up (the output blocks) when
            ``num_head_channels`` is None; None means ``num_heads`` (improved-diffusion's ``num_heads_upsample=-1``).
            The middle block and the way down use ``num_heads``.
        timestep_scale: the model embeds ``t * timestep_scale`` (float32) instead of t; 1.0 (the default) embeds
            the integer steps as they are. improved-diffusion's ``rescale_timesteps=True`` models were trained on
            ``t * 1000 / T`` (T the original number of steps), i.e. ``timestep_scale = 1000 / T`` (0.25 for its
            4000-step models).

    ``to_dict`` / ``from_dict`` give a JSON-friendly dict (lists instead of tuples) and back; every value is
    validated at construction and a bad one raises a TypeError/ValueError naming the field.
    """

    in_channels: int = 3
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    image_size: int = 32
    dropout: float = 0.0
    learn_sigma: bool = False
    num_heads: int = 4
    num_head_channels: Optional[int] = None
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    conv_resample: bool = True
    num_classes: Optional[int] = None
    norm_groups: int = 32
    num_heads_upsample: Optional[int] = None
    timestep_scale: float = 1.0

    # ----------------------------------------------------------------------------------------- validation
    def __post_init__(self) -> None:
        _check_int("in_channels", self.in_channels, 1)
        _check_int("model_channels", self.model_channels, 1)
        object.__setattr__(self, "channel_mult", _int_tuple("channel_mult", self.channel_mult, 1, False, False))
        _check_int("num_res_blocks", self.num_res_blocks, 1)
        object.__setattr__(self, "attention_resolutions",
                           _int_tuple("attention_resolutions", self.attention_resolutions, 1, True, True))
        _check_int("image_size", self.image_size, 1)
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool):
            raise TypeError(f"dropout: expected a float, got {type(self.dropout).__name__} {self.dropout!r}")
        if not (0.0 <= float(self.dropout) < 1.0):
            raise ValueError(f"dropout: expected a probability in [0, 1), got {self.dropout}")
        object.__setattr__(self, "dropout", float(self.dropout))
        _check_bool("learn_sigma", self.learn_sigma)
        _check_int("num_heads", self.num_heads, 1)
        if self.num_head_channels is not None:
            _check_int("num_head_channels", self.num_head_channels, 1)
        _check_bool("use_scale_shift_norm", self.use_scale_shift_norm)
        _check_bool("resblock_updown", self.resblock_updown)
        _check_bool("conv_resample", self.conv_resample)
        if self.num_classes is not None:
            _check_int("num_classes", self.num_classes, 1)
        _check_int("norm_groups", self.norm_groups, 1)
        if self.num_heads_upsample is not None:
            _check_int("num_heads_upsample", self.num_heads_upsample, 1)
        if (not isinstance(self.timestep_scale, (int, float)) or isinstance(self.timestep_scale, bool)
                or not math.isfinite(self.timestep_scale) or not self.timestep_scale > 0):
            raise ValueError(f"timestep_scale: expected a finite float > 0 (1000 / T for improved-diffusion's "
                             f"rescale_timesteps=True models, else 1.0), got {self.timestep_scale!r}")
        object.__setattr__(self, "timestep_scale", float(self.timestep_scale))

        multiple = self.size_multiple
        if self.image_size % multiple:
            raise ValueError(f"image_size: expected a multiple of 2**(len(channel_mult) - 1) = {multiple} "
                             f"(channel_mult={list(self.channel_mult)} has {self.num_levels} levels), "
                             f"got {self.image_size}")
        reachable = [self.image_size // 2**level for level in range(self.num_levels)]
        for res in self.attention_resolutions:
            if res not in reachable:
                raise ValueError(f"attention_resolutions: {res} is not a feature-map size of this model; with "
                                 f"image_size={self.image_size} and {self.num_levels} levels the sizes are "
                                 f"{reachable}")
        for level, channels in enumerate(self.level_channels):
            if level in self.attention_levels:
                self.heads_for(channels, where=f"level {level} ({reachable[level]}px)")
                self.heads_for(channels, where=f"level {level} ({reachable[level]}px) on the way up", upsample=True)
        self.heads_for(self.level_channels[-1], where="the middle block")

    # ------------------------------------------------------------------------------------ derived values
    @property
    def out_channels(self) -> int:
        """Output channels: ``2 * in_channels`` with ``learn_sigma`` (prediction, then variance output), else C."""
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def num_levels(self) -> int:
        """Number of resolution levels, ``len(channel_mult)``."""
        return len(self.channel_mult)

    @property
    def size_multiple(self) -> int:
        """H and W of an input must be multiples of this: ``2 ** (num_levels - 1)``."""
        return 2 ** (self.num_levels - 1)

    @property
    def time_embed_dim(self) -> int:
        """Width of the timestep (and class) embedding: ``4 * model_channels``."""
        return 4 * self.model_channels

    @property
    def level_channels(self) -> tuple[int, ...]:
        """Channels of the residual blocks at each level: ``model_channels * channel_mult[i]``."""
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def attention_levels(self) -> frozenset[int]:
        """Levels (0 = full resolution) whose residual blocks are followed by self-attention."""
        return frozenset(int(math.log2(self.image_size // res)) for res in self.attention_resolutions)

    def heads_for(self, channels: int, where: str = "an attention block", upsample: bool = False) -> int:
        """Number of attention heads of a block with ``channels`` channels (validates divisibility); ``upsample``
        for the blocks on the way up, which use ``num_heads_upsample`` when it is set."""
        if self.num_head_channels is not None:
            if channels % self.num_head_channels:
                raise ValueError(f"num_head_channels: {where} has {channels} channels, not a multiple of "
                                 f"num_head_channels={self.num_head_channels}")
            return channels // self.num_head_channels
        name, heads = "num_heads", self.num_heads
        if upsample and self.num_heads_upsample is not None:
            name, heads = "num_heads_upsample", self.num_heads_upsample
        if channels % heads:
            raise ValueError(f"{name}: {where} has {channels} channels, not a multiple of {name}={heads}")
        return heads

    def groups_for(self, channels: int) -> int:
        """GroupNorm groups for ``channels``: the largest divisor of ``channels`` that is <= ``norm_groups``."""
        return max(g for g in range(1, min(self.norm_groups, channels) + 1) if channels % g == 0)

    # ------------------------------------------------------------------------------------- serialization
    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict of every field (tuples become lists); ``from_dict`` inverts it."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "UNetConfig":
        """Build a config from ``to_dict()``'s output (e.g. read from a checkpoint's JSON).

        Missing keys take the defaults; unknown keys raise a ValueError listing them and the valid keys.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"data: expected a mapping of UNetConfig fields, got {type(data).__name__}")
        names = [field.name for field in dataclasses.fields(cls)]
        if "out_channels" in data:
            raise ValueError("data: 'out_channels' is not a field; it is derived as in_channels * "
                             "(2 if learn_sigma else 1), so set in_channels and learn_sigma instead")
        unknown = sorted(str(key) for key in data if key not in names)
        if unknown:
            raise ValueError(f"data: unknown UNetConfig keys {unknown}; valid keys are {names}")
        return cls(**dict(data))

    # ------------------------------------------------------------------------------------------ presets
    @classmethod
    def cifar10(cls, **overrides: Any) -> "UNetConfig":
        """The CIFAR-10 size model (DDPM's / improved-diffusion's layout at 32x32x3), 35,749,766 parameters.

        128 channels, multipliers (1, 2, 2, 2), 2 residual blocks per level, attention at 16x16 with 4 heads,
        dropout 0.1, learn_sigma. ``use_scale_shift_norm=False`` keeps it the 35.7M-parameter network of
        Ho et al. (their 35,746,307 plus 3,459 for the variance output channels); pass
        ``use_scale_shift_norm=True`` for ADM's conditioning (38,310,662 parameters). Any field can be
        overridden by keyword.
        """
        base = dict(in_channels=3, model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                    attention_resolutions=(16,), image_size=32, dropout=0.1, learn_sigma=True, num_heads=4,
                    num_head_channels=None, use_scale_shift_norm=False, resblock_updown=False,
                    conv_resample=True, num_classes=None, norm_groups=32)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def fashion_mnist_small(cls, **overrides: Any) -> "UNetConfig":
        """A small model for 28x28 grayscale images (Fashion-MNIST at its native size, no padding).

        32 channels, multipliers (1, 2, 2) (feature maps 28, 14, 7), 2 residual blocks per level, attention at
        7x7 (and in the middle block, also 7x7) with 4 heads, scale-shift norm, dropout 0.1, learn_sigma
        (2 output channels). About 1.6M parameters; see bench/bench_unet.py for its speed. Any field can be
        overridden by keyword (e.g. ``num_classes=10`` for class conditioning).
        """
        base = dict(in_channels=1, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2,
                    attention_resolutions=(7,), image_size=28, dropout=0.1, learn_sigma=True, num_heads=4,
                    num_head_channels=None, use_scale_shift_norm=True, resblock_updown=False,
                    conv_resample=True, num_classes=None, norm_groups=32)
        base.update(overrides)
        return cls(**base)
