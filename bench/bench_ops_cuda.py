"""Each fused CUDA op at 64M elements (fp32 and bf16): bandwidth against a device-to-device copy measured in the
same run, and time against the eager reference and torch.compile of the reference. Skipped without CUDA.

Every timed call runs the op ``ITERS`` times back to back and then synchronizes, so the timing covers the GPU
work (the sync overhead is spread over ITERS ops). At the end a table gives, per op and dtype: ms per op, GB/s,
the fraction of the copy bandwidth (target >= 0.85) and the speedups over eager and compiled (target >= 1).
Run: ``python -m pytest bench/bench_ops_cuda.py --benchmark-disable-gc``; ``DIFFCORE_BENCH_NUMEL`` changes the
size (a multiple of 16384), ``DIFFCORE_BENCH_NO_COMPILE=1`` skips the compiled reference.
For a JSON + markdown report without pytest: ``python bench/gpu_report.py``.
"""
from __future__ import annotations

import os

import pytest
import torch

from diffcore import ops

from cuda_op_cases import IMPLS, NUMEL_64M, cases, copy_call, shape_for

ITERS = 10
NUMEL = int(os.environ.get("DIFFCORE_BENCH_NUMEL", NUMEL_64M))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CASES = {case.name: case for case in cases()}

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and ops.fused_available("cuda")),
                                reason="needs a CUDA device and diffcore built with its CUDA kernels")

_results: dict = {}  # (op, dtype) -> {impl: seconds per op}


def _timed(benchmark, fn):
    def run():
        for _ in range(ITERS):
            fn()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=2)
    return benchmark.stats.stats.median / ITERS


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or not _results:
        return
    reporter.section(f"diffcore CUDA ops at {NUMEL / 2**20:.0f}M elements ({torch.cuda.get_device_name()})")
    reporter.write_line(f"{'op':28s} {'dtype':5s} {'ms':>8s} {'GB/s':>7s} {'/copy':>6s} {'vs eager':>9s} "
                        f"{'vs compiled':>12s}")
    for (name, dtype_name), times in sorted(_results.items()):
        if name == "copy" or "fused" not in times:
            continue
        itemsize = torch.empty((), dtype=DTYPES[dtype_name]).element_size()
        fused = times["fused"]
        bandwidth = CASES[name].elements_moved * NUMEL * itemsize / fused
        copy = _results.get(("copy", dtype_name), {}).get("copy")
        copy_bw = 2 * NUMEL * itemsize / copy if copy else float("nan")
        eager, compiled = times.get("reference"), times.get("compiled")
        vs_eager = eager / fused if eager else float("nan")
        vs_compiled = compiled / fused if compiled else float("nan")
        reporter.write_line(f"{name:28s} {dtype_name:5s} {fused * 1e3:8.3f} {bandwidth / 1e9:7.0f} "
                            f"{bandwidth / copy_bw:6.2f} {vs_eager:8.2f}x {vs_compiled:11.2f}x")


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_copy(benchmark, dtype_name):
    benchmark.group = f"cuda copy {dtype_name}"
    benchmark.extra_info["impl"] = "copy"
    fn = copy_call(DTYPES[dtype_name], shape_for(NUMEL), "cuda")
    _results.setdefault(("copy", dtype_name), {})["copy"] = _timed(benchmark, fn)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("name", CASES)
def test_op(benchmark, name, dtype_name, impl):
    if impl == "compiled" and os.environ.get("DIFFCORE_BENCH_NO_COMPILE") == "1":
        pytest.skip("DIFFCORE_BENCH_NO_COMPILE=1")
    case = CASES[name]
    benchmark.group = f"cuda {name} {dtype_name}"
    benchmark.extra_info["impl"] = impl
    itemsize = torch.empty((), dtype=DTYPES[dtype_name]).element_size()
    benchmark.extra_info["bytes_moved"] = case.elements_moved * NUMEL * itemsize
    inputs = case.build(DTYPES[dtype_name], shape_for(NUMEL), "cuda")
    fn = case.calls(inputs)[impl]
    try:
        _results.setdefault((name, dtype_name), {})[impl] = _timed(benchmark, fn)
    finally:
        del inputs, fn
        torch.cuda.empty_cache()
