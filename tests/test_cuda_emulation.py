"""The CUDA kernels' per-thread code, run on the host, against the CPU kernels (no GPU needed).

tests/cuda_emu/emulator.cpp runs csrc/cuda/kernel_ops.cuh — the dispatch, tile shapes, vectorized and scalar
paths, Philox grouping and the two-stage hybrid-loss reduction layout of csrc/cuda/kernels.cu — one block and one
thread after the other. Each op is compared with the fused CPU op (or the reference when the extension is not
built) over the dtypes, sizes that give one or several tiles per sample, and three placements of the rows in
memory (dense, padded row stride, misaligned); the path taken (vectorized or scalar) is asserted too.
What only a GPU can show (barriers, shuffles, device libm, speed) is in tests/test_ops_cuda.py.
"""
from __future__ import annotations

import pytest
import torch

from diffcore import ops, reference
from cuda_emu import emulator as E
from op_cases import DTYPES, T_STEPS, make_table, timesteps, tolerance

pytestmark = pytest.mark.skipif(E.unavailable_reason() is not None, reason=str(E.unavailable_reason()))

# (batch, inner): tiny rows, a partial item, exactly one item, one tile (CIFAR-size), several tiles per row
SHAPES = [(3, 1), (2, 13), (3, 8), (4, 3072), (2, 8200)]


@pytest.fixture(scope="module")
def lib():
    lib = E.library()
    assert E.layout_mismatches(lib) == []
    return lib


def _values(batch, inner, dtype, seed, scale=1.0, clamp=None):
    g = torch.Generator().manual_seed(seed)
    v = scale * torch.randn(batch, inner, generator=g, dtype=torch.float64)
    if clamp is not None:
        v = v.clamp(-clamp, clamp)
    return v.to(dtype)


def _close(got, expected, dtype):
    torch.testing.assert_close(got.to(expected.dtype), expected, **tolerance(dtype), equal_nan=True)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def test_struct_layout_and_tile_shapes(lib):
    assert E.layout_mismatches(lib) == []
    assert E.tile_shape(lib, 256, 3 * 32 * 32, 4) == (192, 1, 256)  # CIFAR fp32: one tile, one block per image
    assert E.tile_shape(lib, 1, 3, 4) == (32, 1, 1)
    assert E.tile_shape(lib, 256, 262144, 4) == (256, 64, 256 * 64)  # 64M elements: 4096 per tile
    assert E.tile_shape(lib, 2, 8200, 8) == (256, 2, 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", E.PLACEMENTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_q_sample(lib, dtype, kind, shape):
    batch, inner = shape
    x0, noise = _values(batch, inner, dtype, 0), _values(batch, inner, dtype, 1)
    t, table = timesteps(batch), make_table()
    expected = ops.q_sample(x0, noise, t, table)
    ins = [E.place(x0, kind), E.place(noise, kind)]
    out = E.place(torch.full_like(x0, float("nan")), kind)
    args = E.QSampleArgs(E.DTYPE_CODE[dtype], batch, inner, E.rows(ins[0]), E.rows(ins[1]), t.data_ptr(),
                         table.data_ptr(), table.numel(), E.rows(out))
    E.check(E.run(lib, "q_sample", args))
    assert lib.emu_last_vectorized() == E.expect_vectorized(dtype, inner, kind)
    _close(out, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", E.PLACEMENTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_ddim_step(lib, dtype, kind, shape):
    batch, inner = shape
    x, pred = _values(batch, inner, dtype, 2), _values(batch, inner, dtype, 3)
    z = _values(batch, inner, dtype, 4)
    t, table = timesteps(batch), make_table()
    # the final step (t_prev < 0), ordinary steps and a reverse (inversion) step for every third sample
    up = torch.arange(batch) % 3 == 1
    t_prev = torch.where(up, (t + 3).clamp(max=T_STEPS - 1), t - 7)
    placed = [E.place(v, kind) for v in (x, pred, z)]
    for prediction_type, clip, eta, given in [(0, False, 0.0, False), (1, True, 0.5, False), (2, False, 1.0, True),
                                              (0, True, 0.3, True)]:
        expected = ops.ddim_step(x, pred, t, t_prev, table, eta, prediction_type=prediction_type, clip_denoised=clip,
                                 noise=z if given else None, seed=None if given else 17, offset=0 if given else 5,
                                 first_row=0 if given else 6)
        outs = [E.place(torch.full_like(x, float("nan")), kind) for _ in range(2)]
        noise = E.Noise(E.rows(placed[2]) if given else E.Rows(None, 0), 0 if given else 17, 0 if given else 5,
                        0 if given else 6)  # in-kernel noise of images 6 .. 6 + batch - 1
        args = E.DdimStepArgs(E.DTYPE_CODE[dtype], batch, inner, E.rows(placed[0]), E.rows(placed[1]), t.data_ptr(),
                              t_prev.data_ptr(), table.data_ptr(), table.numel(), eta, prediction_type, clip, noise,
                              E.rows(outs[0]), E.rows(outs[1]))
        E.check(E.run(lib, "ddim_step", args))
        assert lib.emu_last_vectorized() == E.expect_vectorized(dtype, inner, kind)
        _close(outs[0], expected[0], dtype)
        _close(outs[1], expected[1], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", E.PLACEMENTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_ddpm_step(lib, dtype, kind, shape):
    batch, inner = shape
    x = _values(batch, inner, dtype, 5)
    z = _values(batch, inner, dtype, 6)
    t, table = timesteps(batch), make_table()
    for variance_type in range(4):
        learned = variance_type >= 2
        out2 = _values(batch, 2 * inner, dtype, 7, scale=0.5, clamp=1.0)  # prediction then v in [-1, 1]
        model_output = out2 if learned else out2[:, :inner].contiguous()
        mo_placed = E.place(out2, kind)  # [B, 2 inner]: rows of the prediction and the variance parts
        z_placed = E.place(z, kind)
        x_placed = E.place(x, kind)
        for prediction_type, clip, given in [(0, False, False), (1, True, True), (2, False, False)]:
            expected = ops.ddpm_step(x[:, None], model_output.reshape(batch, 2 if learned else 1, inner), t, table,
                                     prediction_type=prediction_type, variance_type=variance_type,
                                     clip_denoised=clip, noise=z[:, None] if given else None,
                                     seed=None if given else 23, offset=0 if given else 2,
                                     first_row=0 if given else 2**32 - batch)
            outs = [E.place(torch.full_like(x, float("nan")), kind) for _ in range(2)]
            noise = E.Noise(E.rows(z_placed) if given else E.Rows(None, 0), 0 if given else 23, 0 if given else 2,
                            0 if given else 2**32 - batch)  # the last images of the seed
            var_rows = E.rows(mo_placed[:, inner:]) if learned else E.Rows(None, 0)
            args = E.DdpmStepArgs(E.DTYPE_CODE[dtype], batch, inner, E.rows(x_placed), E.rows(mo_placed[:, :inner]),
                                  var_rows, t.data_ptr(), table.data_ptr(), table.numel(), prediction_type,
                                  variance_type, clip, noise, E.rows(outs[0]), E.rows(outs[1]))
            E.check(E.run(lib, "ddpm_step", args))
            _close(outs[0], expected[0][:, 0], dtype)
            _close(outs[1], expected[1][:, 0], dtype)


def _hybrid_inputs(batch, inner, dtype, variance_type, seed=0):
    table = make_table()
    t = timesteps(batch, seed=seed)
    x0 = _values(batch, inner, torch.float64, seed, clamp=1.0)
    noise = _values(batch, inner, torch.float64, seed + 1)
    x_t = reference.q_sample(x0, noise, t, table)
    mo = _values(batch, 2 * inner, torch.float64, seed + 2, scale=0.5)
    mo[:, inner:] = mo[:, inner:].clamp(-1, 1) if variance_type == 2 else mo[:, inner:] - 4.0
    return [v.to(dtype) for v in (mo, x0, x_t, noise)], t, table


def _hybrid_args(dtype, batch, inner, placed, t, table, prediction_type, variance_type):
    mo, x0, x_t, noise = placed
    args = E.HybridLossArgs()
    args.dtype, args.batch, args.inner = E.DTYPE_CODE[dtype], batch, inner
    args.prediction, args.variance = E.rows(mo[:, :inner]), E.rows(mo[:, inner:])
    args.x0, args.x_t, args.noise = E.rows(x0), E.rows(x_t), E.rows(noise)
    args.t, args.alphas_cumprod, args.num_timesteps = t.data_ptr(), table.data_ptr(), table.numel()
    args.prediction_type, args.variance_type = prediction_type, variance_type
    return args


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", E.PLACEMENTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_hybrid_loss_forward_and_backward(lib, dtype, kind, shape):
    batch, inner = shape
    for variance_type in (2, 3):
        (mo, x0, x_t, noise), t, table = _hybrid_inputs(batch, inner, dtype, variance_type)
        placed = [E.place(v, kind) for v in (mo, x0, x_t, noise)]
        as_images = lambda v: v.reshape(batch, -1, inner)
        for prediction_type in range(3):
            mse_r, vb_r = ops.hybrid_loss(as_images(mo), as_images(x0), as_images(x_t), as_images(noise), t, table,
                                          prediction_type=prediction_type, variance_type=variance_type)
            args = _hybrid_args(dtype, batch, inner, placed, t, table, prediction_type, variance_type)
            mse = torch.full((batch,), float("nan"), dtype=_acc(dtype))
            vb = torch.full_like(mse, float("nan"))
            args.mse, args.vb = mse.data_ptr(), vb.data_ptr()
            workspace_bytes = lib.emu_hybrid_workspace_bytes(args)
            assert (workspace_bytes > 0) == (E.tile_shape(lib, batch, inner, E.VEC[dtype])[1] > 1)
            workspace = torch.full((max(workspace_bytes, 8) // 8,), float("nan"), dtype=torch.float64)
            E.check(E.run(lib, "hybrid_loss_forward", args, workspace.data_ptr()))
            assert lib.emu_last_vectorized() == E.expect_vectorized(dtype, inner, kind)
            rtol = 1e-10 if dtype == torch.float64 else 1e-5
            torch.testing.assert_close(mse, mse_r, rtol=rtol, atol=rtol)
            torch.testing.assert_close(vb, vb_r, rtol=rtol, atol=rtol)

            grad_mse = torch.linspace(0.5, 2.0, batch, dtype=_acc(dtype))
            grad_vb = torch.linspace(-1.0, 3.0, batch, dtype=_acc(dtype))
            expected = torch.ops.diffcore.hybrid_loss_backward(
                grad_mse, grad_vb, as_images(mo), as_images(x0), as_images(x_t), as_images(noise), t, table,
                prediction_type, variance_type) if ops.fused_available("cpu") else reference.hybrid_loss_backward(
                grad_mse, grad_vb, as_images(mo), as_images(x0), as_images(x_t), as_images(noise), t, table,
                prediction_type, variance_type)
            grads = E.place(torch.full_like(mo, float("nan")), kind)
            args.grad_mse, args.grad_vb = grad_mse.data_ptr(), grad_vb.data_ptr()
            args.grad_prediction, args.grad_variance = E.rows(grads[:, :inner]), E.rows(grads[:, inner:])
            E.check(E.run(lib, "hybrid_loss_backward", args))
            _close(grads, expected.reshape(batch, 2 * inner), dtype)


def test_out_of_range_timesteps_are_clamped_and_never_read_out_of_bounds(lib):
    """The table sits between NaN guards: a read outside it would turn the output into NaN."""
    batch, inner = 4, 16
    table = make_table()
    guarded = torch.cat([torch.tensor([float("nan")], dtype=torch.float64), table,
                         torch.tensor([float("nan")], dtype=torch.float64)])
    inside = guarded[1:-1]
    x, eps = _values(batch, inner, torch.float32, 0), _values(batch, inner, torch.float32, 1)
    wild = torch.tensor([-5, T_STEPS, 10**12, -(10**12)])
    clamped = wild.clamp(0, T_STEPS - 1)
    for name in ["q_sample", "ddpm_step", "ddim_step"]:
        results = []
        for t in (wild, clamped):
            out, out2 = torch.empty_like(x), torch.empty_like(x)
            if name == "q_sample":
                args = E.QSampleArgs(0, batch, inner, E.rows(x), E.rows(eps), t.data_ptr(), inside.data_ptr(),
                                     T_STEPS, E.rows(out))
            elif name == "ddpm_step":
                args = E.DdpmStepArgs(0, batch, inner, E.rows(x), E.rows(eps), E.Rows(None, 0), t.data_ptr(),
                                      inside.data_ptr(), T_STEPS, 0, 1, False, E.Noise(E.Rows(None, 0), 3, 0),
                                      E.rows(out), E.rows(out2))
            else:  # t_prev = t + 1 >= T is clamped to T - 1; t_prev < 0 stays the final step
                t_prev = t + 1
                args = E.DdimStepArgs(0, batch, inner, E.rows(x), E.rows(eps), t.data_ptr(), t_prev.data_ptr(),
                                      inside.data_ptr(), T_STEPS, 0.5, 0, False, E.Noise(E.Rows(None, 0), 3, 0),
                                      E.rows(out), E.rows(out2))
            E.check(E.run(lib, name, args))
            results.append(out)
        assert torch.isfinite(results[0]).all(), name
        if name != "ddim_step":  # t_prev = t + 1 differs between wild and clamped for ddim
            torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def test_launcher_refuses_what_it_cannot_run(lib):
    x = torch.zeros(2, 4)
    t, table = torch.zeros(2, dtype=torch.long), make_table()
    noise = E.Noise(E.Rows(None, 0), 0, 0)
    out = torch.empty_like(x)
    too_short = E.DdpmStepArgs(0, 2, 4, E.rows(x), E.rows(x), E.Rows(None, 0), t.data_ptr(), table.data_ptr(), 1,
                               0, 0, False, noise, E.rows(out), E.rows(out))
    assert E.run(lib, "ddpm_step", too_short) != 0
    no_variance = E.DdpmStepArgs(0, 2, 4, E.rows(x), E.rows(x), E.Rows(None, 0), t.data_ptr(), table.data_ptr(),
                                 T_STEPS, 0, 2, False, noise, E.rows(out), E.rows(out))
    assert E.run(lib, "ddpm_step", no_variance) != 0
    empty = E.QSampleArgs(0, 0, 4, E.rows(x), E.rows(x), t.data_ptr(), table.data_ptr(), T_STEPS, E.rows(out))
    assert E.run(lib, "q_sample", empty) == 0
    args = _hybrid_args(torch.float32, 2, 9000, [torch.zeros(2, 18000)] + [torch.zeros(2, 9000)] * 3, t, table, 0, 2)
    mse, vb = torch.empty(2), torch.empty(2)
    args.mse, args.vb = mse.data_ptr(), vb.data_ptr()
    assert lib.emu_hybrid_workspace_bytes(args) > 0
    assert E.run(lib, "hybrid_loss_forward", args, None) != 0  # several tiles per row need the workspace
