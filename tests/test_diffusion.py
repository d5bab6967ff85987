"""The Gaussian diffusion process against independent computations: Bayes' rule for the posterior, DDPM's
eq. 11 for the model mean, closed-form Gaussian KLs and the exact normal CDF for the loss terms, and the true
NLL of Gaussian data for the bound."""
from __future__ import annotations

import math

import pytest
import torch

from diffcore import ops
from diffcore.analytic import GaussianData
from diffcore.diffusion import GaussianDiffusion, LossType, as_loss_type, log2_bin_width
from diffcore.schedules import make_schedule

torch.set_num_threads(1)
F64 = torch.float64


# --------------------------------------------------------------------------------- independent reference math
def bayes_posterior(x0, x_t, abar_t, abar_s):
    """q(x_s | x_t, x0) for s < t as the normalized product N(x_t; sqrt(abar_t/abar_s) x_s, 1 - abar_t/abar_s)
    N(x_s; sqrt(abar_s) x0, 1 - abar_s), worked out as a Gaussian in x_s: (mean, variance)."""
    a = abar_t / abar_s
    precision = a / (1 - a) + 1 / (1 - abar_s)
    mean = (a.sqrt() * x_t / (1 - a) + abar_s.sqrt() * x0 / (1 - abar_s)) / precision
    return mean, 1 / precision


def gauss_kl_bits(m1, v1, m2, v2):
    """KL(N(m1, v1) || N(m2, v2)) in bits, elementwise."""
    return (0.5 * torch.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5) / math.log(2)


def tanh_cdf(z):
    """The spec's approximation of the standard normal CDF (DESIGN.md sec. 3), written out here."""
    return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))


def decoder_nll_bits(x, mean, var, cdf=tanh_cdf):
    """-log2 of the Gaussian mass of x's bin (width 2/255, edge bins open, mass clamped at 1e-12)."""
    std = var.sqrt()
    upper = torch.where(x > 0.999, torch.ones_like(x), cdf((x + 1 / 255 - mean) / std))
    lower = torch.where(x < -0.999, torch.zeros_like(x), cdf((x - 1 / 255 - mean) / std))
    return -torch.log2((upper - lower).clamp(min=1e-12))  # the spec clamps the mass at 1e-12


def tables(schedule, t):
    abar = schedule.alphas_cumprod[t]
    abar_prev = torch.where(t > 0, schedule.alphas_cumprod[(t - 1).clamp(min=0)], torch.ones_like(abar))
    beta = 1 - abar / abar_prev
    return abar, abar_prev, beta


def col(v, like):
    return v.reshape(-1, *([1] * (like.dim() - 1)))


class ToyModel:
    """A deterministic model with a learned-range output: prediction 0.3 x + 0.002 t, v = tanh(0.7 x + 0.1)."""

    def __init__(self, learned):
        self.learned = learned
        self.seen_t = []

    def __call__(self, x, t, **kwargs):
        self.seen_t.append(t.clone())
        pred = 0.3 * x + 0.002 * col(t.to(x.dtype), x)
        if not self.learned:
            return pred
        return torch.cat([pred, torch.tanh(0.7 * x + 0.1)], dim=1)


@pytest.fixture(scope="module")
def schedule():
    return make_schedule("cosine", 200)


def batch(seed=0, B=6, shape=(2, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(B, *shape, generator=g, dtype=F64) * 2 - 1
    x0[0, 0, 0, 0], x0[1, 0, 0, 0] = 1.0, -1.0  # exercise the open edge bins
    noise = torch.randn(B, *shape, generator=g, dtype=F64)
    t = torch.tensor([0, 1, 5, 57, 198, 199][:B], dtype=torch.int64)
    return x0, noise, t


# ---------------------------------------------------------------------------------------- forward & posterior
def test_q_sample_and_q_mean_variance(schedule):
    d = GaussianDiffusion(schedule)
    x0, noise, t = batch()
    abar = col(schedule.alphas_cumprod[t], x0)
    expected = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    torch.testing.assert_close(d.q_sample(x0, t, noise), expected, rtol=1e-12, atol=1e-12)
    mean, var, log_var = d.q_mean_variance(x0, t)
    torch.testing.assert_close(mean, abar.sqrt() * x0)
    torch.testing.assert_close(var, 1 - abar)
    torch.testing.assert_close(log_var, torch.log(1 - abar))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(d.q_sample(x0, t, generator=g1), d.q_sample(x0, t, generator=g2))


def test_posterior_matches_bayes_rule(schedule):
    d = GaussianDiffusion(schedule)
    x0, noise, t = batch()
    x_t = d.q_sample(x0, t, noise)
    post = d.q_posterior_mean_variance(x0, x_t, t)
    abar, abar_prev, _ = tables(schedule, t)
    inner = t > 0
    mean, var = bayes_posterior(x0[inner], x_t[inner], col(abar[inner], x0), col(abar_prev[inner], x0))
    torch.testing.assert_close(post.mean[inner], mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(post.variance[inner].expand_as(mean), var.expand_as(mean), rtol=1e-10, atol=0)
    # t = 0: x_{-1} is x0 itself: mean x0, variance 0 (its log is clipped to the value at t = 1)
    torch.testing.assert_close(post.mean[~inner], x0[~inner], rtol=0, atol=1e-12)
    assert post.variance[~inner].abs().max().item() == 0.0
    assert post.log_variance[0].item() == pytest.approx(math.log(schedule.posterior_variance[1].item()), rel=1e-12)


def test_respaced_posterior_is_bayes_between_kept_timesteps(schedule):
    """The respaced process's one-step posterior is the original process's posterior between t_i and t_(i-1)."""
    base = GaussianDiffusion(schedule)
    d = base.respaced("ddim20")  # keeps 0, 10, ..., 190
    x0, noise, _ = batch()
    idx = torch.tensor([1, 2, 7, 12, 18, 19])
    t_orig, t_prev_orig = idx * 10, (idx - 1) * 10
    x_t = base.q_sample(x0, t_orig, noise)
    post = d.q_posterior_mean_variance(x0, x_t, idx)
    mean, var = bayes_posterior(x0, x_t, col(schedule.alphas_cumprod[t_orig], x0),
                                col(schedule.alphas_cumprod[t_prev_orig], x0))
    torch.testing.assert_close(post.mean, mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(post.variance.expand_as(var), var.expand_as(var), rtol=1e-10, atol=0)
    assert d.model_timesteps(idx).tolist() == t_orig.tolist()
    assert d.respaced([0, 5, 19]).original_timesteps == (0, 50, 190)  # respacing composes


# ------------------------------------------------------------------------------------------- model mean & var
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range", "learned"])
def test_p_mean_variance(schedule, prediction, variance):
    d = GaussianDiffusion(schedule, prediction, variance)
    x0, noise, t = batch()
    x_t = d.q_sample(x0, t, noise)
    model = ToyModel(learned=d.variance_type.is_learned)
    out = d.p_mean_variance(model, x_t, t)
    pred = model(x_t, t)[:, :2]
    abar, abar_prev, beta = (col(v, x0) for v in tables(schedule, t))
    # x0_hat from each parameterization, derived independently
    if prediction == "eps":
        x0_hat = (x_t - (1 - abar).sqrt() * pred) / abar.sqrt()
        mean = (x_t - beta / (1 - abar).sqrt() * pred) / (1 - beta).sqrt()  # DDPM eq. 11
    else:
        x0_hat = pred if prediction == "x0" else abar.sqrt() * x_t - (1 - abar).sqrt() * pred  # Salimans & Ho
        mean = bayes_posterior(x0_hat[t > 0], x_t[t > 0], abar[t > 0], abar_prev[t > 0])[0]
    torch.testing.assert_close(out.pred_x0, x0_hat, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.mean[t > 0], mean[t > 0] if prediction == "eps" else mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.mean[t == 0], x0_hat[t == 0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x_t, abar.sqrt() * out.pred_x0 + (1 - abar).sqrt() * out.pred_eps)
    post_var = schedule.posterior_variance
    small = col(torch.where(t > 0, post_var[t], post_var[1]), x0)
    large = col(torch.where(t > 0, schedule.betas[t], post_var[1]), x0)
    if variance == "fixed_small":
        expected = small
    elif variance == "fixed_large":
        expected = large
    else:
        v = torch.tanh(0.7 * x_t + 0.1)
        if variance == "learned":
            expected = v.exp()
        else:
            frac = (v + 1) / 2
            expected = torch.exp(frac * torch.log(beta) + (1 - frac) * torch.log(small))
    torch.testing.assert_close(out.variance.expand_as(x0), expected.expand_as(x0), rtol=1e-9, atol=0)


def test_clipping_clamps_x0_and_rederives_eps(schedule):
    d = GaussianDiffusion(schedule, "x0")
    x_t = torch.full((2, 1, 2, 2), 0.5, dtype=F64)
    t = torch.tensor([50, 150])
    out = d.p_mean_variance(lambda x, t: torch.full_like(x, 3.0), x_t, t, clip_denoised=True)
    assert torch.equal(out.pred_x0, torch.ones_like(x_t))
    abar = col(schedule.alphas_cumprod[t], x_t)
    torch.testing.assert_close(out.pred_eps, (x_t - abar.sqrt()) / (1 - abar).sqrt())


# ------------------------------------------------------------------------------------------------ the losses
def independent_terms(schedule, x0, noise, t, out, prediction, variance):
    """(mse, vb in bits) computed from scratch for a learned-range / fixed-small eps, x0 or v model."""
    abar, abar_prev, beta = (col(v, x0) for v in tables(schedule, t))
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    pred = out[:, :x0.shape[1]]
    target = {"eps": noise, "x0": x0, "v": abar.sqrt() * noise - (1 - abar).sqrt() * x0}[prediction]
    mse = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    x0_hat = {"eps": (x_t - (1 - abar).sqrt() * pred) / abar.sqrt(), "x0": pred,
              "v": abar.sqrt() * x_t - (1 - abar).sqrt() * pred}[prediction]
    post_var = schedule.posterior_variance
    small = col(torch.where(t > 0, post_var[t], post_var[1]), x0)
    if variance == "learned_range":
        frac = (out[:, x0.shape[1]:] + 1) / 2
        model_var = torch.exp(frac * torch.log(beta) + (1 - frac) * torch.log(small))
    else:
        model_var = small.expand_as(x0)
    vb = torch.zeros(len(t), dtype=F64)
    inner = t > 0
    true_mean, true_var = bayes_posterior(x0[inner], x_t[inner], abar[inner], abar_prev[inner])
    model_mean, _ = bayes_posterior(x0_hat[inner], x_t[inner], abar[inner], abar_prev[inner])
    vb[inner] = gauss_kl_bits(true_mean, true_var, model_mean, model_var[inner]).mean(dim=(1, 2, 3))
    vb[~inner] = decoder_nll_bits(x0[~inner], x0_hat[~inner], model_var[~inner]).mean(dim=(1, 2, 3))
    return mse, vb


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("loss_type", ["mse", "rescaled_mse", "kl", "rescaled_kl"])
def test_training_losses_terms_learned_range(schedule, prediction, loss_type):
    d = GaussianDiffusion(schedule, prediction, "learned_range", loss_type)
    x0, noise, t = batch()
    model = ToyModel(learned=True)
    losses = d.training_losses(model, x0, t, noise)
    out = model(losses.x_t, t)
    mse, vb = independent_terms(schedule, x0, noise, t, out, prediction, "learned_range")
    torch.testing.assert_close(losses.mse, mse, rtol=1e-9, atol=1e-12)
    inner = t > 0
    torch.testing.assert_close(losses.vb, vb, rtol=1e-8, atol=1e-12)
    T = schedule.num_timesteps
    expected_loss = {"mse": mse + vb, "rescaled_mse": mse + T / 1000 * vb, "kl": vb, "rescaled_kl": T * vb}[loss_type]
    torch.testing.assert_close(losses.loss[inner], expected_loss[inner], rtol=1e-8, atol=1e-12)


def test_decoder_tanh_cdf_is_close_to_the_exact_normal_cdf():
    """Where the decoder mean is within 2 standard deviations of x0 (a sensible model), the tanh-CDF decoder
    NLL is within 0.5% of the exact one (the approximation degrades in the far tails)."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4000, generator=g, dtype=F64) * 2 - 1
    std = torch.rand(4000, generator=g, dtype=F64) * 0.05 + 0.002
    mean = x + std * torch.randn(4000, generator=g, dtype=F64).clamp(-2, 2)
    approx = decoder_nll_bits(x, mean, std**2)
    exact = decoder_nll_bits(x, mean, std**2, cdf=torch.special.ndtr)
    torch.testing.assert_close(approx, exact, rtol=5e-3, atol=2e-3)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_training_losses_fixed_variance(schedule, prediction):
    x0, noise, t = batch()
    d = GaussianDiffusion(schedule, prediction, "fixed_small", "mse")
    model = ToyModel(learned=False)
    losses = d.training_losses(model, x0, t, noise)
    mse, vb = independent_terms(schedule, x0, noise, t, model(losses.x_t, t), prediction, "fixed_small")
    torch.testing.assert_close(losses.loss, mse, rtol=1e-9, atol=1e-12)
    assert losses.vb is None
    kl = GaussianDiffusion(schedule, prediction, "fixed_small", "kl").training_losses(model, x0, t, noise)
    torch.testing.assert_close(kl.loss[t > 0], vb[t > 0], rtol=1e-8, atol=1e-12)


def test_hybrid_loss_trains_variance_only_through_vb(schedule):
    """rescaled_mse: the gradient on the prediction channels is exactly that of the mse (stop-grad on the mean);
    kl: the vb term does move the prediction channels."""
    x0, noise, t = batch()
    t = t.clamp(min=1)
    pred = (0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(5), dtype=F64))
    v = torch.full_like(x0, 0.2)
    grads = {}
    for loss_type in ("rescaled_mse", "kl"):
        param = torch.cat([pred, v], dim=1).requires_grad_(True)
        d = GaussianDiffusion(schedule, "eps", "learned_range", loss_type)
        d.training_losses(lambda x, t: param, x0, t, noise).loss.sum().backward()
        grads[loss_type] = param.grad
    n = x0[0].numel()
    torch.testing.assert_close(grads["rescaled_mse"][:, :2], 2 * (pred - noise) / n, rtol=1e-10, atol=1e-14)
    assert grads["rescaled_mse"][:, 2:].abs().min() > 0
    assert grads["kl"][:, :2].abs().max() > 1e-6


def test_hybrid_loss_op_equals_vb_terms_with_stopped_mean(schedule):
    x0, noise, t = batch()
    d = GaussianDiffusion(schedule, "v", "learned_range", "rescaled_mse")
    model = ToyModel(learned=True)
    losses = d.training_losses(model, x0, t, noise)
    vb, _ = d.vb_terms_bpd(model(losses.x_t, t), x0, losses.x_t, t, detach_mean=True)
    torch.testing.assert_close(losses.vb, vb, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("variance", ["fixed_large", "learned_range"])
def test_training_losses_fused_and_reference_agree(schedule, variance):
    if not ops.fused_available("cpu"):
        pytest.skip("the fused CPU kernels are not built")
    x0, noise, t = (v.float() if v.is_floating_point() else v for v in batch(B=6, shape=(3, 8, 8)))
    d = GaussianDiffusion(schedule, "eps", variance, "rescaled_mse")
    fused = d.training_losses(ToyModel(variance == "learned_range"), x0, t, noise, impl="fused")
    ref = d.training_losses(ToyModel(variance == "learned_range"), x0, t, noise, impl="reference")
    torch.testing.assert_close(fused.loss, ref.loss, rtol=2e-5, atol=1e-6)


def test_respaced_training_gives_model_original_timesteps(schedule):
    d = GaussianDiffusion(schedule, "eps", "learned_range", "rescaled_mse").respaced("ddim20")
    model = ToyModel(learned=True)
    x0, noise, _ = batch()
    d.training_losses(model, x0, torch.tensor([0, 1, 2, 3, 18, 19]), noise)
    assert model.seen_t[0].tolist() == [0, 10, 20, 30, 180, 190]


# ---------------------------------------------------------------------------------------------- bits per dim
def test_calc_bpd_loop_structure(schedule):
    s = make_schedule("cosine", 12)
    d = GaussianDiffusion(s, "eps", "fixed_small")
    x0, _, _ = batch(B=3)
    model = ToyModel(learned=False)
    result = d.calc_bpd_loop(model, x0, clip_denoised=False, generator=torch.Generator().manual_seed(7))
    abar_T = s.alphas_cumprod[-1]
    prior = gauss_kl_bits(abar_T.sqrt() * x0, 1 - abar_T, torch.zeros_like(x0), torch.ones_like(x0)).mean((1, 2, 3))
    torch.testing.assert_close(result.prior_bpd, prior, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(result.total_bpd, result.prior_bpd + result.vb.sum(1))
    g = torch.Generator().manual_seed(7)  # the loop draws the noise for t = T-1, ..., 0 in that order
    for t_value in range(11, -1, -1):
        noise = torch.randn(x0.shape, generator=g, dtype=F64)
        t = torch.full((3,), t_value)
        x_t = d.q_sample(x0, t, noise)
        _, vb = independent_terms(s, x0, noise, t, model(x_t, t), "eps", "fixed_small")
        torch.testing.assert_close(result.vb[:, t_value], vb, rtol=1e-8, atol=1e-12)
        pred_x0 = (x_t - (1 - s.alphas_cumprod[t_value]).sqrt() * model(x_t, t)) / s.alphas_cumprod[t_value].sqrt()
        torch.testing.assert_close(result.xstart_mse[:, t_value], ((pred_x0 - x0) ** 2).mean((1, 2, 3)))
    assert result.decoder_bpd.shape == (3,)


def test_bound_approaches_true_nll_of_gaussian_data():
    """With the exact reverse process of Gaussian data (mean and learned variance in closed form) the bound equals
    the NLL of the discretized data: -log2 p(x0) per dimension - log2(2/255) (the decoder's bin width), up to the
    tanh approximation of the CDF in the decoder (~0.01 bit). A fixed-variance model has a clearly larger bound."""
    s = make_schedule("linear", 100)
    data = GaussianData(torch.tensor([0.3, -0.2]), torch.diag(torch.tensor([0.04, 0.02])), s.alphas_cumprod)
    x0 = data.sample(20000, torch.Generator().manual_seed(0))
    true_bpd = -data.log_prob(x0) / (2 * math.log(2)) - log2_bin_width()
    exact = GaussianDiffusion(s, "eps", "learned")
    result = exact.calc_bpd_loop(data.model(exact), x0, clip_denoised=False,
                                 generator=torch.Generator().manual_seed(1))
    diff = result.total_bpd - true_bpd
    standard_error = diff.std().item() / math.sqrt(len(diff))
    assert abs(diff.mean().item()) < 4 * standard_error + 0.01, (diff.mean().item(), standard_error)
    fixed = GaussianDiffusion(s, "eps", "fixed_small")
    loose = fixed.calc_bpd_loop(data.model(fixed), x0[:2000], clip_denoised=False,
                                generator=torch.Generator().manual_seed(1))
    assert loose.total_bpd.mean().item() > true_bpd[:2000].mean().item() + 0.5


# --------------------------------------------------------------------------------------------------- errors
def test_wrong_output_channels_are_clear_errors(schedule):
    x0, noise, t = batch()
    learned = GaussianDiffusion(schedule, "eps", "learned_range", "rescaled_mse")
    with pytest.raises(ValueError, match=r"model output: expected shape \(6, 4, 3, 3\) for "
                                         r"variance_type='learned_range'.*learn_sigma=True.*got \(6, 2, 3, 3\)"):
        learned.training_losses(ToyModel(learned=False), x0, t, noise)
    fixed = GaussianDiffusion(schedule, "eps", "fixed_small")
    with pytest.raises(ValueError, match=r"variance_type='fixed_small'.*got \(6, 4, 3, 3\)"):
        fixed.p_mean_variance(ToyModel(learned=True), x0, t)
    with pytest.raises(TypeError, match="model output: expected a torch.Tensor"):
        fixed.training_losses(lambda x, t: x.numpy(), x0, t, noise)


def test_constructor_errors_are_clear(schedule):
    with pytest.raises(TypeError, match="schedule: expected a NoiseSchedule"):
        GaussianDiffusion("linear")
    with pytest.raises(ValueError, match="loss_type: expected one of 'mse', 'rescaled_mse', 'kl', 'rescaled_kl'"):
        GaussianDiffusion(schedule, loss_type="l1")
    with pytest.raises(ValueError, match="variance_type"):
        GaussianDiffusion(schedule, variance_type="big")
    zero_snr = make_schedule("linear", 1000, rescale_to_zero_terminal_snr=True)
    with pytest.raises(ValueError, match="zero-terminal-SNR schedule.*needs 'v' prediction, got 'eps'"):
        GaussianDiffusion(zero_snr, "eps")
    assert GaussianDiffusion(zero_snr, "v").schedule.has_zero_terminal_snr
    assert as_loss_type("hybrid") == LossType.RESCALED_MSE


# --------------------------------------------------------------------------------------- diffusers conventions
@pytest.mark.parametrize("name, ours", [("epsilon", "eps"), ("sample", "x0"), ("v_prediction", "v")])
def test_diffusers_names_mean_what_diffusers_means(name, ours):
    """A diffusers DDIMScheduler step (float64 arithmetic) with its prediction_type and beta_schedule names equals
    diffcore's DDIM step given the same names; the names are aliases of diffcore's own."""
    diffusers = pytest.importorskip("diffusers")
    from diffcore.types import as_prediction_type

    assert as_prediction_type(name) == as_prediction_type(ours) == as_prediction_type(f" {name.upper()} ")
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=200, beta_schedule="squaredcos_cap_v2",
                                        prediction_type=name, clip_sample=False, set_alpha_to_one=True)
    schedule = make_schedule("squaredcos_cap_v2", 200)
    torch.testing.assert_close(schedule.alphas_cumprod, scheduler.alphas_cumprod.double(), rtol=1e-6, atol=1e-7)
    scheduler.alphas_cumprod = schedule.alphas_cumprod  # the same float64 table, so that only rounding differs
    scheduler.set_timesteps(10)  # t = 180 -> 160
    x0, noise, _ = batch()
    x_t, output = x0 + noise, 0.5 * noise - 0.2 * x0
    expected = scheduler.step(output, 180, x_t, eta=0.0).prev_sample
    d = GaussianDiffusion(schedule, name)
    t = torch.full((x0.shape[0],), 180)
    x_prev, _ = ops.ddim_step(x_t, output, t, t - 20, d.alphas_cumprod, prediction_type=name)
    torch.testing.assert_close(x_prev, expected, rtol=1e-12, atol=1e-12)


def test_model_output_conventions(schedule):
    """The one unwrap (model_output_tensor) and the one check (split_model_output)."""
    from diffcore.diffusion import model_output_tensor, split_model_output
    from diffcore.types import VarianceType

    x = torch.randn(2, 3, 4, 4)
    out = torch.randn(2, 6, 4, 4)
    for wrapped in (out, (out, None), [out], {"sample": out}, type("Output", (), {"sample": out})()):
        assert model_output_tensor(wrapped) is out
    prediction, variance = split_model_output(out, x, VarianceType.LEARNED_RANGE)
    assert torch.equal(torch.cat([prediction, variance], 1), out) and prediction.shape == x.shape
    assert split_model_output(out, x)[1] is not None and split_model_output(x, x) == (x, None)
    with pytest.raises(ValueError, match=r"model output: expected shape \(2, 3, 4, 4\) for variance_type="
                                         r"'fixed_small' \(C channels like x"):
        split_model_output(out, x, VarianceType.FIXED_SMALL)
    with pytest.raises(ValueError, match=r"guided: expected shape \(2, 3, 4, 4\) or \(2, 6, 4, 4\) \(learned "
                                         r"variance\) for x of shape \(2, 3, 4, 4\), got \(2, 5, 4, 4\)"):
        split_model_output(out[:, :5], x, what="guided")
    with pytest.raises(TypeError, match="model output: expected a torch.Tensor, an object with a .sample"):
        model_output_tensor({"pred": out})
    # call_model unwraps, checks and casts once
    d = GaussianDiffusion(schedule, "eps", "learned_range")
    got = d.call_model(lambda x, t: {"sample": out.double()}, x, torch.zeros(2, dtype=torch.int64))
    assert got.dtype == x.dtype and torch.equal(got, out)


# ------------------------------------------------------------------------- precision of the x0 / eps coefficients
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_predict_x0_eps_coefficients_are_float64_then_cast(prediction):
    """Issue 15: at t = 0 of the cosine schedule abar is ~1 - 4e-8, and sqrt(1/abar - 1) computed from a float32 abar
    cancels (9.6e-4 relative). The float32 result must be as close to a float64 computation (done here from the
    spec's formulas, independently of diffcore) as the fused op's float32 pred_x0 is: at most twice its error."""
    d = GaussianDiffusion(make_schedule("cosine", 1000), prediction)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=gen)
    out = torch.randn(4, 3, 8, 8, generator=gen)
    t = torch.tensor([0, 0, 1, 2])
    abar = col(d.alphas_cumprod[t], x)
    x64, out64 = x.double(), out.double()
    if prediction == "eps":
        x0_ref, eps_ref = (1 / abar).sqrt() * x64 - (1 / abar - 1).sqrt() * out64, out64
    elif prediction == "x0":
        x0_ref, eps_ref = out64, ((1 / abar).sqrt() * x64 - out64) / (1 / abar - 1).sqrt()
    else:
        x0_ref = abar.sqrt() * x64 - (1 - abar).sqrt() * out64
        eps_ref = abar.sqrt() * out64 + (1 - abar).sqrt() * x64
    x0, eps = d.predict_x0_eps(out, x, t)
    assert x0.dtype == eps.dtype == torch.float32
    _, x0_op = ops.ddim_step(x, out, t, t - 1, d.alphas_cumprod, 0.0, prediction_type=prediction, impl="reference")
    op_error = ((x0_op.double() - x0_ref).abs().max() / x0_ref.abs().max()).item()
    assert op_error < 1e-6
    err = lambda a, b: ((a.double() - b).abs().max() / b.abs().max()).item()  # noqa: E731
    assert err(x0, x0_ref) <= max(2 * op_error, 2 ** -23)
    assert err(eps, eps_ref) <= 2 * 2 ** -23 + 2 * op_error
    # it reaches p_mean_variance's pred_x0 too
    pmv = d.p_mean_variance(None, x, t, model_output=out)
    assert err(pmv.pred_x0, x0_ref) <= max(2 * op_error, 2 ** -23)
