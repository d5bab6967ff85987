"""attention_qkv (fused multi-head attention from packed q|k|v) against torch's
``F.scaled_dot_product_attention`` on the same data reshaped to [B, heads, T, d], single-threaded on CPU: the
U-Net's 7x7 attention at batch 64 ([64, 49, 3 * 64], 4 heads of 16) and a longer sequence ([16, 256, 3 * 128],
4 heads of 32), in float32 and bfloat16. The torch path does what diffcore/unet/blocks.py AttentionBlock does
(the reshape, float32 inside for 16-bit inputs, the result back to [B, T, C] in the input's dtype).

The torch path is timed under the "reference" label so that the session summary prints torch / fused.
Run: ``OMP_NUM_THREADS=1 python -m pytest bench/bench_attention.py --benchmark-disable-gc``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffcore import ops

SHAPES = {"64x49x192": (64, 49, 192), "16x256x384": (16, 256, 384)}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
HEADS = 4

pytestmark = pytest.mark.skipif(not ops.fused_available("cpu"), reason="diffcore._C is not built")


def torch_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """AttentionBlock's path: [B, T, 3C] -> q, k, v [B, heads, T, d] -> SDPA (float32 for 16-bit) -> [B, T, C]."""
    b, t, features = qkv.shape
    c = features // 3
    q, k, v = qkv.reshape(b, t, 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    if qkv.dtype in (torch.bfloat16, torch.float16):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(qkv.dtype)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, t, c)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", ["fused", "torch"])
def test_attention(benchmark, shape, dtype, impl):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(SHAPES[shape], generator=g).to(DTYPES[dtype])
    if impl == "fused":
        fn = lambda: ops.attention_qkv(qkv, HEADS, impl="fused")  # noqa: E731
    else:
        fn = lambda: torch_attention(qkv, HEADS)  # noqa: E731
    benchmark.group = f"attention {shape} {dtype}"
    benchmark.extra_info["impl"] = "fused" if impl == "fused" else "reference"
    out = benchmark(fn)
    assert out.shape == (qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3)
