"""The U-Net's layers (improved-diffusion / ADM design): timestep embedding, GroupNorm in float32, residual
blocks conditioned on the embedding, multi-head self-attention, and 2x down- / up-sampling.

All blocks take and return ``[B, C, H, W]`` tensors in any memory format (channels_last is kept where torch
keeps it) and any float dtype; under ``torch.autocast`` convs, linears and attention run in the low precision
while GroupNorm statistics and the timestep embedding stay in float32.

Speed (inference): when autograd is off (``torch.no_grad`` / ``inference_mode``) on a CPU with diffcore's
kernels built, each GroupNorm with what follows it (the scale-shift, SiLU) is one fused op
(:func:`diffcore.ops.group_norm_act`, two passes over memory in either layout, float32 statistics), and the
residual add runs in place; with autograd on, or on other devices, the same formulas run as separate torch ops
(:meth:`GroupNorm32.act`). The fused op's float32 arithmetic equals the separate ops' to float32 rounding.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..runtime import cpu_features
from .config import UNetConfig

__all__ = ["timestep_embedding", "GroupNorm32", "fused_group_norm", "Downsample", "Upsample", "ResBlock",
           "AttentionBlock", "EmbedSequential", "zero_module", "upsample_conv3x3",
           "fused_attention"]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps (Transformer / DDPM / improved-diffusion convention).

    Args:
        t: ``[B]`` timesteps, int64 (the original, unrescaled steps 0..T-1) or float.
        dim: embedding width; with ``half = dim // 2`` and ``f_i = max_period ** (-i / half)`` for i < half,
            the result is ``[cos(t f_0), ..., cos(t f_{half-1}), sin(t f_0), ..., sin(t f_{half-1})]``, plus
            one zero column when ``dim`` is odd.
        max_period: the longest period, in timesteps.

    Returns:
        float32 ``[B, dim]`` on ``t``'s device (computed in float32 as improved-diffusion does, also under autocast).
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero (improved-diffusion's init of output layers) and return it."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 (keeps H, W at stride 1, halves them at stride 2)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)


def silu_of_fresh(x: torch.Tensor) -> torch.Tensor:
    """SiLU, in place on ``x`` when autograd is off (``x`` must then be a fresh intermediate)."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with float32 statistics, returning the input dtype. ``[B, C, H, W] -> [B, C, H, W]``.

    float32/float64 inputs are normalized in their dtype. A bf16 input on the CPU goes straight to torch's kernel,
    which accumulates mean and variance in float32 and takes the float32 weight (same error as the round trip
    through float32, without its two casts); other half-precision inputs are upcast to float32 and cast back.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and self.weight is not None:
            with torch.autocast("cpu", enabled=False):
                return F.group_norm(x, self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        weight, bias = self.weight, self.bias
        if weight is not None and weight.dtype != xf.dtype:
            weight, bias = weight.to(xf.dtype), bias.to(xf.dtype)
        return F.group_norm(xf, self.num_groups, weight, bias, self.eps).to(x.dtype)

    def act(self, x: torch.Tensor, *, scale: "torch.Tensor | None" = None, shift: "torch.Tensor | None" = None,
            silu: bool = False) -> torch.Tensor:
        """``GN(x) * (1 + scale) + shift``, then SiLU when ``silu``: ``[B, C, H, W] -> [B, C, H, W]`` in x's dtype
        and memory format. ``scale``, ``shift``: ``[B, C]`` per-image factors (both or neither).

        One fused op (:func:`diffcore.ops.group_norm_act`) when autograd is off and x is on a CPU with diffcore's
        kernels built; separate torch ops otherwise (the scale-shift and SiLU in place when autograd is off).
        """
        if fused_group_norm(x) and self.weight is not None:
            return ops.group_norm_act(x, self.weight, self.bias, self.num_groups, eps=self.eps, scale=scale,
                                      shift=shift, silu=silu)
        h = self(x)
        if scale is not None:
            h = torch.addcmul(shift[:, :, None, None], h, 1 + scale[:, :, None, None])
        return silu_of_fresh(h) if silu else h


def fused_group_norm(x: torch.Tensor) -> bool:
    """Whether :meth:`GroupNorm32.act` runs the fused op for ``x``: autograd off, x on a CPU, kernels built.

    GPUs keep torch's GroupNorm, SiLU and addcmul kernels: the fused op's CUDA kernel has not run on a GPU yet, so
    the U-Net does not use it there until it has been measured (see issue 16).
    """
    return not torch.is_grad_enabled() and x.device.type == "cpu" and ops.fused_available("cpu")


def fused_attention(qkv: torch.Tensor) -> bool:
    """Whether :class:`AttentionBlock` runs :func:`diffcore.ops.attention_qkv` on ``qkv``: autograd off, qkv on a
    CPU, kernels built (as :func:`fused_group_norm`; GPUs keep torch's flash attention)."""
    return fused_group_norm(qkv)


def normalization(config: UNetConfig, channels: int) -> GroupNorm32:
    """GroupNorm for ``channels`` with ``config.groups_for(channels)`` groups (32 when it divides)."""
    return GroupNorm32(config.groups_for(channels), channels)


class Downsample(nn.Module):
    """Halve H and W: a stride-2 3x3 conv (``use_conv``) or 2x2 average pooling. ``[B,C,H,W] -> [B,C,H/2,W/2]``."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = conv3x3(channels, channels, stride=2) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour repetition, then a 3x3 conv when ``use_conv``. ``-> [B,C,2H,2W]``.

    Inference on a CPU (autograd off) runs the conv as :func:`upsample_conv3x3`: the same numbers (exactly, up to
    the order of the sums) from 4/9 of the multiplications.
    """

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.conv = conv3x3(channels, channels) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None and not torch.is_grad_enabled() and x.device.type == "cpu":
            return upsample_conv3x3(x, self.conv.weight, self.conv.bias)
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.conv is not None else x


#: How a 3x3 kernel applied to a 2x nearest-upsampled image reads the source image, per output phase (even or
#: odd output row; the same for columns): ``PHASE_TAPS[phase][tap][k]`` is 1 where kernel row k lands on source
#: row ``i - 1 + phase + tap`` for output row ``2 i + phase``. Even rows read rows i-1, i with taps (w0, w1 + w2);
#: odd rows read rows i, i+1 with taps (w0 + w1, w2).
PHASE_TAPS = (((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0)))


def upsample_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: "torch.Tensor | None") -> torch.Tensor:
    """``conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)`` without upsampling.

    Each of the four output phases (row parity a, column parity b) is a 2x2 convolution of x itself with the 3x3
    taps summed as :data:`PHASE_TAPS` says: 16 multiplications per source pixel and channel pair instead of 36.
    Phase (a, b) convolves rows a..a+H, columns b..b+W of x zero-padded by one pixel; four strided copies
    interleave the phases. (Four convolutions of C_out channels measured faster than one of 4 C_out on the
    (H+1) x (W+1) grid of a padding-1 conv: 8.4 vs 10.0 ms at [64, 64, 14, 14] bf16, one thread.)

    Args:
        x: ``[B, C_in, H, W]``, any float dtype and memory format (also under autocast, which the conv follows).
        weight: ``[C_out, C_in, 3, 3]``; bias: ``[C_out]`` or None.

    Returns:
        ``[B, C_out, 2H, 2W]`` in the conv's dtype and x's memory format (channels_last stays channels_last).
        Equal to the upsample-then-conv result in exact arithmetic (float64: 2e-14 apart); in float32 the sums are
        ordered differently (differences at float32 rounding).
    """
    out_channels = weight.shape[0]
    batch, _, height, width = x.shape
    with torch.autocast(x.device.type, enabled=False):  # fold the taps in float32 (float64 for float64 weights)
        folding = torch.float64 if weight.dtype == torch.float64 else torch.float32
        taps = torch.tensor(PHASE_TAPS, dtype=folding, device=weight.device)
        phase_weight = torch.einsum("atk,bsl,oikl->aboits", taps, taps, weight.to(folding))
        phase_weight = phase_weight.to(weight.dtype)  # [2 (row phase), 2 (column phase), C_out, C_in, 2, 2]
    padded = F.pad(x, (1, 1, 1, 1))
    nhwc = x.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if nhwc else torch.contiguous_format
    # each phase [B, C_out, H, W]; the explicit layout keeps torch.compile from choosing NCHW for the padded slices
    phases = {(a, b): F.conv2d(padded[:, :, a:a + height + 1, b:b + width + 1].contiguous(memory_format=layout),
                               phase_weight[a, b], bias)
              for a in (0, 1) for b in (0, 1)}
    dtype = phases[0, 0].dtype
    if nhwc:  # output pixel (2i + a, 2j + b) of channel c at [n, i, a, j, b, c]
        out = torch.empty((batch, height, 2, width, 2, out_channels), dtype=dtype, device=x.device)
        for (a, b), phase in phases.items():
            out[:, :, a, :, b, :] = phase.permute(0, 2, 3, 1)
        return out.view(batch, 2 * height, 2 * width, out_channels).permute(0, 3, 1, 2)
    out = torch.empty((batch, out_channels, height, 2, width, 2), dtype=dtype, device=x.device)
    for (a, b), phase in phases.items():
        out[:, :, :, a, :, b] = phase
    return out.view(batch, out_channels, 2 * height, 2 * width)


class ResBlock(nn.Module):
    """Residual block conditioned on the embedding (improved-diffusion's ResBlock, BigGAN up/down optional).

    ``h = conv(SiLU(GN(x)))``; then with scale-shift norm ``h = GN(h) * (1 + scale) + shift`` where
    ``(scale, shift) = Linear(SiLU(emb))``, else ``h = GN(h + Linear(SiLU(emb)))``; then
    ``h = conv_zero(dropout(SiLU(h)))`` and the result is ``skip(x) + h`` (skip: identity when the channels
    match, else a 1x1 conv). With ``up``/``down`` both branches are resampled by nearest 2x / 2x2 average
    pooling (the h branch after its first norm and SiLU). The last conv starts at zero, so a fresh block is
    ``skip(x)``.

    Shapes: x ``[B, channels, H, W]``, emb ``[B, config.time_embed_dim]`` -> ``[B, out_channels, H', W']``.
    """

    def __init__(self, config: UNetConfig, channels: int, out_channels: int, *, up: bool = False,
                 down: bool = False):
        super().__init__()
        if up and down:
            raise ValueError("up, down: a ResBlock resamples one way; got up=True and down=True")
        self.use_scale_shift_norm = config.use_scale_shift_norm
        self.in_norm = normalization(config, channels)
        self.in_conv = conv3x3(channels, out_channels)
        self.resample = Upsample(channels, False) if up else Downsample(channels, False) if down else None
        emb_out = 2 * out_channels if config.use_scale_shift_norm else out_channels
        self.emb_proj = nn.Linear(config.time_embed_dim, emb_out)
        self.out_norm = normalization(config, out_channels)
        self.dropout = nn.Dropout(config.dropout)
        self.out_conv = zero_module(conv3x3(out_channels, out_channels))
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_norm.act(x, silu=True)
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = self.in_conv(h)
        e = self.emb_proj(F.silu(emb)).to(h.dtype)
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm.act(h, scale=scale, shift=shift, silu=True)
        else:
            h = self.out_norm.act(h + e[:, :, None, None], silu=True)
        h = self.out_conv(self.dropout(h))
        skip = self.skip(x)
        if torch.is_grad_enabled() or skip.dtype != h.dtype:
            return skip + h
        return h.add_(skip)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection.

    ``tokens = GN(x)`` as ``[B, HW, C]``; ``q, k, v = Linear(tokens)`` split into ``num_heads`` heads of
    ``d = C / num_heads`` channels (the 3C qkv features are ordered (q|k|v, head, channel));
    ``out = softmax(q k^T / sqrt(d)) v`` per head through ``F.scaled_dot_product_attention``, heads
    concatenated, then a zero-initialized output projection; returns ``x + out`` as ``[B, C, H, W]``.
    ``upsample`` marks a block on the U-Net's way up (heads from ``config.num_heads_upsample`` when set).

    Inference on a CPU with diffcore's kernels (autograd off) runs the attention as one fused op on the packed
    qkv, :func:`diffcore.ops.attention_qkv` (float32 inside, one rounding to x's dtype; 1.6-1.8x torch's at the
    packaged model's 49 tokens, no reshapes or casts around it). Elsewhere it is ``F.scaled_dot_product_attention``;
    on a CPU without AMX, bfloat16 / float16 q, k, v (autocast, half weights) are then attended in float32 and
    the result cast back: torch's CPU attention is no faster in bf16 there (1.33x slower at [64, 4, 49, 16],
    level at 196-1024 tokens; bench/RESULTS.md), and float32 softmax is the more accurate.
    """

    def __init__(self, config: UNetConfig, channels: int, *, upsample: bool = False):
        super().__init__()
        self.num_heads = config.heads_for(channels, upsample=upsample)
        self.float32_on_cpu = not cpu_features().amx  # a plain bool: torch.compile treats it as a constant
        self.norm = normalization(config, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        tokens = self.norm.act(x).flatten(2).transpose(1, 2)  # [B, T, C]; a view for channels_last input
        qkv = self.qkv(tokens)  # [B, T, 3C]
        if fused_attention(qkv):
            out = ops.attention_qkv(qkv, self.num_heads)  # [B, T, C]
        else:
            q, k, v = qkv.unflatten(-1, (3, self.num_heads, c // self.num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
            out = self.attend(q, k, v).transpose(1, 2).reshape(b, height * width, c)  # from [B, heads, T, d]
        out = self.proj_out(out)  # [B, T, C]
        return x + out.transpose(1, 2).reshape(b, c, height, width)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``softmax(q k^T / sqrt(d)) v`` for ``[B, heads, T, d]`` q, k, v; float32 inside on a CPU without AMX
        when they are 16-bit (see the class docstring), returned in q's dtype."""
        if self.float32_on_cpu and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
            with torch.autocast("cpu", enabled=False):
                return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v)


class EmbedSequential(nn.Sequential):
    """A sequence of layers where :class:`ResBlock` s also receive the embedding: ``forward(x, emb)``."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x
