"""The CUDA op benchmark cases, shared by bench_ops_cuda.py (pytest-benchmark) and gpu_report.py (a script).

Each case builds its inputs once (``numel`` elements per image-like tensor, default 64M = 256x4x256x256) and gives
three callables doing the same work (needs ``tests/`` on the path for the shared op tables: pytest puts it there,
scripts run with ``PYTHONPATH=tests``): the fused op (``impl="fused"``, no value checks: no host sync), the eager
pure-torch reference, and ``torch.compile`` of that reference. ``elements_moved`` counts the tensors a single
fused pass must read and write, in units of ``numel`` elements: bytes moved = elements_moved * numel * itemsize,
the figure compared with a device-to-device copy (which moves 2 * numel * itemsize bytes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from diffcore import ops, reference
from op_cases import make_table  # tests/op_cases.py: on the path under pytest (pyproject's pythonpath) or PYTHONPATH

NUMEL_64M = 64 * 2**20
T_TABLE = 1000


def shape_for(numel: int) -> tuple[int, int, int, int]:
    """An image batch [B, 4, H, H] with B * 4 * H * H == numel (numel a multiple of 4 * 64 * 64)."""
    if numel % (4 * 64 * 64):
        raise ValueError(f"numel: expected a multiple of 16384, got {numel}")
    side = 256 if numel % (4 * 256 * 256) == 0 else 64
    return (numel // (4 * side * side), 4, side, side)


@dataclass
class Case:
    """One op configuration; ``run(impl)`` returns a zero-argument callable for impl in IMPLS."""

    name: str
    elements_moved: int
    build: Callable[[torch.dtype, tuple, str], dict]
    calls: Callable[[dict], dict]  # inputs -> {"fused": f, "reference": f, "compiled": f}


IMPLS = ["fused", "reference", "compiled"]


def _base_inputs(dtype, shape, device, channels_mult=1, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)
    mo_shape = (shape[0], shape[1] * channels_mult, *shape[2:])
    model_output = torch.randn(mo_shape, generator=g, device=device, dtype=torch.float32).clamp(-1, 1).to(dtype)
    t = torch.randint(0, T_TABLE, (shape[0],), generator=g, device=device)
    return dict(x=x, model_output=model_output, t=t, table=make_table(T_TABLE, device=device))


def _compile(fn):
    return torch.compile(fn, dynamic=False)


def _q_sample(inp):
    args = (inp["x"], inp["model_output"], inp["t"], inp["table"])
    compiled = _compile(reference.q_sample)
    return {"fused": lambda: ops.q_sample(*args, impl="fused", check_values=False),
            "reference": lambda: reference.q_sample(*args), "compiled": lambda: compiled(*args)}


def _ddim(eta):
    def calls(inp):
        t_prev = (inp["t"] - 20).clamp(min=-1)
        args = (inp["x"], inp["model_output"], inp["t"], t_prev, inp["table"], eta)
        compiled = _compile(reference.ddim_step)
        return {"fused": lambda: ops.ddim_step(*args, seed=1, impl="fused", check_values=False),
                "reference": lambda: reference.ddim_step(*args, 0, False, None, 1, 0),
                "compiled": lambda: compiled(*args, 0, False, None, 1, 0)}
    return calls


def _ddpm(variance_type):
    def calls(inp):
        args = (inp["x"], inp["model_output"], inp["t"], inp["table"])
        compiled = _compile(reference.ddpm_step)
        return {"fused": lambda: ops.ddpm_step(*args, variance_type=variance_type, seed=1, impl="fused",
                                               check_values=False),
                "reference": lambda: reference.ddpm_step(*args, 0, variance_type, False, None, 1, 0),
                "compiled": lambda: compiled(*args, 0, variance_type, False, None, 1, 0)}
    return calls


def _loss_inputs(dtype, shape, device):
    inp = _base_inputs(dtype, shape, device, channels_mult=2)
    x0 = inp["x"].clamp(-1, 1)
    g = torch.Generator(device=device).manual_seed(1)
    noise = torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)
    x_t = reference.q_sample(x0, noise, inp["t"], inp["table"])
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    grad = torch.full((shape[0],), 1.0 / shape[0], device=device, dtype=acc)
    return dict(model_output=inp["model_output"], x0=x0, x_t=x_t, noise=noise, t=inp["t"], table=inp["table"],
                grad=grad)


def _loss_args(inp):
    return (inp["model_output"], inp["x0"], inp["x_t"], inp["noise"], inp["t"], inp["table"])


def _hybrid_forward(inp):
    args = _loss_args(inp)
    compiled = _compile(reference.hybrid_loss)
    return {"fused": lambda: ops.hybrid_loss(*args, impl="fused", check_values=False),
            "reference": lambda: reference.hybrid_loss(*args, 0, 2), "compiled": lambda: compiled(*args, 0, 2)}


def _hybrid_backward(inp):
    args = (inp["grad"], inp["grad"]) + _loss_args(inp)
    compiled = _compile(reference.hybrid_loss_backward)
    return {"fused": lambda: torch.ops.diffcore.hybrid_loss_backward(*args, 0, 2),
            "reference": lambda: reference.hybrid_loss_backward(*args, 0, 2),
            "compiled": lambda: compiled(*args, 0, 2)}


def _hybrid_train_step(inp):
    """Forward and backward through autograd, as in training (the gradient of mse + vb)."""
    leaf = inp["model_output"].detach().requires_grad_(True)
    rest = _loss_args(inp)[1:]

    def loss_fused():
        mse, vb = ops.hybrid_loss(leaf, *rest, impl="fused", check_values=False)
        return (mse + vb).sum()

    def loss_reference():
        mse, vb = reference.hybrid_loss(leaf, *rest, 0, 2)
        return (mse + vb).sum()

    compiled = _compile(loss_reference)

    def step(loss_fn):
        def run():
            leaf.grad = None
            loss_fn().backward()
        return run

    return {"fused": step(loss_fused), "reference": step(loss_reference), "compiled": step(compiled)}


def cases() -> list[Case]:
    """Every benchmarked op configuration (noise drawn in-kernel where the op takes noise)."""
    plain = lambda dtype, shape, device: _base_inputs(dtype, shape, device)
    learned = lambda dtype, shape, device: _base_inputs(dtype, shape, device, channels_mult=2)
    return [
        Case("q_sample", 3, plain, _q_sample),  # read x0, noise; write x_t
        Case("ddim_step eta=0", 4, plain, _ddim(0.0)),  # read x, eps; write x_prev, pred_x0
        Case("ddim_step eta=1", 4, plain, _ddim(1.0)),  # + Philox noise drawn in the kernel
        Case("ddpm_step fixed_small", 4, plain, _ddpm(0)),
        Case("ddpm_step learned_range", 5, learned, _ddpm(2)),  # + the variance channels
        Case("hybrid_loss forward", 5, _loss_inputs, _hybrid_forward),  # read eps, v, x0, x_t, noise
        Case("hybrid_loss backward", 7, _loss_inputs, _hybrid_backward),  # + write both gradients
        Case("hybrid_loss fwd+bwd", 12, _loss_inputs, _hybrid_train_step),
    ]


def copy_call(dtype: torch.dtype, shape: tuple, device: str) -> Callable[[], torch.Tensor]:
    """A device-to-device copy of one image-like tensor into a preallocated one (moves 2 * numel elements)."""
    src = torch.randn(shape, device=device, dtype=torch.float32).to(dtype)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def time_cuda(fn: Callable[[], object], iters: int = 10, repeats: int = 7, warmup: int = 3) -> float:
    """Median seconds per call over ``repeats`` CUDA-event timings of ``iters`` back-to-back calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / iters)
    times.sort()
    return times[len(times) // 2]


def time_host(fn: Callable[[], object], iters: int = 10, repeats: int = 7, warmup: int = 3) -> float:
    """Like time_cuda with a host clock (for a dry run of the scripts on CPU)."""
    import time

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        times.append((time.perf_counter() - start) / iters)
    times.sort()
    return times[len(times) // 2]


def max_abs_difference(a: object, b: object) -> Optional[float]:
    """Largest |a - b| over the tensors of two op results (tuples compared elementwise); None if not comparable."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        diffs = [max_abs_difference(x, y) for x, y in zip(a, b)]
        return None if any(d is None for d in diffs) else max(diffs, default=0.0)
    return None
