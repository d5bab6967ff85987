"""The fused CUDA ops: the checks of the CPU op tests (tests/test_ops.py), run on a GPU; skipped without one.

Every op is held against the pure-torch reference on CUDA and against the fused CPU kernels on the same values
(dtypes, contiguous / channels_last / strided inputs, odd sizes, batch 0 and 1, t = 0 and T-1), with the noise
drawn in the kernel from the same seed on both devices. Also: sizes that span several tiles per sample (the
two-stage hybrid-loss reduction) and misaligned inputs (the scalar path), the bitwise determinism of the
reduction, the fp16/bf16 precision rule, opcheck, torch.compile, CUDA-graph capture and replay, gradcheck,
device errors and guards, and timesteps out of range (clamped by the kernels, which read no value on the host).
The logic of the same kernels also runs without a GPU in tests/test_cuda_emulation.py.
"""
from __future__ import annotations

import pytest
import torch

from diffcore import ops, reference
from diffcore.reference import formulas
from op_cases import DTYPES, T_STEPS, layout, loss_inputs, make_table, random_images, timesteps, tolerance

HAS_CUDA = torch.cuda.is_available() and ops.fused_available("cuda")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and diffcore built with its CUDA kernels")]
LAYOUTS = ["contiguous", "channels_last", "strided"]
DEV = "cuda"


def _on(value, device, kind="contiguous"):
    """A CPU value on ``device``: image tensors (dim >= 2) in layout ``kind``, other tensors as they are."""
    if not isinstance(value, torch.Tensor):
        return value
    moved = value.to(device)
    return layout(moved.contiguous(), kind) if value.dim() >= 2 else moved


def _three(fn, args, kind="contiguous", noise=None, **kwargs):
    """(fused on CUDA, reference on CUDA, fused on CPU) results of fn on the same values."""
    def call(device, impl):
        extra = {} if noise is None else {"noise": _on(noise, device, kind)}
        return fn(*[_on(a, device, kind) for a in args], impl=impl, **extra, **kwargs)

    return call(DEV, "fused"), call(DEV, "reference"), call("cpu", "fused")


def _close(got, expected, dtype, **tol):
    got, expected = got.cpu(), expected.cpu()
    if dtype != torch.float64:
        got, expected = got.float(), expected.float()
    torch.testing.assert_close(got, expected, **(tol or tolerance(dtype)), equal_nan=True)


def _all_close(results, dtype, **tol):
    """Each output of the fused CUDA result against the reference on CUDA and the fused CPU result."""
    fused, ref, cpu = [r if isinstance(r, tuple) else (r,) for r in results]
    for i, out in enumerate(fused):
        assert out.device.type == "cuda" and out.dtype == ref[i].dtype and out.shape == ref[i].shape
        _close(out, ref[i], dtype, **tol)
        _close(out, cpu[i], dtype, **tol)


# ---------------------------------------------------------------- fused CUDA vs reference and vs CPU


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_q_sample(dtype, kind):
    args = [random_images((5, 3, 7, 9), dtype), random_images((5, 3, 7, 9), dtype, seed=1), timesteps(5), make_table()]
    _all_close(_three(ops.q_sample, args, kind), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_ddim_step(dtype, kind, prediction_type):
    t = timesteps(6)
    args = [random_images((6, 3, 5, 7), dtype), random_images((6, 3, 5, 7), dtype, seed=2), t, t - 7, make_table()]
    z = random_images((6, 3, 5, 7), dtype, seed=4)
    for eta, clip, noise in [(0.0, False, None), (0.5, True, None), (1.0, False, None), (1.0, False, z)]:
        seeds = {} if noise is not None else {"seed": 11, "offset": 3}
        results = _three(ops.ddim_step, args + [eta], kind, noise=noise, prediction_type=prediction_type,
                         clip_denoised=clip, **seeds)
        _all_close(results, dtype)
    # the reverse (inversion) direction
    up = [args[0], args[1], t.clamp(max=T_STEPS - 8), t.clamp(max=T_STEPS - 8) + 7, args[4], 0.0]
    _all_close(_three(ops.ddim_step, up, kind, prediction_type=prediction_type), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range", "learned"])
def test_ddpm_step(dtype, kind, variance_type):
    channels = 6 if variance_type.startswith("learned") else 3
    args = [random_images((5, 3, 4, 6), dtype), random_images((5, channels, 4, 6), dtype, seed=3, scale=0.5), timesteps(5),
            make_table()]
    z = random_images((5, 3, 4, 6), dtype, seed=4)
    for prediction_type, clip, noise in [("eps", False, None), ("x0", True, None), ("v", False, z)]:
        seeds = {} if noise is not None else {"seed": 5, "offset": 1}
        results = _three(ops.ddpm_step, args, kind, noise=noise, prediction_type=prediction_type,
                         variance_type=variance_type, clip_denoised=clip, **seeds)
        _all_close(results, dtype)


def _loss_results(args, kind, prediction_type, variance_type, runs=((DEV, "fused"), (DEV, "reference"),
                                                                      ("cpu", "fused"))):
    """Per-sample (mse, vb) and d(sum w mse + w^2 vb)/d model_output for each (device, impl) in runs."""
    out = []
    for device, impl in runs:
        model_output, *rest = [_on(a, device, kind) for a in args]
        leaf = model_output.detach().clone().requires_grad_(True)
        mse, vb = ops.hybrid_loss(leaf, *rest, prediction_type=prediction_type, variance_type=variance_type,
                                  impl=impl)
        w = torch.linspace(0.5, 2.0, mse.shape[0], dtype=mse.dtype, device=device)
        ((mse * w).sum() + (vb * w**2).sum()).backward()
        out.append((mse.detach(), vb.detach(), leaf.grad))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("variance_type", ["learned_range", "learned"])
def test_hybrid_loss_forward_and_backward(dtype, kind, variance_type):
    """flash-attention's rule against the float64 reference on the same (rounded) inputs: the CUDA kernel's error
    is at most twice that of the fused CPU kernel or of the same-dtype reference, plus a few ulps. (A fixed
    tolerance does not fit: with x0-prediction at t = 0 the decoder term's gradient is ill-conditioned and the
    closed-form and autograd gradients differ by ~4e-5 relative in float32, ~5e-10 in float64.)"""
    args = loss_inputs(dtype, "contiguous", variance_type=variance_type)
    exact_args = [a.double() if a.is_floating_point() and a.dim() >= 2 else a for a in args]
    for prediction_type in ["eps", "x0", "v"]:
        fused, ref, cpu = _loss_results(args, kind, prediction_type, variance_type)
        (exact,) = _loss_results(exact_args, "contiguous", prediction_type, variance_type, (("cpu", "reference"),))
        for i, name in enumerate(["mse", "vb", "grad"]):
            assert fused[i].dtype == ref[i].dtype and fused[i].shape == ref[i].shape, name
            err = lambda r: (r[i].cpu().double() - exact[i]).abs().max().item() if exact[i].numel() else 0.0
            floor = 4 * torch.finfo(fused[i].dtype).eps * exact[i].abs().max().item()
            assert err(fused) <= 2 * max(err(ref), err(cpu)) + floor, (prediction_type, name, err(fused), err(ref),
                                                                       err(cpu))


@pytest.mark.parametrize("dtype", DTYPES)
def test_several_tiles_per_sample_and_misaligned_rows(dtype):
    """Rows longer than one tile (4096 float / 8192 half elements): the hybrid loss takes the two-stage reduction;
    a view one element past an aligned address takes the scalar path."""
    for shape in [(3, 3, 48, 48), (2, 3, 64, 65)]:
        args = loss_inputs(dtype, batch=shape[0], shape=shape[1:])
        fused, _, cpu = _loss_results(args, "contiguous", "eps", "learned_range")
        rtol = 1e-10 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(fused[0].cpu(), cpu[0], rtol=rtol, atol=rtol)
        torch.testing.assert_close(fused[1].cpu(), cpu[1], rtol=rtol, atol=rtol)
        _close(fused[2], cpu[2], dtype)
    x = random_images((4, 3, 16, 16), dtype)
    eps = random_images((4, 3, 16, 16), dtype, seed=1)
    t, table = timesteps(4), make_table()
    shifted = lambda v: torch.cat([v.flatten()[:1], v.flatten()])[1:].view(v.shape)  # storage offset 1
    for device in (DEV, "cpu"):
        xs, es = shifted(x.to(device)), shifted(eps.to(device))
        assert xs.storage_offset() == 1 and torch.equal(xs.cpu(), x)
    results = _three(lambda a, b, *rest, **kw: ops.ddim_step(shifted(a), shifted(b), *rest, **kw),
                     [x, eps, t, t - 3, table, 1.0], seed=9)
    _all_close(results, dtype)


def test_hybrid_loss_reduction_is_deterministic():
    args = [_on(a, DEV) for a in loss_inputs(torch.float32, batch=3, shape=(3, 64, 64))]
    first = ops.hybrid_loss(*args)
    for _ in range(3):
        again = ops.hybrid_loss(*args)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("batch", [0, 1])
def test_small_batches(batch):
    x = random_images((batch, 2, 3, 3), torch.float32)
    t, table = timesteps(batch), make_table()
    _all_close(_three(ops.q_sample, [x, x, t, table]), torch.float32)
    _all_close(_three(ops.ddim_step, [x, x, t, t - 1, table, 1.0], seed=1), torch.float32)
    _all_close(_three(ops.ddpm_step, [x, x, t, table], seed=1), torch.float32)
    args = loss_inputs(torch.float32, batch=batch)
    _all_close(_three(ops.hybrid_loss, args), torch.float32, rtol=1e-5, atol=1e-5)


def test_trailing_shapes_and_odd_sizes():
    table = make_table()
    for shape in [(3, 1), (4, 13), (2, 3, 5, 7, 2), (3, 1, 1, 1), (2, 4099)]:
        x, n, t = random_images(shape, torch.float32), random_images(shape, torch.float32, seed=1), timesteps(shape[0])
        _all_close(_three(ops.q_sample, [x, n, t, table]), torch.float32)
        _all_close(_three(ops.ddim_step, [x, n, t, t - 1, table, 0.3], seed=2), torch.float32)


# ---------------------------------------------------------------- in-kernel noise, precision


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_in_kernel_noise_equals_the_cpu_noise(dtype):
    """ddpm_step of x = eps = 0 at t = T-1 is sigma z: the GPU draws the CPU's z for the same seed (up to the
    rounding of the Box-Muller functions), and the same z again for the same seed."""
    table = make_table()
    for shape in [(16, 3, 64, 65), (5, 7)]:  # many groups; rows that end inside a Philox group
        x = torch.zeros(shape, dtype=dtype)
        t = torch.full((shape[0],), T_STEPS - 1)
        run = lambda device, seed: ops.ddpm_step(x.to(device), x.to(device), t.to(device), table.to(device),
                                                 seed=seed, offset=2, impl="fused")[0]
        gpu, cpu = run(DEV, 77), run("cpu", 77)
        tol = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}
        _close(gpu, cpu, dtype, **tol.get(dtype, {}))
        assert torch.equal(gpu, run(DEV, 77)) and not torch.equal(gpu, run(DEV, 78))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_in_kernel_noise_with_first_row_is_the_cpu_noise_of_those_images(dtype):
    """Rows drawn with first_row = r are rows r .. of the whole batch, on the GPU as on the CPU (ddim eta > 0 and
    ddpm, vectorized rows and rows that end inside a Philox group)."""
    table = make_table()
    for shape in [(9, 3, 8, 8), (9, 7)]:
        x = random_images(shape, dtype)
        t = timesteps(shape[0]).clamp(min=1)
        def run(device, rows, first_row):
            args = [v.to(device)[rows] for v in (x, x, t)]
            ddim = ops.ddim_step(*args[:3], args[2] - 1, table.to(device), 1.0, seed=5, offset=3,
                                 first_row=first_row, impl="fused")
            ddpm = ops.ddpm_step(*args, table.to(device), seed=5, offset=3, first_row=first_row, impl="fused")
            return ddim + ddpm
        whole = run("cpu", slice(None), 0)
        for got, want in zip(run(DEV, slice(4, 9), 4), whole):
            _close(got, want[4:], dtype, **({"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_at_most_twice_plain_torch(dtype):
    """flash-attention's rule on the GPU: error vs fp64 at most ~2x that of the formula in plain low precision."""
    x, eps = random_images((8, 3, 16, 16), torch.float64).to(DEV), random_images((8, 3, 16, 16), torch.float64, seed=1).to(DEV)
    t, table = timesteps(8, device=DEV), make_table(device=DEV)
    exact = reference.q_sample(x.clamp(-1, 1), eps, t, table)
    fused = ops.q_sample(x.clamp(-1, 1).to(dtype), eps.to(dtype), t, table, impl="fused")
    plain = formulas.q_sample(x.clamp(-1, 1).to(dtype), eps.to(dtype), formulas.per_sample(table[t], x).to(dtype))
    assert (fused.double() - exact).abs().max() <= 2.0 * (plain.double() - exact).abs().max() + 1e-6
    t_prev = (t - 5).clamp(min=-1)
    exact_x, _ = reference.ddim_step(x, eps, t, t_prev, table, 0.0)
    fused_x, _ = ops.ddim_step(x.to(dtype), eps.to(dtype), t, t_prev, table, 0.0, impl="fused")
    abar = formulas.per_sample(table[t], x).to(dtype)
    abar_s = formulas.per_sample(torch.where(t_prev >= 0, table[t_prev.clamp(min=0)], torch.ones_like(table[t])), x)
    abar_s = abar_s.to(dtype)
    plain_x = abar_s.sqrt() * formulas.x0_from_eps(x.to(dtype), eps.to(dtype), abar) + (1 - abar_s).sqrt() * eps.to(dtype)
    finite = torch.isfinite(plain_x)
    assert torch.isfinite(fused_x).all() and finite.float().mean() > 0.5
    err_fused = (fused_x.double() - exact_x)[finite].abs().max().item()
    err_plain = (plain_x.double() - exact_x)[finite].abs().max().item()
    assert err_fused <= 2.0 * err_plain + 1e-6, (err_fused, err_plain)


# ---------------------------------------------------------------- opcheck, compile, graphs, autograd


def test_opcheck_every_op():
    table = make_table(device=DEV)
    x = random_images((3, 2, 4, 4), torch.float32).to(DEV)
    mo = random_images((3, 4, 4, 4), torch.float32, scale=0.5).clamp(-1, 1).to(DEV)
    big = random_images((2, 2, 64, 64), torch.float32).to(DEV)  # two tiles per sample
    big_mo = torch.cat([big, big.clamp(-1, 1)], 1)
    t, g = timesteps(3, device=DEV), torch.ones(3, device=DEV)
    cases = [
        (torch.ops.diffcore.q_sample, (x, x, t, table)),
        (torch.ops.diffcore.ddim_step, (x, x, t, t - 1, table, 0.5, 0, True, None, 3, 1)),
        (torch.ops.diffcore.ddim_step, (x, x, t, t - 1, table, 0.5, 2, False, x, 0, 0)),
        (torch.ops.diffcore.ddpm_step, (x, mo, t, table, 0, 2, False, None, 3, 0)),
        (torch.ops.diffcore.hybrid_loss, (mo.clone().requires_grad_(True), x.clamp(-1, 1), x, x, t, table, 0, 2)),
        (torch.ops.diffcore.hybrid_loss, (big_mo, big.clamp(-1, 1), big, big, t[:2], table, 0, 3)),
        (torch.ops.diffcore.hybrid_loss_backward, (g, g, mo.detach(), x.clamp(-1, 1), x, x, t, table, 1, 2)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
    cl = x.contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.diffcore.ddim_step, (cl, cl, t, t - 1, table, 0.0, 0, False, None, 0, 0))


def test_torch_compile_fullgraph():
    table, t = make_table(device=DEV), timesteps(4, device=DEV)
    x, eps = random_images((4, 3, 8, 8), torch.float32).to(DEV), random_images((4, 3, 8, 8), torch.float32, seed=1).to(DEV)

    def two_steps(x, eps):
        x1, _ = ops.ddim_step(x, eps, t, t - 1, table, 1.0, seed=3, impl="fused", check_values=False)
        return ops.ddpm_step(x1, eps, (t - 1).clamp(min=0), table, seed=3, offset=1, impl="fused",
                             check_values=False)

    got = torch.compile(two_steps, fullgraph=True)(x, eps)
    expected = two_steps(x, eps)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])


def _capture(fn):
    """A CUDA graph of fn() after warm-up on a side stream; returns (graph, static outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def test_cuda_graph_replay_equals_eager():
    table, t = make_table(device=DEV), timesteps(8, device=DEV)
    t_prev = (t - 5).clamp(min=-1)
    x = random_images((8, 3, 32, 32), torch.float32).to(DEV)
    eps = random_images((8, 3, 32, 32), torch.float32, seed=1).to(DEV)
    step = lambda: ops.ddim_step(x, eps, t, t_prev, table, 1.0, seed=5, offset=3, impl="fused", check_values=False)
    graph, (x_prev, pred_x0) = _capture(step)
    for seed in (2, 3):  # new values in the static inputs, then replay
        x.copy_(random_images((8, 3, 32, 32), torch.float32, seed=seed).to(DEV))
        graph.replay()
        expected = step()
        assert torch.equal(x_prev, expected[0]) and torch.equal(pred_x0, expected[1])
    # the hybrid loss with its workspace (several tiles per sample) inside a graph
    args = [_on(a, DEV) for a in loss_inputs(torch.float32, batch=3, shape=(3, 64, 64))]
    loss = lambda: ops.hybrid_loss(*args, impl="fused", check_values=False)
    graph, (mse, vb) = _capture(loss)
    graph.replay()
    expected = loss()
    assert torch.equal(mse, expected[0]) and torch.equal(vb, expected[1])


def test_hybrid_loss_gradcheck():
    model_output, *rest = [_on(a, DEV) for a in loss_inputs(torch.float64, batch=3, shape=(2, 3, 2))]
    channels = model_output.shape[1] // 2
    pred, var = model_output[:, :channels].clone(), model_output[:, channels:].clone()
    loss = lambda mo: ops.hybrid_loss(mo, *rest, impl="fused")
    assert torch.autograd.gradcheck(lambda p: loss(torch.cat([p, var], 1))[0], (pred.requires_grad_(True),),
                                    eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda v: loss(torch.cat([pred.detach(), v], 1)), (var.requires_grad_(True),),
                                    eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------- devices and timesteps


def test_mixed_devices_give_clear_errors():
    x = torch.randn(2, 3, 4, device=DEV)
    t, table = torch.tensor([0, 1]), make_table()
    with pytest.raises(ValueError, match="t: expected a tensor on cuda"):
        ops.q_sample(x, x, t, table.to(DEV))
    with pytest.raises(RuntimeError, match="alphas_cumprod: expected a tensor on cuda"):
        torch.ops.diffcore.q_sample(x, x, t.to(DEV), table)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_the_inputs_device_whatever_the_current_device():
    args = [random_images((4, 3, 8, 8), torch.float32), random_images((4, 3, 8, 8), torch.float32, seed=1), timesteps(4),
            make_table()]
    on0 = ops.ddpm_step(*[_on(a, "cuda:0") for a in args[:2]], args[2].cuda(0), args[3].cuda(0), seed=3)
    with torch.cuda.device(0):
        on1 = ops.ddpm_step(*[_on(a, "cuda:1") for a in args[:2]], args[2].cuda(1), args[3].cuda(1), seed=3)
    assert on1[0].device == torch.device("cuda:1")
    torch.testing.assert_close(on1[0].cpu(), on0[0].cpu(), rtol=0, atol=0)


def test_kernels_clamp_timesteps_out_of_range():
    """The CUDA ops read no timestep value on the host (no sync): values outside [0, T) are clamped in the kernel
    (the Python wrappers reject them when check_values is on)."""
    table = make_table(device=DEV)
    x = torch.randn(4, 3, 5, device=DEV)
    wild = torch.tensor([-3, T_STEPS, 10**12, 5], device=DEV)
    got = torch.ops.diffcore.q_sample(x, x, wild, table)
    expected = torch.ops.diffcore.q_sample(x, x, wild.clamp(0, T_STEPS - 1), table)
    torch.cuda.synchronize()
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="t: expected timesteps in"):
        ops.q_sample(x, x, wild, table)
