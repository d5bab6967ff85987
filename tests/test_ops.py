"""The fused CPU ops against the pure-torch reference, and the math against independent computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import diffcore
from diffcore import ops, reference
from diffcore.reference import formulas
from diffcore.reference.philox import philox4x32_10, philox_normal

from op_cases import DTYPES, T_STEPS, layout, loss_inputs, make_table, random_images, timesteps, tolerance

needs_fused = pytest.mark.skipif(not ops.fused_available("cpu"), reason="diffcore._C is not built")
LAYOUTS = ["contiguous", "channels_last", "strided"]


def _both(fn, *args, **kwargs):
    return fn(*args, impl="fused", **kwargs), fn(*args, impl="reference", **kwargs)


def _close(a, b, dtype):
    torch.testing.assert_close(a.float() if dtype != torch.float64 else a, b.float() if dtype != torch.float64 else b,
                               **tolerance(dtype), equal_nan=True)


# ---------------------------------------------------------------- fused vs reference


@needs_fused
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_q_sample_matches_reference(dtype, kind):
    x0 = layout(random_images((5, 3, 7, 9), dtype), kind)
    noise = layout(random_images((5, 3, 7, 9), dtype, seed=1), kind)
    t, table = timesteps(5), make_table()
    fused, ref = _both(ops.q_sample, x0, noise, t, table)
    assert fused.dtype == dtype and fused.shape == x0.shape
    _close(fused, ref, dtype)


@needs_fused
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_ddim_step_matches_reference(dtype, kind, prediction_type):
    x = layout(random_images((6, 3, 5, 7), dtype), kind)
    model_output = layout(random_images((6, 3, 5, 7), dtype, seed=2), kind)
    t, table = timesteps(6), make_table()
    t_prev = t - 7  # crosses the final step (t_prev < 0) for small t
    for eta, clip in [(0.0, False), (0.5, True), (1.0, False)]:
        (xf, x0f), (xr, x0r) = _both(ops.ddim_step, x, model_output, t, t_prev, table, eta,
                                     prediction_type=prediction_type, clip_denoised=clip, seed=11, offset=3)
        _close(xf, xr, dtype)
        _close(x0f, x0r, dtype)


@needs_fused
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range", "learned"])
def test_ddpm_step_matches_reference(dtype, kind, variance_type):
    channels = 6 if variance_type.startswith("learned") else 3
    x = layout(random_images((5, 3, 4, 6), dtype), kind)
    model_output = layout(random_images((5, channels, 4, 6), dtype, seed=3, scale=0.5), kind)
    t, table = timesteps(5), make_table()
    for prediction_type, clip in [("eps", False), ("x0", True), ("v", False)]:
        (xf, x0f), (xr, x0r) = _both(ops.ddpm_step, x, model_output, t, table, prediction_type=prediction_type,
                                     variance_type=variance_type, clip_denoised=clip, seed=5)
        _close(xf, xr, dtype)
        _close(x0f, x0r, dtype)


@needs_fused
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("variance_type", ["learned_range", "learned"])
def test_hybrid_loss_matches_reference(dtype, kind, variance_type):
    args = loss_inputs(dtype, kind, variance_type=variance_type)
    for prediction_type in ["eps", "x0", "v"]:
        (mse_f, vb_f), (mse_r, vb_r) = _both(ops.hybrid_loss, *args, prediction_type=prediction_type,
                                             variance_type=variance_type)
        assert mse_f.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        rtol = 1e-10 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(mse_f, mse_r, rtol=rtol, atol=rtol)
        torch.testing.assert_close(vb_f, vb_r, rtol=rtol, atol=rtol)


@needs_fused
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
@pytest.mark.parametrize("variance_type", ["learned_range", "learned"])
def test_hybrid_loss_backward_matches_reference(dtype, kind, variance_type):
    model_output, *rest = loss_inputs(dtype, kind, variance_type=variance_type)
    w = torch.linspace(0.5, 2.0, model_output.shape[0], dtype=torch.float64)
    grads = {}
    for impl in ["fused", "reference"]:
        leaf = model_output.detach().clone().requires_grad_(True)
        mse, vb = ops.hybrid_loss(leaf, *rest, variance_type=variance_type, impl=impl)
        ((mse * w.to(mse.dtype)).sum() + (vb * (w.to(vb.dtype) ** 2)).sum()).backward()
        grads[impl] = leaf.grad
    assert grads["fused"].dtype == dtype and grads["fused"].shape == model_output.shape
    _close(grads["fused"], grads["reference"], dtype)


@needs_fused
@pytest.mark.parametrize("batch", [0, 1])
def test_small_batches(batch):
    table = make_table()
    x = random_images((batch, 2, 3, 3), torch.float32)
    t = timesteps(batch)
    assert ops.q_sample(x, x, t, table, impl="fused").shape == x.shape
    for fn_args in [(ops.ddim_step, (x, x, t, t - 1, table, 1.0)), (ops.ddpm_step, (x, x, t, table))]:
        fn, args = fn_args
        (xf, x0f), (xr, x0r) = _both(fn, *args, seed=1)
        torch.testing.assert_close(xf, xr)
        torch.testing.assert_close(x0f, x0r)
    args = loss_inputs(torch.float32, batch=batch)
    (mse_f, vb_f), (mse_r, vb_r) = _both(ops.hybrid_loss, *args)
    torch.testing.assert_close(mse_f, mse_r)
    torch.testing.assert_close(vb_f, vb_r)


@needs_fused
def test_trailing_shapes_and_odd_sizes():
    table = make_table()
    for shape in [(3, 1), (4, 13), (2, 3, 5, 7, 2), (3, 1, 1, 1)]:
        x = random_images(shape, torch.float32)
        n = random_images(shape, torch.float32, seed=1)
        t = timesteps(shape[0])
        torch.testing.assert_close(*_both(ops.q_sample, x, n, t, table))
        (a, _), (b, _) = _both(ops.ddim_step, x, n, t, t - 1, table, 0.3, seed=2)
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- fp16 / bf16 precision rule


@needs_fused
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_at_most_twice_plain_torch(dtype):
    """flash-attention's rule: error vs fp64 at most ~2x that of the same computation in plain low-precision torch."""
    x = random_images((8, 3, 16, 16), torch.float64)
    eps = random_images((8, 3, 16, 16), torch.float64, seed=1)
    t, table = timesteps(8), make_table()
    t_prev = (t - 5).clamp(min=-1)
    exact, _ = reference.ddim_step(x, eps, t, t_prev, table, 0.0)
    fused, _ = ops.ddim_step(x.to(dtype), eps.to(dtype), t, t_prev, table, 0.0, impl="fused")
    # the same formula evaluated by plain torch entirely in low precision
    abar = formulas.per_sample(table[t], x).to(dtype)
    abar_s = formulas.per_sample(torch.where(t_prev >= 0, table[t_prev.clamp(min=0)], torch.ones_like(table[t])), x).to(dtype)
    xl, el = x.to(dtype), eps.to(dtype)
    x0_plain = formulas.x0_from_eps(xl, el, abar)
    plain = abar_s.sqrt() * x0_plain + (1 - abar_s).sqrt() * el
    # plain fp16 overflows at 1/abar for t = T-1 (abar ~ 4e-6); the fused kernel (fp32 inside) does not
    assert torch.isfinite(fused).all()
    finite = torch.isfinite(plain)
    assert finite.float().mean() > 0.5
    err_fused = (fused.double() - exact)[finite].abs().max().item()
    err_plain = (plain.double() - exact)[finite].abs().max().item()
    assert err_fused <= 2.0 * err_plain + 1e-6, (err_fused, err_plain)

    x0 = random_images((8, 3, 16, 16), torch.float64).clamp(-1, 1)
    exact_q = reference.q_sample(x0, eps, t, table)
    fused_q = ops.q_sample(x0.to(dtype), eps.to(dtype), t, table, impl="fused")
    plain_q = formulas.q_sample(x0.to(dtype), eps.to(dtype), formulas.per_sample(table[t], x0).to(dtype))
    assert (fused_q.double() - exact_q).abs().max() <= 2.0 * (plain_q.double() - exact_q).abs().max() + 1e-6


# ---------------------------------------------------------------- the math against independent computations


def test_q_sample_mean_and_variance():
    """x_t over many noise draws has mean sqrt(abar) x0 and variance 1 - abar (abar from a numpy cumprod)."""
    betas = np.linspace(1e-4, 0.02, 1000)
    abar_np = np.cumprod(1.0 - betas)
    table = torch.from_numpy(abar_np)
    n, t_value = 200_000, 300
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    noise = torch.randn(n, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x_t = ops.q_sample(x0, noise, torch.full((n,), t_value), table)
    assert abs(x_t.mean().item() - math.sqrt(abar_np[t_value]) * 0.7) < 5 * math.sqrt(1 / n)
    assert abs(x_t.var().item() - (1 - abar_np[t_value])) < 0.01


def test_ddim_eta_one_on_consecutive_steps_is_ddpm_fixed_small():
    """With eta = 1 and t_prev = t - 1, sigma^2 equals beta~_t, so DDIM is the DDPM step with fixed_small."""
    table = make_table()
    x = random_images((6, 2, 4, 4), torch.float64)
    eps = random_images((6, 2, 4, 4), torch.float64, seed=1)
    z = random_images((6, 2, 4, 4), torch.float64, seed=2)
    t = torch.tensor([1, 2, 5, 17, 30, T_STEPS - 1])
    ddim, ddim_x0 = ops.ddim_step(x, eps, t, t - 1, table, 1.0, noise=z)
    ddpm, ddpm_x0 = ops.ddpm_step(x, eps, t, table, variance_type="fixed_small", noise=z)
    torch.testing.assert_close(ddim, ddpm, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ddim_x0, ddpm_x0)


def test_ddim_inversion_step_inverts_the_deterministic_step():
    """A reverse step t -> t_next followed by the forward step t_next -> t with the same eps returns x."""
    table = make_table()
    x = random_images((4, 3, 4, 4), torch.float64)
    eps = random_images((4, 3, 4, 4), torch.float64, seed=1)
    t = torch.tensor([0, 3, 10, 20])
    t_next = t + 5
    x_next, _ = ops.ddim_step(x, eps, t, t_next, table, eta=0.9)  # sigma is 0 in the reverse direction
    back, _ = ops.ddim_step(x_next, eps, t_next, t, table, eta=0.0)
    torch.testing.assert_close(back, x, rtol=1e-10, atol=1e-10)


def test_ddpm_step_mean_and_variance_match_bayes():
    """E[x_{t-1}] and Var[x_{t-1}] over noise draws equal the posterior of q(x_{t-1} | x_t, x0) from Bayes' rule."""
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    table = torch.from_numpy(abar)
    t_val, x0_val, x_t_val = 500, 0.3, -0.4
    # Bayes: prior x_{t-1} ~ N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}); likelihood x_t ~ N(sqrt(alpha_t) x_{t-1}, beta_t)
    prior_var, alpha = 1 - abar[t_val - 1], 1 - betas[t_val]
    post_var = 1.0 / (1.0 / prior_var + alpha / betas[t_val])
    post_mean = post_var * (math.sqrt(abar[t_val - 1]) * x0_val / prior_var + math.sqrt(alpha) * x_t_val / betas[t_val])
    n = 100_000
    x = torch.full((n, 1), x_t_val, dtype=torch.float64)
    eps = torch.full_like(x, (x_t_val - math.sqrt(abar[t_val]) * x0_val) / math.sqrt(1 - abar[t_val]))
    out, x0 = ops.ddpm_step(x, eps, torch.full((n,), t_val), table, variance_type="fixed_small", seed=7)
    torch.testing.assert_close(x0, torch.full_like(x0, x0_val))
    assert abs(out.mean().item() - post_mean) < 5 * math.sqrt(post_var / n)
    assert abs(out.var().item() / post_var - 1) < 0.02


def test_kl_of_equal_gaussians_is_zero_in_hybrid_loss():
    """A model that predicts the true noise and the posterior log variance has vb = 0 at every t > 0."""
    table = make_table()
    t = torch.tensor([1, 5, 20, T_STEPS - 1])
    x0 = random_images((4, 2, 3, 3), torch.float64).clamp(-1, 1)
    noise = random_images((4, 2, 3, 3), torch.float64, seed=1)
    x_t = ops.q_sample(x0, noise, t, table)
    log_var = formulas.per_sample(formulas.gather_tables(table, t).log_posterior_variance, x0).expand_as(x0)
    mse, vb = ops.hybrid_loss(torch.cat([noise, log_var], 1), x0, x_t, noise, t, table, variance_type="learned")
    torch.testing.assert_close(mse, torch.zeros_like(mse), atol=1e-20, rtol=0)
    torch.testing.assert_close(vb, torch.zeros_like(vb), atol=1e-12, rtol=0)


def test_decoder_likelihood_sums_to_one_over_the_256_bins():
    """At t = 0 vb is -log2 p(x0) of a discretized Gaussian: 2^-vb summed over the 256 bin centres is 1."""
    table = make_table()
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64).reshape(256, 1)
    t = torch.zeros(256, dtype=torch.long)
    # at t = 0, abar_prev = 1 so the posterior mean coefficient of x0 is 1: predicting x0 = m gives model mean m
    for mean, log_var in [(0.1, -3.0), (-0.95, -6.0), (0.5, 0.5)]:
        model_output = torch.cat([torch.full_like(bins, mean), torch.full_like(bins, log_var)], 1)
        _, vb = ops.hybrid_loss(model_output, bins, torch.zeros_like(bins), torch.zeros_like(bins), t, table,
                                prediction_type="x0", variance_type="learned")
        assert abs(torch.exp2(-vb).sum().item() - 1.0) < 1e-9


def test_vb_matches_monte_carlo_kl():
    """vb at t > 0 equals a Monte-Carlo estimate of KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) in bits."""
    betas = np.linspace(1e-4, 0.02, 1000)
    table = torch.from_numpy(np.cumprod(1 - betas))
    t = torch.tensor([400])
    x0 = torch.tensor([[0.5]], dtype=torch.float64)
    noise = torch.tensor([[0.3]], dtype=torch.float64)
    x_t = ops.q_sample(x0, noise, t, table)
    eps_hat, v = torch.tensor([[0.1]], dtype=torch.float64), torch.tensor([[0.4]], dtype=torch.float64)
    _, vb = ops.hybrid_loss(torch.cat([eps_hat, v], 1), x0, x_t, noise, t, table)
    tab = formulas.gather_tables(table, t)
    q_mean = (tab.posterior_mean_coef1 * x0 + tab.posterior_mean_coef2 * x_t).item()
    q_std = math.exp(0.5 * tab.log_posterior_variance.item())
    x0_hat = formulas.x0_from_eps(x_t, eps_hat, tab.abar).item()
    p_mean = (tab.posterior_mean_coef1 * x0_hat + tab.posterior_mean_coef2 * x_t).item()
    frac = (v.item() + 1) / 2
    p_std = math.exp(0.5 * (frac * math.log(tab.beta.item()) + (1 - frac) * tab.log_posterior_variance.item()))
    rng = np.random.default_rng(0)
    samples = q_mean + q_std * rng.standard_normal(2_000_000)
    log_q = -0.5 * ((samples - q_mean) / q_std) ** 2 - math.log(q_std)
    log_p = -0.5 * ((samples - p_mean) / p_std) ** 2 - math.log(p_std)
    mc_bits = (log_q - log_p).mean() / math.log(2)
    stderr = (log_q - log_p).std() / math.log(2) / math.sqrt(samples.size)
    assert abs(vb.item() - mc_bits) < 5 * stderr + 1e-6


# ---------------------------------------------------------------- autograd, opcheck, compile


@needs_fused
@pytest.mark.parametrize("variance_type", ["learned_range", "learned"])
@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_hybrid_loss_gradcheck(variance_type, prediction_type):
    """Analytic gradients against finite differences: mse in the prediction channels, vb in the variance channels.

    vb's gradient in the prediction channels is zero by design (stop-gradient on the mean) although its value
    depends on them, so finite differences cannot check it; it is asserted to be exactly zero instead.
    """
    model_output, *rest = loss_inputs(torch.float64, batch=4, shape=(2, 3, 2), variance_type=variance_type)
    channels = model_output.shape[1] // 2
    pred, var = model_output[:, :channels].clone(), model_output[:, channels:].clone()
    loss = lambda mo: ops.hybrid_loss(mo, *rest, prediction_type=prediction_type, variance_type=variance_type,
                                      impl="fused")
    assert torch.autograd.gradcheck(lambda p: loss(torch.cat([p, var], 1))[0], (pred.requires_grad_(True),),
                                    eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda v: loss(torch.cat([pred.detach(), v], 1)), (var.requires_grad_(True),),
                                    eps=1e-6, atol=1e-6)
    leaf = model_output.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(leaf)[1].sum(), leaf)
    assert torch.count_nonzero(grad[:, :channels]) == 0 and torch.count_nonzero(grad[:, channels:]) > 0


@pytest.mark.slow
@needs_fused
def test_opcheck_every_op():
    table = make_table()
    x = random_images((3, 2, 4, 4), torch.float32)
    mo = random_images((3, 4, 4, 4), torch.float32, scale=0.5).clamp(-1, 1)
    t = timesteps(3)
    g = torch.ones(3)
    cases = [
        (torch.ops.diffcore.q_sample, (x, x, t, table)),
        (torch.ops.diffcore.ddim_step, (x, x, t, t - 1, table, 0.5, 0, True, None, 3, 1)),
        (torch.ops.diffcore.ddim_step, (x, x, t, t - 1, table, 0.5, 2, False, x, 0, 0)),
        (torch.ops.diffcore.ddpm_step, (x, mo, t, table, 0, 2, False, None, 3, 0)),
        (torch.ops.diffcore.hybrid_loss, (mo.requires_grad_(True), x.clamp(-1, 1), x, x, t, table, 0, 2)),
        (torch.ops.diffcore.hybrid_loss_backward, (g, g, mo.detach(), x.clamp(-1, 1), x, x, t, table, 1, 2)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
    cl = x.contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.diffcore.ddim_step, (cl, cl, t, t - 1, table, 0.0, 0, False, None, 0, 0))


@pytest.mark.slow
@needs_fused
def test_torch_compile_fullgraph():
    table = make_table()
    x = random_images((4, 3, 8, 8), torch.float32)
    eps = random_images((4, 3, 8, 8), torch.float32, seed=1)
    t = timesteps(4)

    @torch.compile(fullgraph=True, backend="inductor")
    def two_steps(x, eps):
        x1, _ = ops.ddim_step(x, eps, t, t - 1, table, 1.0, seed=3, offset=0, impl="fused", check_values=False)
        x2, x0 = ops.ddpm_step(x1, eps, (t - 1).clamp(min=0), table, seed=3, offset=1, impl="fused",
                               check_values=False)
        return x2 * 2, x0

    expected_x1, _ = ops.ddim_step(x, eps, t, t - 1, table, 1.0, seed=3, offset=0)
    expected, expected_x0 = ops.ddpm_step(expected_x1, eps, (t - 1).clamp(min=0), table, seed=3, offset=1)
    got, got_x0 = two_steps(x, eps)
    torch.testing.assert_close(got, expected * 2)
    torch.testing.assert_close(got_x0, expected_x0)


# ---------------------------------------------------------------- in-kernel noise


def test_philox_known_answers():
    """Random123's known-answer vectors for Philox4x32-10."""
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, expected in cases:
        seed = key[0] | (key[1] << 32)
        out = philox4x32_10(tuple(torch.tensor([c], dtype=torch.int64) for c in counter), seed)
        assert tuple(int(o) for o in out) == expected


def test_philox_normals_are_standard_normal():
    from scipy import stats

    z = philox_normal(64, 4096, seed=123, offset=9).flatten().numpy()
    assert abs(z.mean()) < 5 / math.sqrt(z.size)
    assert abs(z.var() - 1) < 0.01
    assert stats.kstest(z, "norm").pvalue > 1e-3


@needs_fused
def test_in_kernel_noise_is_reproducible_and_matches_reference():
    table = make_table()
    x = torch.zeros(8, 3, 5, 5)
    eps = torch.zeros_like(x)
    t = torch.full((8,), T_STEPS - 1)
    run = lambda seed, offset, impl="fused": ops.ddpm_step(x, eps, t, table, seed=seed, offset=offset, impl=impl)[0]
    a, b = run(5, 0), run(5, 0)
    assert torch.equal(a, b)
    assert not torch.allclose(a, run(5, 1)) and not torch.allclose(a, run(6, 0))
    torch.testing.assert_close(a, run(5, 0, "reference"), rtol=0, atol=1e-6)
    # the noise is N(0, sigma^2) with sigma^2 the clipped posterior variance at T-1
    sigma = math.exp(0.5 * formulas.gather_tables(table, t[:1]).log_posterior_variance.item())
    z = (run(5, 0) / sigma).flatten()
    assert abs(z.mean()) < 0.15 and abs(z.std() - 1) < 0.1


# ---------------------------------------------------------------- bad input


def bad_input_case(impl):
    """(table, x [4, 3, 4, 4], t [4]) for the bad-input tests of ``impl``; skips when the fused ops are not built."""
    if impl == "fused" and not ops.fused_available("cpu"):
        pytest.skip("diffcore._C is not built")
    return make_table(), torch.randn(4, 3, 4, 4), timesteps(4)


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_bad_inputs_give_clear_errors(impl):
    table, x, t = bad_input_case(impl)
    cases = [
        (lambda: ops.q_sample(x, torch.randn(4, 3, 4, 5), t, table, impl=impl), "noise: expected shape"),
        (lambda: ops.q_sample(x, x, t[:3], table, impl=impl), "t: expected shape (4,)"),
        (lambda: ops.q_sample(x, x, t + T_STEPS, table, impl=impl), "t: expected timesteps in [0, 40)"),
        (lambda: ops.q_sample(x, x, t - 5, table, impl=impl), "t: expected timesteps"),
        (lambda: ops.q_sample(x, x, t.int(), table, impl=impl), "t: expected an int64 tensor"),
        (lambda: ops.q_sample(x, x, t, table.float(), impl=impl), "alphas_cumprod: expected a 1-D float64"),
        (lambda: ops.q_sample(x, x, t, table[:1], impl=impl), "t: expected timesteps in [0, 1)"),
        (lambda: ops.q_sample(x.long(), x.long(), t, table, impl=impl), "x0: expected dtype float32"),
        (lambda: ops.q_sample(x, x.double(), t, table, impl=impl), "noise: expected dtype torch.float32"),
        (lambda: ops.q_sample(x, x.to("meta"), t, table, impl=impl), "noise: expected a tensor on cpu"),
        (lambda: ops.ddim_step(x, x, t, t, table, -0.1, impl=impl), "eta: expected a float >= 0"),
        (lambda: ops.ddim_step(x, x, t, t + T_STEPS, table, impl=impl), "t_prev: expected timesteps < 40"),
        (lambda: ops.ddpm_step(x, x, t, table, variance_type="learned_range", impl=impl),
         "model_output: expected shape (4, 6, 4, 4)"),
        (lambda: ops.ddpm_step(x, x, t, table, variance_type="tiny", impl=impl), "variance_type: expected one of"),
        (lambda: ops.ddpm_step(x, x, t, table, prediction_type="score", impl=impl), "prediction_type: expected"),
        (lambda: ops.hybrid_loss(x, x, x, x, t, table, impl=impl), "model_output: expected shape (4, 6, 4, 4)"),
        (lambda: ops.hybrid_loss(torch.cat([x, x], 1), x, x, x, t, table, variance_type="fixed_small", impl=impl),
         "variance_type: the hybrid loss needs"),
        (lambda: ops.ddpm_step(x, x, t, table, seed=-3, impl=impl), "seed: expected"),
    ]
    for fn, message in cases:
        with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
            fn()
        assert message in str(info.value), (message, str(info.value))


@needs_fused
def test_cpp_checks_when_called_directly():
    """The C++ ops check their inputs too, for callers that bypass the Python wrappers."""
    table = make_table()
    x = torch.randn(2, 3, 4)
    t = torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match="t: expected timesteps in \\[0, 40\\), got 40"):
        torch.ops.diffcore.q_sample(x, x, torch.tensor([0, 40]), table)
    with pytest.raises(RuntimeError, match="model_output: expected shape"):
        torch.ops.diffcore.ddpm_step(x, x, t, table, 0, 2, False, None, 0, 0)
    with pytest.raises(RuntimeError, match="prediction_type: expected 0"):
        torch.ops.diffcore.ddim_step(x, x, t, t, table, 0.0, 7, False, None, 0, 0)
    with pytest.raises(RuntimeError, match="alphas_cumprod: expected at least 2"):
        torch.ops.diffcore.hybrid_loss(torch.cat([x, x], 1), x, x, x, torch.tensor([0, 0]), table[:1], 0, 2)


def test_which_impl_and_build_info():
    info = diffcore.build_info()
    assert info["built"] == ops.fused_available("cpu")
    assert ops.which_impl("cpu", "reference") == "reference"
    assert ops.which_impl(torch.zeros(1), "auto") == ("fused" if info["built"] else "reference")
    with pytest.raises(ValueError, match="impl: expected"):
        ops.which_impl("cpu", "fast")
    if not ops.fused_available("cuda"):
        with pytest.raises(RuntimeError, match="pip install -e . --no-build-isolation"):
            ops.which_impl("cuda", "fused")


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_argument_errors_name_the_argument(impl):
    """Issue 12 item 11: Python-level arguments get the same clear errors as tensors (name, expected, got)."""
    table, x, t = bad_input_case(impl)
    cases = [
        (lambda: ops.ddim_step(x, x, t, t - 1, table, "0.5", impl=impl), TypeError, "eta: expected a float >= 0"),
        (lambda: ops.ddim_step(x, x, t, t - 1, table, float("nan"), impl=impl), ValueError, "eta: expected"),
        (lambda: ops.ddim_step(x, x, t, t - 1, table, float("inf"), impl=impl), ValueError, "and finite, got inf"),
        (lambda: ops.ddpm_step(x, x, t, table, offset=2**63, impl=impl), ValueError,
         "offset: expected an int in [0, 2**63), got 9223372036854775808"),
        (lambda: ops.ddpm_step(x, x, t, table, seed=2**64, impl=impl), ValueError, "seed: expected an int in [0, 2**63)"),
        (lambda: ops.ddim_step(x, x, t, t - 1, table, 0.5, offset=1.5, impl=impl), TypeError, "offset: expected an int"),
        (lambda: ops.ddpm_step(x, x, t, table, seed="7", impl=impl), TypeError, "seed: expected an int"),
        (lambda: ops.ddpm_step(x, x, t, table, clip_denoised="no", impl=impl), TypeError, "clip_denoised: expected a bool"),
    ]
    for fn, kind, message in cases:
        with pytest.raises(kind) as info:
            fn()
        assert message in str(info.value), (message, str(info.value))


def test_any_negative_t_prev_is_the_last_step():
    table = make_table()
    x = random_images((3, 2, 4), torch.float64)
    eps = random_images((3, 2, 4), torch.float64, seed=1)
    t = torch.tensor([0, 5, 39])
    expected = ops.ddim_step(x, eps, t, torch.full((3,), -1), table)
    for low in [-2, -(2**62) - 1, -(2**63)]:
        for impl in ["auto", "reference"]:
            got = ops.ddim_step(x, eps, t, torch.full((3,), low), table, impl=impl)
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("bad", [-1, T_STEPS, -(2**63)])
def test_out_of_range_timesteps_raise_on_cpu_whatever_check_values(impl, bad):
    """check_values=False skips the Python-level read (a device sync on CUDA); on CPU both paths still raise."""
    if impl == "fused" and not ops.fused_available("cpu"):
        pytest.skip("diffcore._C is not built")
    table = make_table()
    x = torch.randn(2, 3, 4)
    t = torch.tensor([3, bad])
    for call in [lambda: ops.q_sample(x, x, t, table, impl=impl, check_values=False),
                 lambda: ops.ddpm_step(x, x, t, table, seed=1, impl=impl, check_values=False),
                 lambda: ops.ddim_step(x, x, t, t.clamp(max=0) - 1, table, impl=impl, check_values=False)]:
        with pytest.raises((ValueError, RuntimeError), match=r"t: expected timesteps in \[0, 40\)"):
            call()


def test_reference_clamps_unchecked_timesteps_like_the_cuda_kernels():
    """Timesteps that reach the reference unchecked are clamped into [0, T) (never wrapped: -1 is not T-1)."""
    table = make_table()
    x = random_images((2, 3, 4), torch.float64)
    n = random_images((2, 3, 4), torch.float64, seed=1)
    clamped = reference.q_sample(x, n, torch.tensor([0, T_STEPS - 1]), table)
    torch.testing.assert_close(reference.q_sample(x, n, torch.tensor([-1, T_STEPS + 5]), table), clamped)
    t_prev_clamped = reference.ddim_step(x, n, torch.tensor([3, 3]), torch.tensor([-5, T_STEPS - 1]), table)
    torch.testing.assert_close(reference.ddim_step(x, n, torch.tensor([3, 3]), torch.tensor([-5, 10**6]), table),
                               t_prev_clamped)


def test_meta_tensors_through_the_wrappers():
    """Meta tensors have no values: the wrappers skip the value checks and return meta outputs of the right shape."""
    table = make_table().to("meta")
    x = torch.empty(3, 2, 4, 4, device="meta")
    t = torch.empty(3, dtype=torch.long, device="meta")
    assert ops.q_sample(x, x, t, table).device.type == "meta"
    x_prev, pred_x0 = ops.ddpm_step(x, torch.cat([x, x], 1), t, table, variance_type="learned", seed=1)
    assert x_prev.shape == x.shape and pred_x0.device.type == "meta"


# ---------------------------------------------------------------- fake implementations (issue 12 item 6)


def _fake_call(op, args):
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode:
        return op(*fake_args)


@needs_fused
def test_mixed_meta_and_cpu_tensors_raise():
    """A direct call with one meta tensor used to return uninitialised CPU memory; it names the argument now."""
    table = make_table()
    x = torch.randn(2, 3, 4)
    t = torch.tensor([0, 1])
    calls = [
        (lambda: torch.ops.diffcore.q_sample(x, x.to("meta"), t, table), "noise: expected a tensor on cpu"),
        (lambda: torch.ops.diffcore.q_sample(x.to("meta"), x, t, table), "noise: expected a tensor on meta"),
        (lambda: torch.ops.diffcore.ddim_step(x, x, t.to("meta"), t, table, 0.0, 0, False, None, 0, 0),
         "t: expected a tensor on cpu"),
        (lambda: torch.ops.diffcore.ddpm_step(x, x, t, table.to("meta"), 0, 0, False, None, 0, 0),
         "alphas_cumprod: expected a tensor on cpu"),
        (lambda: torch.ops.diffcore.hybrid_loss(torch.cat([x, x], 1), x, x.to("meta"), x, t, table, 0, 2),
         "x_t: expected a tensor on cpu"),
    ]
    for call, message in calls:
        with pytest.raises(RuntimeError) as info:
            call()
        assert message in str(info.value), (message, str(info.value))


@needs_fused
def test_fake_ops_raise_what_the_real_ops_raise():
    """Under FakeTensorMode (torch.compile's tracing) every bad shape, dtype or enum raises RuntimeError naming the
    same argument as the C++ op; valid calls give outputs with the real op's shape, dtype and strides."""
    table = make_table()
    x = torch.randn(2, 3, 4, 4)
    t = torch.tensor([0, 1])
    mo2 = torch.cat([x, x], 1)
    q, ddim, ddpm, loss = (torch.ops.diffcore.q_sample, torch.ops.diffcore.ddim_step, torch.ops.diffcore.ddpm_step,
                           torch.ops.diffcore.hybrid_loss)
    bad = [
        (q, (x, x[:, :2], t, table), "noise"),
        (q, (x, x.double(), t, table), "noise"),
        (q, (x.long(), x.long(), t, table), "x0"),
        (q, (x, x, t[:1], table), "t"),
        (q, (x, x, t.int(), table), "t"),
        (q, (x, x, t, table.float()), "alphas_cumprod"),
        (ddim, (x, x[..., :3], t, t, table, 0.0, 0, False, None, 0, 0), "model_output"),
        (ddim, (x, x, t, t[:1], table, 0.0, 0, False, None, 0, 0), "t_prev"),
        (ddim, (x, x, t, t, table, 0.0, 5, False, None, 0, 0), "prediction_type"),
        (ddim, (x, x, t, t, table, -1.0, 0, False, None, 0, 0), "eta"),
        (ddim, (x, x, t, t, table, 1.0, 0, False, None, -3, 0), "seed"),
        (ddim, (x, x, t, t, table, 1.0, 0, False, x[:1], 0, 0), "noise"),
        (ddpm, (x, x, t, table, 0, 2, False, None, 0, 0), "model_output"),
        (ddpm, (x, mo2, t, table, 0, 7, False, None, 0, 0), "variance_type"),
        (ddpm, (x, x, t, table[:1], 0, 0, False, None, 0, 0), "alphas_cumprod"),
        (ddpm, (x, x, t, table, 0, 0, False, None, 0, -1), "offset"),
        (loss, (mo2, x, x, x, t, table, 0, 0), "variance_type"),
        (loss, (mo2, x, x[:1], x, t, table, 0, 2), "x_t"),
    ]
    for op, args, name in bad:
        with pytest.raises(RuntimeError) as real:
            op(*args)
        with pytest.raises(RuntimeError) as fake:
            _fake_call(op, args)
        for info in (real, fake):
            assert str(info.value).startswith(f"{name}:"), (op, name, str(info.value))
    cl = x.contiguous(memory_format=torch.channels_last)
    strided = torch.randn(2, 3, 4, 8)[..., ::2]
    for op, args in [(q, (cl, cl, t, table)), (q, (strided, strided, t, table)),
                     (ddim, (cl, cl, t, t - 1, table, 1.0, 2, True, None, 3, 4)),
                     (ddpm, (x, mo2, t, table, 1, 3, False, x, 0, 0)), (loss, (mo2, x, x, x, t, table, 0, 2))]:
        real, fake = op(*args), _fake_call(op, args)
        for r, f in zip(real if isinstance(real, tuple) else (real,), fake if isinstance(fake, tuple) else (fake,)):
            assert (f.shape, f.dtype, f.stride(), f.device) == (r.shape, r.dtype, r.stride(), r.device)
