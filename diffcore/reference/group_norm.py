"""Pure-torch GroupNorm + per-sample scale-shift + SiLU: the twin of the fused ``group_norm_act`` op (its fallback,
its test oracle and, under autograd, its backward)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .ops import compute_dtype
from .philox import kernel_memory_format


def group_norm_act(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], num_groups: int,
                   eps: float = 1e-5, scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None,
                   silu: bool = False) -> torch.Tensor:
    """``F.group_norm`` in float32 (float64 for float64 x), then ``y * (1 + scale) + shift`` and ``silu``.

    Args: x ``[B, C, *spatial]``; weight, bias ``[C]`` or None; num_groups divides C; eps > 0; scale, shift
    ``[B, C]`` or None (broadcast over the spatial positions). Returns y ``[B, C, *spatial]`` in x's dtype, laid out
    as the fused kernel writes it (channels_last for a channels_last 4-D x, else contiguous). Mean and biased
    variance are taken over each group's C / num_groups channels and all positions of one image, as in torch.
    """
    dt = compute_dtype(x)
    # on a contiguous copy: torch's channels_last CPU GroupNorm loses precision when |mean| >> std (float32 at
    # mean 1000, std 1.5: errors of 0.2) and is slow
    y = F.group_norm(x.to(dt).contiguous(), num_groups, None if weight is None else weight.to(dt),
                     None if bias is None else bias.to(dt), eps)
    per_channel = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    if scale is not None:
        y = y * (1.0 + scale.to(dt).reshape(per_channel))
    if shift is not None:
        y = y + shift.to(dt).reshape(per_channel)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype).contiguous(memory_format=kernel_memory_format(x))
