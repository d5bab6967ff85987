"""NaN and inf through the fused ops: they must come out where, and as, the pure-torch reference gives them.

torch propagates NaN through clamp / minimum / maximum, exp(inf) = inf, exp(-inf) = 0, and autograd's chain rule
turns a NaN local derivative into a NaN gradient even where clamp's backward masks the upstream gradient. The
fused kernels must agree position by position (``assert_close(..., equal_nan=True)`` checks that NaN sits in the
same places and that infinities match in sign). Shapes are chosen so that both the vectorized element loops and
their scalar tails run (inner sizes not a multiple of 16).

The hybrid loss selects a branch per sample (KL for t > 0, decoder NLL at t = 0) and, inside the NLL, per element
(the open edge bins). The fused kernel computes the selected branch only; the reference computes each branch on
inputs masked to 0 where it is not selected ("double where", ``formulas.branch_inputs``), so their gradients agree
even where the unselected branch overflows - a plain ``torch.where`` would leak NaN there (0 * inf), as
``test_plain_where_leaks_nan_that_the_double_where_keeps_out`` shows.
"""
from __future__ import annotations

import math

import pytest
import torch

from diffcore import ops
from diffcore.reference import formulas
from diffcore.types import as_prediction_type

from op_cases import make_table, random_images, timesteps, tolerance

pytestmark = pytest.mark.skipif(not ops.fused_available("cpu"), reason="diffcore._C is not built")

SPECIALS = (float("nan"), float("inf"), float("-inf"))
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _poison(x: torch.Tensor, seed: int, fraction: float = 0.08, values=SPECIALS) -> torch.Tensor:
    """A copy of x with about ``fraction`` of its elements replaced by NaN / +inf / -inf (seeded positions)."""
    g = torch.Generator().manual_seed(seed)
    out = x.clone()
    flat = out.view(-1)
    mask = torch.rand(flat.shape, generator=g) < fraction
    choice = torch.randint(0, len(values), flat.shape, generator=g)
    for k, value in enumerate(values):
        flat[mask & (choice == k)] = value
    return out


def _same(fused: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    assert fused.dtype == ref.dtype and fused.shape == ref.shape
    torch.testing.assert_close(fused.double(), ref.double(), **tolerance(dtype), equal_nan=True)


def _both(fn, *args, **kwargs):
    """(fused, reference) results of an op. The wrapper refuses eta = inf (a user error); the ops themselves take
    it, so such calls go past the wrapper's checks (``validated=True``) to compare the two paths."""
    if fn is ops.ddim_step and not math.isfinite(args[5]):
        kwargs = dict(kwargs, validated=True,
                      prediction_type=as_prediction_type(kwargs.get("prediction_type", "eps")))
    return fn(*args, impl="fused", **kwargs), fn(*args, impl="reference", **kwargs)


# ---------------------------------------------------------------- the cases of the audit (issue 12, item 4)


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_ddim_step_with_clipping_keeps_a_nan_of_the_model_output(prediction_type):
    x = random_images((2, 3, 5, 7), torch.float32, seed=0)
    model_output = random_images((2, 3, 5, 7), torch.float32, seed=1)
    model_output[0, 1, 2, 3] = float("nan")
    t = torch.tensor([30, 12])
    table = make_table()
    (xf, x0f), (xr, x0r) = _both(ops.ddim_step, x, model_output, t, t - 5, table, 0.0,
                                 prediction_type=prediction_type, clip_denoised=True)
    assert torch.isnan(x0r[0, 1, 2, 3]) and torch.isnan(xr[0, 1, 2, 3])  # what torch.clamp(nan) gives
    assert torch.isnan(x0f[0, 1, 2, 3]) and torch.isnan(xf[0, 1, 2, 3])
    _same(xf, xr)
    _same(x0f, x0r)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range", "learned"])
def test_ddpm_step_with_clipping_keeps_a_nan_of_the_model_output(variance_type):
    learned = variance_type.startswith("learned")
    x = random_images((2, 3, 5, 7), torch.float32, seed=0)
    model_output = random_images((2, 6 if learned else 3, 5, 7), torch.float32, seed=1, scale=0.5)
    model_output[1, 0, 4, 6] = float("nan")
    t = torch.tensor([0, 17])
    (xf, x0f), (xr, x0r) = _both(ops.ddpm_step, x, model_output, t, make_table(), variance_type=variance_type,
                                 clip_denoised=True, seed=3)
    assert torch.isnan(x0r[1, 0, 4, 6]) and torch.isnan(x0f[1, 0, 4, 6])
    _same(xf, xr)
    _same(x0f, x0r)


def test_hybrid_loss_at_t0_with_a_nan_variance_gives_nan_vb_and_nan_gradient():
    table, t = make_table(), torch.tensor([0, 9])
    x0 = random_images((2, 3, 4, 5), torch.float32, seed=0).clamp(-1, 1)
    noise = random_images((2, 3, 4, 5), torch.float32, seed=1)
    x_t = ops.q_sample(x0, noise, t, table, impl="reference")
    model_output = random_images((2, 6, 4, 5), torch.float32, seed=2, scale=0.5).clamp(-1, 1)
    model_output[0, 4, 1, 1] = float("nan")  # a variance channel of the t = 0 sample
    results = {}
    for impl in ["fused", "reference"]:
        leaf = model_output.clone().requires_grad_(True)
        mse, vb = ops.hybrid_loss(leaf, x0, x_t, noise, t, table, impl=impl)
        (mse.sum() + vb.sum()).backward()
        results[impl] = (mse.detach(), vb.detach(), leaf.grad)
    (mse_f, vb_f, grad_f), (mse_r, vb_r, grad_r) = results["fused"], results["reference"]
    assert torch.isnan(vb_r[0]) and torch.isfinite(vb_r[1]) and torch.isnan(grad_r[0, 4, 1, 1])
    _same(mse_f, mse_r)
    _same(vb_f, vb_r)
    _same(grad_f, grad_r)


@pytest.mark.parametrize("given_noise", [False, True])
def test_ddim_step_with_infinite_eta_matches_reference(given_noise):
    x = random_images((4, 3, 5, 7), torch.float32, seed=0)
    model_output = random_images((4, 3, 5, 7), torch.float32, seed=1)
    table = make_table()
    t = torch.tensor([30, 12, 3, 8])
    t_prev = torch.tensor([20, -1, -1, 15])  # ordinary, two final steps (sigma = inf * 0 = nan), a reverse step
    noise = random_images((4, 3, 5, 7), torch.float32, seed=2) if given_noise else None
    for clip in [False, True]:
        (xf, x0f), (xr, x0r) = _both(ops.ddim_step, x, model_output, t, t_prev, table, float("inf"),
                                     clip_denoised=clip, noise=noise, seed=4)
        assert not torch.isfinite(xr[:3]).any() and torch.isfinite(xr[3]).all()
        _same(xf, xr)
        _same(x0f, x0r)


# ---------------------------------------------------------------- the class: NaN / inf anywhere


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_step_non_finite_inputs(dtype, prediction_type, clip):
    shape = (5, 3, 9, 7)
    x = _poison(random_images(shape, dtype, seed=0), seed=10)
    model_output = _poison(random_images(shape, dtype, seed=1), seed=11)
    noise = _poison(random_images(shape, dtype, seed=2), seed=12)
    table = make_table()
    t = timesteps(5)
    t_prev = torch.tensor([-1, 3, 30, -1, 20])  # final, ordinary, reverse (sigma = 0 with eta > 0), ...
    for eta, given in [(0.0, None), (0.7, None), (0.7, noise), (float("inf"), noise)]:
        (xf, x0f), (xr, x0r) = _both(ops.ddim_step, x, model_output, t, t_prev, table, eta,
                                     prediction_type=prediction_type, clip_denoised=clip, noise=given, seed=9)
        _same(xf, xr, dtype)
        _same(x0f, x0r, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range", "learned"])
@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_step_non_finite_inputs(dtype, variance_type, clip):
    learned = variance_type.startswith("learned")
    shape = (5, 3, 9, 7)
    x = _poison(random_images(shape, dtype, seed=0), seed=20)
    model_output = _poison(random_images((5, 6 if learned else 3, 9, 7), dtype, seed=1, scale=0.5), seed=21)
    noise = _poison(random_images(shape, dtype, seed=2), seed=22)
    t = timesteps(5)  # t[0] = 0: the noise term is 0 * sigma * z there, NaN when sigma or z is not finite
    for prediction_type in ["eps", "x0", "v"]:
        for given in [None, noise]:
            (xf, x0f), (xr, x0r) = _both(ops.ddpm_step, x, model_output, t, make_table(),
                                         prediction_type=prediction_type, variance_type=variance_type,
                                         clip_denoised=clip, noise=given, seed=5)
            _same(xf, xr, dtype)
            _same(x0f, x0r, dtype)


@pytest.mark.parametrize("variance_type", ["learned_range", "learned"])
def test_ddpm_step_extreme_log_variances_match_torch_exp(variance_type):
    """exp of the learned log variance: overflow to inf above ln(FLT_MAX) and underflow to 0 near -inf."""
    x = random_images((2, 3, 4, 4), torch.float32, seed=0)
    model_output = random_images((2, 6, 4, 4), torch.float32, seed=1)
    values = torch.tensor([200.0, 178.0, 177.0, 176.0, -200.0, -250.0, float("inf"), float("-inf")])
    model_output[:, 3:].view(2, -1)[:, : values.numel()] = values
    (xf, _), (xr, _) = _both(ops.ddpm_step, x, model_output, torch.tensor([5, 30]), make_table(),
                             variance_type=variance_type, seed=2)
    assert not torch.isfinite(xr).all()
    _same(xf, xr)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variance_type", ["learned_range", "learned"])
@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_hybrid_loss_non_finite_inputs_forward_and_backward(dtype, variance_type, prediction_type):
    table = make_table()
    t = torch.tensor([0, 0, 1, 17, 39, 0])
    shape = (6, 3, 7, 5)
    x0 = random_images(shape, torch.float64, seed=0).clamp(-1, 1)
    x0[0, 0, :2] = -1.0  # the open edge bins of the decoder likelihood
    x0[1, 1, :2] = 1.0
    noise = random_images(shape, torch.float64, seed=1)
    x_t = ops.q_sample(x0, noise, t, table, impl="reference")
    model_output = random_images((6, 6, 7, 5), torch.float64, seed=2, scale=0.5)
    abar = table[t].view(-1, 1, 1, 1)
    target = {"eps": noise, "x0": x0, "v": abar.sqrt() * noise - (1 - abar).sqrt() * x0}[prediction_type]
    model_output[:, :3] = target + 0.1 * model_output[:, :3]
    if variance_type == "learned":
        model_output[:, 3:] -= 4.0
    # poison the variance channels of samples 0 and 3, the prediction channels of sample 2, x0 of sample 4,
    # noise of sample 5; sample 1 stays finite
    model_output[0, 3:] = _poison(model_output[0, 3:], seed=30, fraction=0.2)
    model_output[3, 3:] = _poison(model_output[3, 3:], seed=31, fraction=0.2)
    model_output[2, :3] = _poison(model_output[2, :3], seed=32, fraction=0.2)
    x0[4] = _poison(x0[4], seed=33, fraction=0.2)
    noise[5] = _poison(noise[5], seed=34, fraction=0.2)
    args = [v.to(dtype) for v in (model_output, x0, x_t, noise)] + [t, table]
    w = torch.linspace(0.5, 2.0, 6, dtype=torch.float64)
    results = {}
    for impl in ["fused", "reference"]:
        leaf = args[0].clone().requires_grad_(True)
        mse, vb = ops.hybrid_loss(leaf, *args[1:], prediction_type=prediction_type, variance_type=variance_type,
                                  impl=impl)
        ((mse * w.to(mse.dtype)).sum() + (vb * (w * w).to(vb.dtype)).sum()).backward()
        results[impl] = (mse.detach(), vb.detach(), leaf.grad)
    (mse_f, vb_f, grad_f), (mse_r, vb_r, grad_r) = results["fused"], results["reference"]
    assert torch.isfinite(vb_r[1]) and not torch.isfinite(vb_r[0])
    loss_tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mse_f, mse_r, **loss_tol, equal_nan=True)
    torch.testing.assert_close(vb_f, vb_r, **loss_tol, equal_nan=True)
    assert torch.isnan(grad_r[0, 3:]).any() and torch.isfinite(grad_r[1]).all()
    _same(grad_f, grad_r, dtype)


def test_hybrid_loss_extreme_log_variances():
    """exp(lv1 - lv2) and exp(-lv2) of the KL overflow to inf exactly where torch's exp does (learned log
    variances beyond ln(FLT_MAX) = 88.7), and the decoder likelihood saturates like the reference's."""
    table, t = make_table(), torch.tensor([0, 6, 25])
    x0 = random_images((3, 3, 4, 4), torch.float32, seed=0).clamp(-1, 1)
    noise = random_images((3, 3, 4, 4), torch.float32, seed=1)
    x_t = ops.q_sample(x0, noise, t, table, impl="reference")
    model_output = random_images((3, 6, 4, 4), torch.float32, seed=2, scale=0.5).clamp(-1, 1)
    values = torch.tensor([-200.0, -95.0, -90.0, -88.0, 95.0, 200.0])
    model_output[:, 3].view(3, -1)[:, : values.numel()] = values
    results = {}
    for impl in ["fused", "reference"]:
        leaf = model_output.clone().requires_grad_(True)
        mse, vb = ops.hybrid_loss(leaf, x0, x_t, noise, t, table, variance_type="learned", impl=impl)
        (mse.sum() + vb.sum()).backward()
        results[impl] = (vb.detach(), leaf.grad)
    assert torch.isinf(results["reference"][0][1:]).all()
    torch.testing.assert_close(results["fused"][0], results["reference"][0], rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.isinf(results["reference"][1][1:]).any()  # exp(-lv2) of the KL overflows in the gradient too
    _same(results["fused"][1], results["reference"][1])


def test_plain_where_leaks_nan_that_the_double_where_keeps_out():
    """formulas.vb_bits against each sample's own branch (boolean indexing: no torch.where at the sample level),
    and why it masks the branches' inputs: the plain torch.where(at_zero, nll, kl) of branches computed on the full
    inputs has NaN gradients where the branch it did not select overflows (0 * inf = NaN)."""
    shape = (4, 3, 5, 7)
    x0 = random_images(shape, torch.float32, seed=0).clamp(-1, 1)
    true_mean = random_images(shape, torch.float32, seed=1, scale=0.5)
    model_mean = true_mean + random_images(shape, torch.float32, seed=2, scale=0.05)
    model_mean[0] = x0[0]  # centered = 0: the decoder NLL of sample 0 stays finite at a log variance of -90
    true_log_var = torch.tensor([-9.0, -6.0, -4.0, -3.0]).view(-1, 1, 1, 1)
    model_log_var = random_images(shape, torch.float32, seed=3) - 5.0
    model_log_var[:2, 0, 1, :3] = -90.0  # exp(-lv2) of the KL overflows (> ln(FLT_MAX) = 88.7)
    at_zero = torch.tensor([True, False, True, False]).view(-1, 1, 1, 1)
    z = at_zero.view(-1)

    def grad_of(vb_fn):
        leaf = model_log_var.clone().requires_grad_(True)
        vb = vb_fn(leaf)
        (grad,) = torch.autograd.grad(vb.sum(), leaf)
        return vb.detach(), grad

    def nll(x, mean, log_var):
        return -formulas.discretized_gaussian_log_likelihood(x, mean, 0.5 * log_var) / formulas.LOG2

    def kl(m1, lv1, m2, lv2):
        return formulas.normal_kl(m1, lv1, m2, lv2) / formulas.LOG2

    vb, grad = grad_of(lambda lv: formulas.vb_bits(x0, true_mean, true_log_var, model_mean, lv, at_zero))
    vb_nll, grad_nll = grad_of(lambda lv: nll(x0[z], model_mean[z], lv[z]))
    vb_kl, grad_kl = grad_of(lambda lv: kl(true_mean[~z], true_log_var[~z], model_mean[~z], lv[~z]))
    assert torch.equal(vb[z], vb_nll) and torch.equal(vb[~z], vb_kl)  # the forward values, bit for bit
    torch.testing.assert_close(grad[z], grad_nll[z], rtol=0, atol=0)
    torch.testing.assert_close(grad[~z], grad_kl[~z], rtol=0, atol=0)  # -inf where exp(-lv2) = inf
    assert torch.isfinite(grad[0]).all() and torch.isneginf(grad[1, 0, 1, :3]).all()

    plain_vb, plain_grad = grad_of(lambda lv: torch.where(at_zero, nll(x0, model_mean, lv),
                                                          kl(true_mean, true_log_var, model_mean, lv)))
    assert torch.equal(plain_vb, vb)
    assert torch.isnan(plain_grad[0, 0, 1, :3]).all()  # the unselected KL: 0 * exp(90) = 0 * inf
    leaked = torch.isnan(plain_grad) & ~torch.isnan(grad)
    assert torch.equal(plain_grad[~leaked], grad[~leaked])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hybrid_loss_edge_bin_gradient_ignores_the_unused_bin_edge(dtype):
    """An open edge bin reads one CDF (x = 1: the lower bin edge); the other one's argument (inv_stdv (x - mean
    + 1/255)) can overflow in the derivative of the tanh-CDF (3 u^2 = inf) without touching the selected branch.
    The fused kernel never computes it; the reference's nested torch.where computes it on zeros there."""
    table, t = make_table(), torch.tensor([0, 0])
    half_bin = torch.tensor(1.0 / 255.0, dtype=dtype)
    x0 = random_images((2, 3, 4, 5), dtype, seed=0).clamp(-0.9, 0.9)
    x0[0, :, 0], x0[1, :, 0] = 1.0, -1.0  # the upper edge bin in sample 0, the lower one in sample 1
    noise = random_images((2, 3, 4, 5), dtype, seed=1)
    x_t = ops.q_sample(x0, noise, t, table, impl="reference")
    prediction = x0 + random_images((2, 3, 4, 5), dtype, seed=2, scale=0.01)  # at t = 0, model mean = x0_hat
    prediction[0, :, 0], prediction[1, :, 0] = 1.0 - half_bin, -1.0 + half_bin  # the used edge at the mean
    log_var = torch.full((2, 3, 4, 5), -101.3 if dtype == torch.float32 else -723.0, dtype=dtype)
    log_var[:, :, 1:] = random_images((2, 3, 3, 5), dtype, seed=3) - 5.0
    inv_stdv = torch.exp(-0.5 * log_var[:, :, 0])
    unused = inv_stdv * torch.stack([x0[0, :, 0] - prediction[0, :, 0] + half_bin,
                                     x0[1, :, 0] - prediction[1, :, 0] - half_bin])
    assert torch.isinf(3.0 * unused * unused).all() and torch.isfinite(unused).all()  # the premise
    model_output = torch.cat([prediction, log_var], dim=1)
    grads = {}
    for impl in ["fused", "reference"]:
        leaf = model_output.clone().requires_grad_(True)
        mse, vb = ops.hybrid_loss(leaf, x0, x_t, noise, t, table, prediction_type="x0", variance_type="learned",
                                  impl=impl)
        (mse.sum() + vb.sum()).backward()
        grads[impl] = leaf.grad
    assert torch.isfinite(grads["reference"]).all()
    _same(grads["fused"], grads["reference"], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_q_sample_non_finite_inputs(dtype):
    x0 = _poison(random_images((4, 3, 9, 7), dtype, seed=0), seed=40)
    noise = _poison(random_images((4, 3, 9, 7), dtype, seed=1), seed=41)
    fused, ref = _both(ops.q_sample, x0, noise, timesteps(4), make_table())
    _same(fused, ref, dtype)
