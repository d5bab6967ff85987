"""The denoising U-Net (improved-diffusion / ADM design) and its config.

``UNet(UNetConfig.cifar10())`` is the CIFAR-10 size model; ``UNetConfig.fashion_mnist_small()`` the small
28x28 grayscale one. ``model(x, t, y)`` maps noisy images x ``[B, C, H, W]``, per-sample timesteps t int64
``[B]`` and optional class labels y int64 ``[B]`` to ``[B, out_channels, H, W]`` (the prediction, then the
variance output when ``learn_sigma``), in x's dtype.

Layout (improved-diffusion's UNetModel): a 3x3 conv to ``model_channels``; per level ``num_res_blocks``
residual blocks (each followed by self-attention at the chosen resolutions) and a 2x downsampling except at
the last level; a middle block (ResBlock, attention, ResBlock); per level in reverse ``num_res_blocks + 1``
residual blocks that take the matching down-path activation concatenated on the channels, with a 2x
upsampling after each level but the first; GroupNorm, SiLU and a zero-initialized 3x3 conv to the output.
Every residual branch ends in a zero-initialized conv (or linear), so a freshly built model outputs exactly 0.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .blocks import (AttentionBlock, Downsample, EmbedSequential, ResBlock, Upsample, conv3x3, fused_group_norm,
                     normalization, timestep_embedding, zero_module)
from .config import UNetConfig

__all__ = ["UNet", "UNetConfig", "timestep_embedding"]


class UNet(nn.Module):
    """Diffusion U-Net with timestep embedding, scale-shift norm, multi-head attention and class conditioning.

    Args:
        config: a :class:`UNetConfig` (e.g. ``UNetConfig.cifar10()``); stored as ``self.config``.

    With ``config.num_classes = K`` the label embedding has K + 1 rows; label K is the null class
    (unconditional), for classifier-free guidance: ``model(x, t, torch.full_like(t, K))``.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise TypeError(f"config: expected a UNetConfig (e.g. UNetConfig.cifar10()), got {type(config).__name__}")
        self.config = config
        emb_dim = config.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(config.model_channels, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))
        self.label_emb = (nn.Embedding(config.num_classes + 1, emb_dim) if config.num_classes is not None
                          else None)

        ch = config.model_channels
        last = config.num_levels - 1
        self.input_blocks = nn.ModuleList([EmbedSequential(conv3x3(config.in_channels, ch))])
        skip_channels = [ch]
        for level, width in enumerate(config.level_channels):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(config, ch, width)]
                ch = width
                if level in config.attention_levels:
                    layers.append(AttentionBlock(config, ch))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != last:
                down = (ResBlock(config, ch, ch, down=True) if config.resblock_updown
                        else Downsample(ch, config.conv_resample))
                self.input_blocks.append(EmbedSequential(down))
                skip_channels.append(ch)

        self.middle_block = EmbedSequential(ResBlock(config, ch, ch), AttentionBlock(config, ch),
                                            ResBlock(config, ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, width in reversed(list(enumerate(config.level_channels))):
            for i in range(config.num_res_blocks + 1):
                layers = [ResBlock(config, ch + skip_channels.pop(), width)]
                ch = width
                if level in config.attention_levels:
                    layers.append(AttentionBlock(config, ch, upsample=True))
                if level and i == config.num_res_blocks:
                    layers.append(ResBlock(config, ch, ch, up=True) if config.resblock_updown
                                  else Upsample(ch, config.conv_resample))
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(normalization(config, ch), nn.SiLU(),
                                 zero_module(conv3x3(ch, config.out_channels)))

    @property
    def null_class(self) -> Optional[int]:
        """The label of the null (unconditional) class, ``config.num_classes``; None without conditioning."""
        return self.config.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Predict from noisy images.

        Args:
            x: ``[B, in_channels, H, W]`` float images (any memory format); H and W multiples of
                ``config.size_multiple`` (usually ``config.image_size``).
            t: ``[B]`` timesteps on x's device: int64 original steps 0..T-1 (not rescaled), or float; the model
                itself multiplies them by ``config.timestep_scale`` when that is not 1.
            y: ``[B]`` int64 class labels in ``0..num_classes`` (``num_classes`` = null class) when the model is
                class-conditional; must be None otherwise.

        Returns:
            ``[B, config.out_channels, H, W]`` in x's dtype (also under autocast): the prediction (C channels),
            then with ``learn_sigma`` the variance output (C channels).
        """
        self._check_inputs(x, t, y)
        if self.config.timestep_scale != 1.0:  # improved-diffusion's rescale_timesteps: t * 1000 / T
            t = t.to(torch.float32) * self.config.timestep_scale
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(self.time_embed[0].weight.dtype))
        if self.label_emb is not None:
            emb = emb + self.label_emb(y)
        # channels_last where the fused GroupNorm runs: the convs then read and write NHWC directly instead of
        # reordering every activation to oneDNN's blocked layout and back.
        # (torch.compile lays out the graph's input itself: there the first conv writes NCHW and its output is
        # converted, as :func:`channels_last`'s strides would not survive.)
        fast = fused_group_norm(x)
        h = self.input_blocks[0](channels_last(x) if fast and not torch.compiler.is_compiling() else x, emb)
        if fast:
            h = h.contiguous(memory_format=torch.channels_last)  # a no-op after channels_last(x)
        skips = [h]
        for block in self.input_blocks[1:]:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        norm, _, conv = self.out
        out = conv(norm.act(h, silu=True)).to(x.dtype)
        return out.contiguous() if fast and x.is_contiguous() else out

    def _check_inputs(self, x, t, y) -> None:
        cfg = self.config
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor [B, C, H, W], got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"x: expected a 4-D tensor [B, C, H, W], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
        b, c, height, width = x.shape
        if c != cfg.in_channels:
            raise ValueError(f"x: expected {cfg.in_channels} channels (config.in_channels), got shape "
                             f"{tuple(x.shape)}")
        m = cfg.size_multiple
        if height < 1 or width < 1 or height % m or width % m:
            raise ValueError(f"x: expected H and W to be positive multiples of {m} (2**(len(channel_mult) - 1), "
                             f"the model downsamples {cfg.num_levels - 1} times; config.image_size is "
                             f"{cfg.image_size}), got H={height}, W={width}")
        weight = self.out[2].weight
        if x.device != weight.device:
            raise ValueError(f"x: expected a tensor on {weight.device} (where the model is), got one on {x.device}")
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x: expected dtype {weight.dtype} (the model's; or run under torch.autocast), "
                            f"got {x.dtype}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"t: expected an int64 tensor [B] of timesteps, got {type(t).__name__}")
        if t.dtype != torch.int64 and not t.is_floating_point():
            raise TypeError(f"t: expected an int64 (or floating) tensor of timesteps, got {t.dtype}")
        if t.shape != (b,):
            raise ValueError(f"t: expected shape ({b},) (one timestep per sample of x), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"t: expected a tensor on {x.device} (where x is), got one on {t.device}")
        if cfg.num_classes is None:
            if y is not None:
                raise ValueError("y: this model is not class-conditional (config.num_classes is None); pass y=None")
            return
        if y is None:
            raise ValueError(f"y: this model is class-conditional (config.num_classes={cfg.num_classes}); pass "
                             f"labels [B], or torch.full(({b},), {cfg.num_classes}) for the null class")
        if not isinstance(y, torch.Tensor) or y.dtype != torch.int64:
            got = y.dtype if isinstance(y, torch.Tensor) else type(y).__name__
            raise TypeError(f"y: expected an int64 tensor of class labels, got {got}")
        if y.shape != (b,):
            raise ValueError(f"y: expected shape ({b},) (one label per sample of x), got {tuple(y.shape)}")
        if y.device != x.device:
            raise ValueError(f"y: expected a tensor on {x.device} (where x is), got one on {y.device}")
        # Reading values is free on CPU; on accelerators it would be a host-device sync, so it is skipped there.
        if y.device.type == "cpu" and y.numel() and not torch.compiler.is_compiling():
            low, high = int(y.min()), int(y.max())
            if low < 0 or high > cfg.num_classes:
                raise ValueError(f"y: expected labels in [0, {cfg.num_classes}] ({cfg.num_classes} = null class), "
                                 f"got values in [{low}, {high}]")


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` x with NHWC strides, so that a conv of it writes NHWC: a copy, or for one channel a view.

    With one channel torch keeps NCHW strides in ``x.contiguous(memory_format=torch.channels_last)`` (both layouts
    hold the same bytes), and a conv of it then writes NCHW; the view with strides ``(H W, 1, W, 1)`` is read as
    NHWC (the first conv of the packaged model then takes 0.5 instead of 3-4 ms in bf16 with the copy to NHWC after).
    """
    if x.shape[1] == 1:
        height, width = x.shape[2], x.shape[3]
        return x.contiguous().as_strided(x.shape, (height * width, 1, width, 1))
    return x.contiguous(memory_format=torch.channels_last)
