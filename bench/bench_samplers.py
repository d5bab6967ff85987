"""Per-step overhead of the sampler loops with a trivial model, fused step ops against the pure-torch reference.

Run: ``python -m pytest bench/bench_samplers.py --benchmark-disable-gc --benchmark-columns=median,iqr,rounds``
(single-threaded; compare medians of the fused and reference rows of one run). Each benchmark runs STEPS steps
of a sampler on a CIFAR-size batch; ``extra_info`` records the per-step median (ms) and the number of aten ops
dispatched per step (on CUDA each is at least one kernel launch; the fused step is one op).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffcore import ops
from diffcore.diffusion import GaussianDiffusion
from diffcore.samplers import ddim_sample, ddpm_sample
from diffcore.schedules import make_schedule

SHAPE = (256, 3, 32, 32)
STEPS = 5
DIFFUSION = GaussianDiffusion(make_schedule("linear", 1000), "eps", "fixed_small")
X_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


def zeros_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The trivial model: eps_hat = 0 (cost: one allocation)."""
    return torch.zeros_like(x)


SAMPLERS = ("ddim_eta0", "ddim_eta1", "ddpm")


def run_sampler(sampler: str, impl: str, steps: int = STEPS):
    """``steps`` steps of a sampler from the fixed x_T (DDPM on the process respaced to ``steps`` steps)."""
    if sampler == "ddpm":
        return ddpm_sample(zeros_model, DIFFUSION, x_T=X_T, steps=steps, seed=0, progress=False, impl=impl)
    eta = 1.0 if sampler == "ddim_eta1" else 0.0
    return ddim_sample(zeros_model, DIFFUSION, x_T=X_T, steps=steps, eta=eta, seed=0, progress=False, impl=impl)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _ops_per_step(run) -> float:
    """aten ops dispatched per step (the model's zeros_like included), from a STEPS-step and a 2-step run."""
    counts = []
    for steps in (STEPS, 2):
        with _CountOps() as counter:
            run(steps)
        counts.append(counter.count)
    return (counts[0] - counts[1]) / (STEPS - 2)


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_loop(benchmark, sampler, impl):
    if impl == "fused" and not ops.fused_available("cpu"):
        pytest.skip("the fused CPU kernels are not built")
    benchmark.group = f"{sampler} loop, {STEPS} steps, {'x'.join(map(str, SHAPE))}"
    result = benchmark.pedantic(run_sampler, args=(sampler, impl), rounds=5, iterations=1, warmup_rounds=1)
    assert torch.isfinite(result.sample).all()
    benchmark.extra_info["ms_per_step_median"] = benchmark.stats.stats.median * 1000 / STEPS
    benchmark.extra_info["aten_ops_per_step"] = _ops_per_step(lambda steps: run_sampler(sampler, impl, steps))
