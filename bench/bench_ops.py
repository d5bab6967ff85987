"""Each fused op against its pure-torch reference, side by side in one run, single-threaded on CPU.

Sizes: 256x3x32x32 (CIFAR batch) and 16x3x256x256. hybrid_loss is timed forward plus backward. The step ops
are timed with the noise passed in (both paths do the same work); ``ddim_step in-kernel noise`` times the
fused op drawing Philox noise against the reference drawing ``torch.randn`` (what an unfused sampler does).
Run: ``python -m pytest bench/bench_ops.py --benchmark-disable-gc``.
"""
from __future__ import annotations

import pytest
import torch

from diffcore import ops

from op_cases import make_table

SIZES = {"256x3x32x32": (256, 3, 32, 32), "16x3x256x256": (16, 3, 256, 256)}
IMPLS = ["fused", "reference"]

pytestmark = pytest.mark.skipif(not ops.fused_available("cpu"), reason="diffcore._C is not built")


def _inputs(shape, channels_mult=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    out_shape = (shape[0], shape[1] * channels_mult, *shape[2:])
    model_output = torch.randn(out_shape, generator=g).clamp(-1, 1)
    table = make_table(1000)
    t = torch.randint(0, 1000, (shape[0],), generator=g)
    return x, model_output, t, table


def _tag(benchmark, op, size, impl):
    benchmark.group = f"{op} {size}"
    benchmark.extra_info["impl"] = impl


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
def test_q_sample(benchmark, size, impl):
    x, noise, t, table = _inputs(SIZES[size])
    _tag(benchmark, "q_sample", size, impl)
    benchmark(ops.q_sample, x, noise, t, table, impl=impl)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step(benchmark, size, impl, eta):
    x, eps, t, table = _inputs(SIZES[size])
    noise = torch.randn_like(x)
    _tag(benchmark, f"ddim_step eta={eta}", size, impl)
    benchmark(ops.ddim_step, x, eps, t, (t - 20).clamp(min=-1), table, eta, noise=noise, impl=impl)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
def test_ddim_step_in_kernel_noise(benchmark, size, impl):
    x, eps, t, table = _inputs(SIZES[size])
    t_prev = (t - 20).clamp(min=-1)
    _tag(benchmark, "ddim_step eta=1 drawn noise", size, impl)
    if impl == "fused":
        benchmark(ops.ddim_step, x, eps, t, t_prev, table, 1.0, seed=1, impl="fused")
    else:  # an unfused sampler draws its noise with torch.randn
        benchmark(lambda: ops.ddim_step(x, eps, t, t_prev, table, 1.0, noise=torch.randn_like(x), impl="reference"))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
def test_ddpm_step(benchmark, size, impl, variance_type):
    mult = 2 if variance_type == "learned_range" else 1
    x, model_output, t, table = _inputs(SIZES[size], channels_mult=mult)
    noise = torch.randn_like(x)
    _tag(benchmark, f"ddpm_step {variance_type}", size, impl)
    benchmark(ops.ddpm_step, x, model_output, t, table, variance_type=variance_type, noise=noise, impl=impl)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
def test_hybrid_loss_forward_backward(benchmark, size, impl):
    x0, model_output, t, table = _inputs(SIZES[size], channels_mult=2)
    x0 = x0.clamp(-1, 1)
    noise = torch.randn_like(x0)
    x_t = ops.q_sample(x0, noise, t, table)
    _tag(benchmark, "hybrid_loss fwd+bwd", size, impl)

    def step():
        leaf = model_output.detach().requires_grad_(True)
        mse, vb = ops.hybrid_loss(leaf, x0, x_t, noise, t, table, impl=impl)
        (mse.mean() + vb.mean()).backward()
        return leaf.grad

    benchmark(step)
