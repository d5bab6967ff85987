"""group_norm_act (GroupNorm + SiLU, fused) against torch's ``F.silu(F.group_norm(...))`` in the same dtype and
memory layout, single-threaded on CPU: the U-Net's normalization at batch 64 (GroupNorm32 on 32x28x28 and
64x14x14 activations), in bfloat16 and float32, channels_last and NCHW.

The torch path is timed under the "reference" label so that the session summary prints torch / fused.
Run: ``OMP_NUM_THREADS=1 python -m pytest bench/bench_group_norm.py --benchmark-disable-gc``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffcore import ops

SHAPES = {"64x32x28x28": (64, 32, 28, 28), "64x64x14x14": (64, 64, 14, 14)}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LAYOUTS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}
GROUPS = 32

pytestmark = pytest.mark.skipif(not ops.fused_available("cpu"), reason="diffcore._C is not built")


def _inputs(shape, dtype, memory_format):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=memory_format)
    weight = (1 + 0.1 * torch.randn(shape[1], generator=g)).to(dtype)
    bias = (0.1 * torch.randn(shape[1], generator=g)).to(dtype)
    return x, weight, bias


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", ["fused", "torch"])
def test_group_norm_silu(benchmark, shape, dtype, layout, impl):
    x, weight, bias = _inputs(SHAPES[shape], DTYPES[dtype], LAYOUTS[layout])
    if impl == "fused":
        fn = lambda: ops.group_norm_act(x, weight, bias, GROUPS, silu=True, impl="fused")  # noqa: E731
    else:
        fn = lambda: F.silu(F.group_norm(x, GROUPS, weight, bias))  # noqa: E731
    benchmark.group = f"group_norm+silu {shape} {dtype} {layout}"
    benchmark.extra_info["impl"] = "fused" if impl == "fused" else "reference"
    out = benchmark(fn)
    assert out.is_contiguous(memory_format=LAYOUTS[layout])
