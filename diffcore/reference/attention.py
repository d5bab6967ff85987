"""Pure-torch multi-head attention over packed q|k|v features: the twin of the fused ``attention_qkv`` op (its
fallback, its test oracle and, under autograd, its backward)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops import compute_dtype


def attention_qkv(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Softmax attention of every head, from packed features, in float32 (float64 for float64 qkv).

    Args: qkv ``[B, T, 3 * C]`` with features ordered (q | k | v, head, channel): q of head h is
    ``qkv[..., h*d:(h+1)*d]``, k at ``C + h*d``, v at ``2*C + h*d``, d = C / num_heads. Returns ``[B, T, C]``
    contiguous in qkv's dtype: ``out[b, i, h*d + c] = sum_j softmax_j(q_bhi . k_bhj / sqrt(d)) v_bhj[c]``, the
    softmax over the T keys (no mask), one rounding to qkv's dtype at the end.
    """
    batch, tokens, features = qkv.shape
    channels = features // 3
    head_dim = channels // num_heads
    dt = compute_dtype(qkv)
    # [B, T, 3, H, d] -> three [B, H, T, d]
    q, k, v = qkv.to(dt).reshape(batch, tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    if tokens == 0 or batch == 0:
        out = q
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(batch, tokens, channels).to(qkv.dtype).contiguous()
