"""Samplers against Gaussian data whose optimal model is known in closed form (diffcore.analytic), plus the
identities between samplers, reproducibility, the fused/reference agreement and the front door."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

import diffcore
from diffcore import ops
from diffcore.analytic import GaussianData
from diffcore.diffusion import GaussianDiffusion
from diffcore.samplers import (ddim_invert, ddim_sample, ddpm_sample, initial_noise, ode_sample, ode_sigmas, slerp,
                               slerp_path)
from diffcore.images import save_image_grid
from diffcore.schedules import make_schedule

torch.set_num_threads(1)
F64 = torch.float64
MU = torch.tensor([0.3, -0.2], dtype=F64)
FULL_COV = torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=F64)
DIAG_COV = torch.diag(torch.tensor([0.5, 0.2], dtype=F64))


@pytest.fixture(scope="module")
def linear():
    return make_schedule("linear", 1000)


def assert_matches_gaussian(x, mean, cov, k=4.5):
    """Sample mean and covariance within k standard errors of (mean, cov)."""
    n = x.shape[0]
    se_mean = (cov.diagonal() / n).sqrt()
    assert ((x.mean(0) - mean).abs() < k * se_mean).all(), (x.mean(0), mean, se_mean)
    se_cov = ((torch.outer(cov.diagonal(), cov.diagonal()) + cov**2) / n).sqrt()
    assert ((torch.cov(x.T) - cov).abs() < k * se_cov).all(), (torch.cov(x.T), cov, se_cov)


def toy_image_model(learned=False):
    """A smooth deterministic model on images [B, C, H, W] (not optimal for anything)."""
    def model(x, t, **kwargs):
        pred = 0.5 * torch.tanh(x) + 1e-4 * t.to(x.dtype).reshape(-1, 1, 1, 1)
        return torch.cat([pred, torch.sin(x)], 1) if learned else pred
    return model


# ------------------------------------------------------------------------------------- recovering the data
@pytest.mark.parametrize("variance,steps", [("learned", None), ("learned_range", 20), ("learned_range", "10,5")])
def test_ddpm_with_exact_reverse_variance_recovers_the_gaussian(linear, variance, steps):
    """With the exact mean and variance of q(x_s | x_t), ancestral sampling is exact at any step size, also on a
    respaced process, where learned_range must interpolate the respaced bounds beta'_t and beta~'_t."""
    base = GaussianDiffusion(linear, "eps", variance)
    run = base if steps is None else base.respaced(steps)
    data = GaussianData(MU, DIAG_COV, linear.alphas_cumprod)
    result = ddpm_sample(data.model(run), base, (8000, 2), steps=steps, seed=1, dtype=F64, progress=False)
    assert_matches_gaussian(result.sample, MU, DIAG_COV)


@pytest.mark.parametrize("prediction,variance", [("eps", "fixed_small"), ("v", "fixed_large"), ("x0", "fixed_small")])
def test_ddpm_full_chain_recovers_the_gaussian(linear, prediction, variance):
    d = GaussianDiffusion(linear, prediction, variance)
    data = GaussianData(MU, FULL_COV, linear.alphas_cumprod)
    result = ddpm_sample(data.model(d), d, (8000, 2), seed=2, dtype=F64, progress=False)
    assert_matches_gaussian(result.sample, MU, FULL_COV)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_recovers_the_gaussian(linear, eta):
    d = GaussianDiffusion(linear, "eps")
    data = GaussianData(MU, FULL_COV, linear.alphas_cumprod)
    result = ddim_sample(data.model(d), d, (8000, 2), steps=500, skip_type="even", eta=eta, seed=3, dtype=F64,
                         progress=False)
    assert_matches_gaussian(result.sample, MU, FULL_COV)


def test_zero_terminal_snr_with_v_prediction(linear):
    z = make_schedule("linear", 1000, rescale_to_zero_terminal_snr=True)
    d = GaussianDiffusion(z, "v")
    data = GaussianData(MU, FULL_COV, z.alphas_cumprod)
    for result in (ddim_sample(data.model(d), d, (4000, 2), steps=250, seed=4, dtype=F64, progress=False),
                   ode_sample(data.model(d), d, (4000, 2), steps=50, seed=4, dtype=F64, progress=False)):
        assert torch.isfinite(result.sample).all()
        assert_matches_gaussian(result.sample, MU, FULL_COV, k=6)
    with pytest.raises(ValueError, match="'euler'.*zero terminal"):
        ode_sample(data.model(d), d, (4, 2), steps=[0, 500, 999], solver="euler", progress=False)


# ------------------------------------------------------------------------------------- identities & the ODE
def test_ddim_eta1_equals_ddpm_fixed_small_full_and_respaced(linear):
    """DDIM's eta = 1 step is the DDPM posterior step (DDIM eq. 16); both draw step k's noise at Philox offset k+1,
    so with one seed the chains coincide, over all steps and over a respaced subsequence."""
    d = GaussianDiffusion(linear, "eps", "fixed_small")
    data = GaussianData(MU, FULL_COV, linear.alphas_cumprod)
    model = data.model(d)
    for steps in (None, [0, 7, 100, 350, 999]):
        ddpm = ddpm_sample(model, d, (64, 2), steps=steps, seed=9, dtype=F64, progress=False)
        ddim = ddim_sample(model, d, (64, 2), steps=steps or 1000, eta=1.0, seed=9, dtype=F64, progress=False)
        torch.testing.assert_close(ddim.sample, ddpm.sample, rtol=1e-9, atol=1e-10)
        assert ddim.timesteps == ddpm.timesteps


def test_learned_range_after_respacing_spans_the_respaced_bounds(linear):
    """v = -1 is beta~' (fixed_small) and v = +1 is beta' (fixed_large) of the respaced process."""
    kept = [0, 10, 50, 200, 600, 999]
    learned = GaussianDiffusion(linear, "eps", "learned_range")
    data = GaussianData(MU, FULL_COV, linear.alphas_cumprod)
    eps = data.model(GaussianDiffusion(linear, "eps"))
    for v, fixed in ((-1.0, "fixed_small"), (1.0, "fixed_large")):
        model = lambda x, t, v=v: torch.cat([eps(x, t), torch.full_like(x, v)], 1)  # noqa: E731
        a = ddpm_sample(model, learned, (32, 2), steps=kept, seed=5, dtype=F64, progress=False)
        b = ddpm_sample(eps, GaussianDiffusion(linear, "eps", fixed), (32, 2), steps=kept, seed=5, dtype=F64,
                        progress=False)
        torch.testing.assert_close(a.sample, b.sample, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_ddim_eta0_is_euler_in_sigma_and_scaled_x(linear, prediction):
    d = GaussianDiffusion(linear, prediction)
    data = GaussianData(MU, FULL_COV, linear.alphas_cumprod)
    x_T = initial_noise((16, 2), seed=3, dtype=F64)
    ddim = ddim_sample(data.model(d), d, x_T=x_T, steps=25, progress=False)
    euler = ode_sample(data.model(d), d, x_T=x_T, steps=25, skip_type="uniform", solver="euler", progress=False)
    torch.testing.assert_close(euler.sample, ddim.sample, rtol=1e-10, atol=1e-10)
    sigma = ode_sigmas(linear.alphas_cumprod)
    assert sigma[500].item() == pytest.approx(math.sqrt(1 / linear.alphas_cumprod[500].item() - 1), rel=1e-14)


@pytest.mark.parametrize("name,skip", [("linear", "quad"), ("linear", "quad_full"), ("cosine", "quad_full")])
def test_dpm_solver_pp_2m_converges_faster_than_ddim(name, skip):
    """Error against the exact ODE solution (whitened coordinate constant along the flow): DDIM (Euler) is first
    order, DPM-Solver++(2M) second order (quadratic spacings keep the log-SNR step ratios moderate)."""
    schedule = make_schedule(name, 1000)
    d = GaussianDiffusion(schedule, "eps")
    data = GaussianData(MU, FULL_COV * 0.1, schedule.alphas_cumprod)
    x_T = initial_noise((256, 2), seed=8, dtype=F64)
    errors = {"ddim": [], "dpmpp_2m": []}
    for steps in (10, 20, 40):
        ddim = ddim_sample(data.model(d), d, x_T=x_T, steps=steps, skip_type=skip, progress=False)
        dpm = ode_sample(data.model(d), d, x_T=x_T, steps=steps, skip_type=skip, solver="dpmpp_2m", progress=False)
        exact = data.ode_transport(x_T, schedule.alphas_cumprod[ddim.timesteps[0]].item(), 1.0)
        errors["ddim"].append((ddim.sample - exact).norm(dim=1).mean().item())
        errors["dpmpp_2m"].append((dpm.sample - exact).norm(dim=1).mean().item())
    order = {k: math.log2(v[0] / v[2]) / 2 for k, v in errors.items()}
    assert all(a < b for a, b in zip(errors["dpmpp_2m"], errors["ddim"])), errors
    assert 0.8 < order["ddim"] < 1.3 and order["dpmpp_2m"] > 1.7, (order, errors)


def test_dpm_solver_is_no_worse_than_ddim_on_uniform_timesteps(linear):
    """Uniform-in-t timesteps end with a long log-SNR step into t = 0; it is taken first order, so the solver
    stays at least as accurate as DDIM there."""
    d = GaussianDiffusion(linear, "eps")
    data = GaussianData(MU, FULL_COV * 0.1, linear.alphas_cumprod)
    x_T = initial_noise((256, 2), seed=8, dtype=F64)
    for steps in (10, 20, 40, 100):
        ddim = ddim_sample(data.model(d), d, x_T=x_T, steps=steps, progress=False)
        dpm = ode_sample(data.model(d), d, x_T=x_T, steps=steps, skip_type="uniform", progress=False)
        exact = data.ode_transport(x_T, linear.alphas_cumprod[ddim.timesteps[0]].item(), 1.0)
        assert (dpm.sample - exact).norm(dim=1).mean() <= (ddim.sample - exact).norm(dim=1).mean()


def test_ddim_inversion_reconstruction_error_shrinks_with_steps(linear):
    d = GaussianDiffusion(linear, "eps", "learned_range")  # DDIM uses the first C of the 2C channels
    data = GaussianData(MU, FULL_COV * 0.1, linear.alphas_cumprod)
    model = data.model(d)
    x0 = data.sample(128, torch.Generator().manual_seed(0))
    errors = []
    for steps in (10, 20, 50, 100, 250):
        latent = ddim_invert(model, d, x0, steps=steps, progress=False)
        assert latent.timesteps == tuple(range(0, 1000, 1000 // steps))
        recon = ddim_sample(model, d, x_T=latent.sample, steps=steps, progress=False)
        errors.append((recon.sample - x0).norm(dim=1).mean().item())
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] / 10 and errors[-1] < 0.02, errors  # first order: ~1/steps
    # the latent is close to the exact ODE image of x0 (a whitened, standard-normal-like code)
    exact = data.ode_transport(x0, 1.0, linear.alphas_cumprod[latent.timesteps[-1]].item())
    assert (latent.sample - exact).norm(dim=1).mean().item() < 0.05


# ------------------------------------------------------------------ model outputs, clipping conventions, callbacks
class SampleOutput:
    """Like diffusers' UNet2DOutput: an object whose .sample is the tensor."""

    def __init__(self, sample):
        self.sample = sample


@pytest.mark.parametrize("wrap", [lambda o: SampleOutput(o), lambda o: (o, "extra"), lambda o: [o],
                                  lambda o: {"sample": o, "other": 1}], ids=["object", "tuple", "list", "dict"])
def test_wrapped_model_outputs_are_unwrapped_by_every_sampler(linear, wrap):
    d = GaussianDiffusion(linear, "eps", "learned_range").respaced(20)
    plain = toy_image_model(learned=True)
    wrapped = lambda x, t: wrap(plain(x, t))  # noqa: E731
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for run in (lambda m: ddpm_sample(m, d, (2, 3, 4, 4), seed=3, progress=False).sample,
                lambda m: ddim_sample(m, d, (2, 3, 4, 4), steps=5, eta=0.5, seed=3, progress=False).sample,
                lambda m: ode_sample(m, d, (2, 3, 4, 4), steps=5, seed=3, progress=False).sample,
                lambda m: ddim_invert(m, d, x0, steps=5, progress=False).sample,
                lambda m: d.training_losses(m, x0, torch.tensor([3, 17]), torch.ones_like(x0)).loss):
        assert torch.equal(run(wrapped), run(plain))


def test_unwrappable_model_outputs_are_clear_errors(linear):
    d = GaussianDiffusion(linear)
    for bad in (lambda x, t: {"prediction": x}, lambda x, t: (), lambda x, t: None, lambda x, t: SampleOutput(None)):
        with pytest.raises(TypeError, match=r"model output: expected a torch.Tensor, an object with a .sample"):
            ddim_sample(bad, d, (2, 2), steps=3, progress=False)


def ddim_step_by_hand(x, eps, abar_t, abar_s, rederive):
    """One deterministic clipped DDIM step written out in float64 (DDIM eq. 12 with eta = 0)."""
    x0 = (x - (1 - abar_t) ** 0.5 * eps) / abar_t**0.5
    clipped = x0.clamp(-1, 1)
    if rederive:
        eps = (x - abar_t**0.5 * clipped) / (1 - abar_t) ** 0.5
    return abar_s**0.5 * clipped + (1 - abar_s) ** 0.5 * eps, clipped


@pytest.mark.parametrize("rederive", [True, False])
def test_clipped_ddim_step_rederives_eps_or_keeps_the_models(linear, rederive):
    d = GaussianDiffusion(linear)
    x_T = 3.0 * torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(1), dtype=F64)  # clipping binds
    model = toy_image_model()
    result = ddim_sample(model, d, x_T=x_T, steps=[300, 600], clip_denoised=True, rederive_eps_from_clipped_x0=rederive,
                         return_intermediates=True, progress=False)
    abar = linear.alphas_cumprod
    expected, clipped = ddim_step_by_hand(x_T, model(x_T, torch.full((4,), 600)), abar[600], abar[300], rederive)
    unclipped_x0 = (x_T - (1 - abar[600]).sqrt() * model(x_T, torch.full((4,), 600))) / abar[600].sqrt()
    assert not torch.equal(clipped, unclipped_x0)  # clipping binds
    torch.testing.assert_close(result.x_t[0], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.pred_x0[0], clipped, rtol=1e-12, atol=1e-12)
    other = ddim_sample(model, d, x_T=x_T, steps=[300, 600], clip_denoised=True,
                        rederive_eps_from_clipped_x0=not rederive, progress=False)
    assert not torch.allclose(other.sample, result.sample)  # the two conventions differ where clipping binds
    unclipped = [ddim_sample(model, d, x_T=x_T, steps=[300, 600], rederive_eps_from_clipped_x0=flag,
                             progress=False).sample for flag in (True, False)]
    assert torch.equal(*unclipped)  # without clipping the option changes nothing


@pytest.mark.parametrize("eta", [0.0, 0.6])
@pytest.mark.parametrize("use_clipped_model_output", [True, False])
def test_ddim_matches_diffusers_ddim_scheduler_on_a_diffusers_unet(eta, use_clipped_model_output):
    """A diffusers UNet2DModel (returning UNet2DOutput) sampled by diffcore's DDIM and by diffusers' DDIMScheduler
    from the same x_T, with the same noise (diffcore's Philox draw of step k handed to diffusers as
    variance_noise) and clip_sample=True in both of its conventions; in float64, so that only rounding differs."""
    diffusers = pytest.importorskip("diffusers")
    from diffcore.reference.philox import philox_normal_like
    from diffcore.schedules import NoiseSchedule

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=2, out_channels=2, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).double().eval()
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=100, beta_schedule="linear", beta_start=1e-3,
                                        beta_end=0.2, clip_sample=True, set_alpha_to_one=True)
    scheduler.set_timesteps(10)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()  # its scalar arithmetic in float64 too
    x_T = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(2), dtype=F64)
    seed = 7
    x = x_T
    with torch.no_grad():
        for k, t in enumerate(scheduler.timesteps):
            noise = philox_normal_like(x, seed, k + 1) if eta > 0 else None
            x = scheduler.step(unet(x, t).sample, t, x, eta=eta, use_clipped_model_output=use_clipped_model_output,
                               variance_noise=noise).prev_sample
    d = GaussianDiffusion(NoiseSchedule.from_alphas_cumprod(scheduler.alphas_cumprod.double()), "epsilon")
    ours = ddim_sample(unet, d, x_T=x_T, steps=10, skip_type="uniform", eta=eta, clip_denoised=True,
                       rederive_eps_from_clipped_x0=use_clipped_model_output, seed=seed, progress=False)
    assert ours.timesteps == tuple(scheduler.timesteps.tolist())
    torch.testing.assert_close(ours.sample, x, rtol=1e-10, atol=1e-10)
    other = ddim_sample(unet, d, x_T=x_T, steps=10, eta=eta, clip_denoised=True, seed=seed, progress=False,
                        rederive_eps_from_clipped_x0=not use_clipped_model_output)
    assert (other.sample - x).abs().max() > 1e-3  # the test tells the two conventions apart


def test_callback_sees_each_step_like_the_intermediates_and_can_stop(linear):
    """callback(step, t, x, pred_x0) sees what return_intermediates keeps, with the step's model timestep; returning
    True stops after that step: the result is the state reached then, equal to the full run's state there."""
    d = GaussianDiffusion(linear, "eps", "learned_range")
    model = toy_image_model(learned=True)
    for run in (lambda **kw: ddpm_sample(model, d, (2, 3, 2, 2), steps=6, seed=1, progress=False, **kw),
                lambda **kw: ddim_sample(model, d, (2, 3, 2, 2), steps=6, eta=0.3, seed=1, progress=False, **kw),
                lambda **kw: ode_sample(model, d, (2, 3, 2, 2), steps=6, seed=1, progress=False, **kw),
                lambda **kw: ode_sample(model, d, (2, 3, 2, 2), steps=6, seed=1, solver="heun", progress=False, **kw),
                lambda **kw: ode_sample(model, d, (2, 3, 2, 2), steps=6, seed=1, solver="dpmpp_2m_sde",
                                        progress=False, **kw)):
        seen = []
        result = run(callback=lambda k, t, x, x0: seen.append((k, t, x, x0)), return_intermediates=True)
        assert [k for k, *_ in seen] == list(range(len(result.timesteps)))
        assert [t for _, t, *_ in seen] == list(result.timesteps)
        assert all(torch.equal(x, a) and torch.equal(x0, b) for (_, _, x, x0), a, b in zip(seen, result.x_t,
                                                                                          result.pred_x0))
        assert torch.equal(run(callback=None).sample, result.sample)
        stopped = run(callback=lambda k, t, x, x0: k == 2)
        assert stopped.timesteps == result.timesteps[:3]
        assert torch.equal(stopped.sample, result.x_t[2])
    with pytest.raises(TypeError, match="callback: expected a callable"):
        ddim_sample(model, d, (2, 3, 2, 2), steps=3, callback=3, progress=False)


# ---------------------------------------------------------------------------------- reproducibility & paths
def test_seeds_reproduce_bit_for_bit(linear):
    d = GaussianDiffusion(linear.to("cpu"), "eps", "learned_range").respaced(50)
    model = toy_image_model(learned=True)
    runs = [ddpm_sample(model, d, (6, 3, 4, 4), seed=s, progress=False).sample for s in (11, 11, 12)]
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])
    ddim = [ddim_sample(model, d, (6, 3, 4, 4), steps=10, eta=0.5, seed=11, progress=False).sample for _ in range(2)]
    assert torch.equal(ddim[0], ddim[1])
    by_generator = [ddim_sample(model, d, (6, 3, 4, 4), steps=10, eta=0.5, progress=False,
                                generator=torch.Generator().manual_seed(4)) for _ in range(2)]
    assert torch.equal(by_generator[0].sample, by_generator[1].sample) and by_generator[0].seed is not None
    # Philox counters include the sample index: sample b is the same whatever the batch size
    small = ddpm_sample(model, d, (2, 3, 4, 4), seed=11, progress=False).sample
    assert torch.equal(small, runs[0][:2])


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_fused_and_reference_paths_agree(linear, sampler):
    if not ops.fused_available("cpu"):
        pytest.skip("the fused CPU kernels are not built")
    d = GaussianDiffusion(linear, "eps", "learned_range")
    model = toy_image_model(learned=True)
    kwargs = dict(seed=21, progress=False, clip_denoised=True)
    if sampler == "ddpm":
        run = lambda impl: ddpm_sample(model, d, (4, 3, 8, 8), steps=40, impl=impl, **kwargs)  # noqa: E731
    else:
        run = lambda impl: ddim_sample(model, d, (4, 3, 8, 8), steps=40, eta=0.7, impl=impl, **kwargs)  # noqa: E731
    torch.testing.assert_close(run("fused").sample, run("reference").sample, rtol=1e-4, atol=1e-5)


def test_intermediates_and_original_timesteps(linear):
    d = GaussianDiffusion(linear, "x0").respaced("ddim20")
    seen = []

    def model(x, t):
        seen.append(t[0].item())
        return torch.zeros_like(x)
    result = ddim_sample(model, d, (3, 2), steps=5, return_intermediates=True, seed=0, progress=False)
    assert seen == [800, 600, 400, 200, 0] and result.timesteps == (800, 600, 400, 200, 0)
    assert len(result.x_t) == len(result.pred_x0) == 5
    assert torch.equal(result.x_t[-1], result.sample) and torch.equal(result.pred_x0[-1], result.sample)
    seen.clear()
    ddpm = ddpm_sample(model, d, (3, 2), seed=0, progress=False)
    assert seen == list(range(950, -1, -50)) and ddpm.x_t is None


def test_no_host_device_sync_inside_the_loop(linear, monkeypatch):
    """Once the loop runs (first model call), no tensor value is read back to the host."""
    d = GaussianDiffusion(linear, "eps", "learned_range")
    calls = {"n": 0}

    def forbid(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host inside the sampling loop")

    def model(x, t):
        if calls["n"] == 0:
            for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
                monkeypatch.setattr(torch.Tensor, name, forbid)
        calls["n"] += 1
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:], dtype=x.dtype)
    for impl in ("reference", "auto"):
        for run in (lambda: ddpm_sample(model, d, (2, 3, 4, 4), steps=5, seed=1, progress=False, impl=impl),
                    lambda: ddim_sample(model, d, (2, 3, 4, 4), steps=5, eta=1.0, seed=1, progress=False, impl=impl),
                    lambda: ode_sample(model, d, (2, 3, 4, 4), steps=5, seed=1, progress=False)):
            calls["n"] = 0
            run()
            monkeypatch.undo()
    assert calls["n"] == 5


def test_progress_bar_can_be_turned_off(linear, capsys):
    d = GaussianDiffusion(linear)
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    ddim_sample(model, d, (1, 2), steps=5, seed=0, progress=False)
    assert capsys.readouterr().err == ""
    ddim_sample(model, d, (1, 2), steps=5, seed=0, progress=True)
    assert "DDIM" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- slerp
def test_slerp_keeps_angles_and_norms():
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(5, 3, 4, 4, generator=g, dtype=F64)
    z1 = torch.randn(5, 3, 4, 4, generator=g, dtype=F64)
    z1 = z1 - (z1 * z0).sum((1, 2, 3), keepdim=True) / (z0 * z0).sum((1, 2, 3), keepdim=True) * z0  # orthogonal
    z1 = z1 / z1.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1) * z0.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    mid = slerp(z0, z1, 0.5)
    torch.testing.assert_close(mid, (z0 + z1) / math.sqrt(2))  # the 45-degree point of a quarter circle
    torch.testing.assert_close(mid.flatten(1).norm(dim=1), z0.flatten(1).norm(dim=1))
    assert torch.equal(slerp(z0, z1, 0.0), z0)
    torch.testing.assert_close(slerp(z0, z1, 1.0), z1)
    alpha = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=F64)
    out = slerp(z0, z1, alpha).flatten(1)
    angle = torch.arccos((out * z0.flatten(1)).sum(1) / (out.norm(dim=1) * z0.flatten(1).norm(dim=1)))
    torch.testing.assert_close(angle, alpha * math.pi / 2)
    path = slerp_path(z0[0], z1[0], 7)
    assert path.shape == (7, 3, 4, 4)
    torch.testing.assert_close(path[3], mid[0])
    torch.testing.assert_close(slerp(z0, 2 * z0, 0.25), 1.25 * z0)  # parallel: falls back to lerp
    with pytest.raises(ValueError, match="alpha: expected a float or a tensor of shape"):
        slerp(z0, z1, torch.zeros(2))


# ---------------------------------------------------------------------------------------------- front door
class ImageGaussian(torch.nn.Module):
    """The optimal eps model for images [B, 1, 4, 4] with independent N(m_j, s_j^2) pixels, as an nn.Module."""

    def __init__(self, diffusion):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.means = torch.rand(16, generator=g, dtype=F64) * 0.6 - 0.3
        self.vars = torch.rand(16, generator=g, dtype=F64) * 0.03 + 0.01
        self.data = GaussianData(self.means, torch.diag(self.vars), diffusion.alphas_cumprod)
        self.model = self.data.model(diffusion)
        self.image_shape = (1, 4, 4)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t):
        return self.model(x.reshape(x.shape[0], -1), t).reshape(x.shape)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.slow  # multi-second end-to-end test: CI runs it with -m slow
def test_sample_front_door_recovers_the_data(fast):
    d = GaussianDiffusion(make_schedule("cosine", 200))
    model = ImageGaussian(d).train()
    images = diffcore.sample(model, n=3000, fast=fast, steps=100 if fast else None, seed=5, diffusion=d,
                             progress=False)
    assert images.shape == (3000, 1, 4, 4) and images.dtype == torch.float32 and model.training
    assert images.min() >= -1 and images.max() <= 1
    flat = images.reshape(3000, 16).double()
    se_mean, se_var = (model.vars / 3000).sqrt(), model.vars * math.sqrt(2 / 3000)
    assert ((flat.mean(0) - model.means).abs() < 4.5 * se_mean).all()
    assert ((flat.var(0) - model.vars).abs() < 4.5 * se_var + 0.002).all()
    again = diffcore.sample(model, n=3000, fast=fast, steps=100 if fast else None, seed=5, diffusion=d,
                            progress=False)
    assert torch.equal(images, again)


def test_sample_front_door_default_model(linear, monkeypatch):
    """model=None goes through diffcore.pretrained.load_default(device=...) and uses its diffusion and shape."""
    import types

    from diffcore.pipelines import sample as front_door

    d = GaussianDiffusion(make_schedule("cosine", 50))
    asked = {}

    def load_default(device=None):
        asked["device"] = device
        return types.SimpleNamespace(model=lambda x, t: torch.zeros_like(x), diffusion=d, image_shape=(1, 3, 3))
    monkeypatch.setattr(front_door, "load_default", load_default)
    images = diffcore.sample(n=2, steps=5, seed=0, device="cpu", progress=False)
    assert images.shape == (2, 1, 3, 3) and asked["device"] == "cpu"


def test_sample_front_door_errors(linear):
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(ValueError, match="image_shape: expected"):
        diffcore.sample(model, n=2, progress=False)
    with pytest.raises(ValueError, match="eta: the 'ancestral' sampler takes no eta"):
        diffcore.sample(model, n=2, fast=False, eta=0.5, image_shape=(1, 2, 2), progress=False)
    with pytest.raises(ValueError, match="steps: expected at most the process's 1000 timesteps, got 2000"):
        diffcore.sample(model, n=2, steps=2000, image_shape=(1, 2, 2), progress=False)
    with pytest.raises(ValueError, match="eta: expected a float >= 0"):
        diffcore.sample(model, n=2, eta=-0.1, image_shape=(1, 2, 2), progress=False)
    learned = GaussianDiffusion(linear, "eps", "learned_range")
    with pytest.raises(ValueError, match="variance_type='learned_range'"):
        diffcore.sample(model, n=2, diffusion=learned, image_shape=(1, 2, 2), progress=False)


def test_sampler_errors_are_clear(linear):
    d = GaussianDiffusion(linear)
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(ValueError, match="eta: expected a float >= 0, got -1"):
        ddim_sample(model, d, (2, 2), eta=-1.0, progress=False)
    with pytest.raises(ValueError, match="eta: expected a float >= 0, got nan"):
        ddim_sample(model, d, (2, 2), eta=float("nan"), progress=False)
    with pytest.raises(TypeError, match="dtype: expected a floating-point torch.dtype"):
        ddpm_sample(model, d, (2, 2), dtype=torch.int64, progress=False)
    with pytest.raises(TypeError, match="rederive_eps_from_clipped_x0: expected a bool"):
        ddim_sample(model, d, (2, 2), clip_denoised=True, rederive_eps_from_clipped_x0="no", progress=False)
    with pytest.raises(ValueError, match="steps: expected at most the process's 1000 timesteps, got 1500"):
        ddim_sample(model, d, (2, 2), steps=1500, progress=False)
    with pytest.raises(ValueError, match="steps: expected at most"):
        ddpm_sample(model, d, (2, 2), steps=1001, progress=False)
    with pytest.raises(ValueError, match="shape: expected the output shape"):
        ddim_sample(model, d, progress=False)
    with pytest.raises(ValueError, match=r"shape: expected \(2, 2\) \(that of x_T\)"):
        ddim_sample(model, d, (3, 2), x_T=torch.zeros(2, 2), progress=False)
    with pytest.raises(ValueError, match="solver: expected one of 'euler', 'heun'"):
        ode_sample(model, d, (2, 2), solver="rk4", progress=False)
    with pytest.raises(ValueError, match="seed: expected an int in"):
        ddpm_sample(model, d, (2, 2), seed=-3, progress=False)
    with pytest.raises(ValueError, match=r"model output: expected shape \(2, 2\) for variance_type='fixed_small'"):
        ddim_sample(lambda x, t: torch.zeros(2, 4), d, (2, 2), progress=False)


def test_save_image_grid_round_trip(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 6, 7, generator=g) * 2 - 1
    path = save_image_grid(images, tmp_path / "sub" / "grid.png", nrow=3, padding=1)
    assert os.listdir(tmp_path / "sub") == ["grid.png"]  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not mkstemp's 0600
    pixels = np.asarray(Image.open(path))
    assert pixels.shape == (2 * 7 + 1, 3 * 8 + 1, 3)
    expected = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(pixels[1:7, 1:8], expected[0])
    np.testing.assert_array_equal(pixels[8:14, 9:16], expected[4])  # row 1, column 1
    assert (pixels[:, 0] == 0).all() and (pixels[7:, 17:] == 0).all()  # padding and the empty cell are black
    gray = save_image_grid(torch.zeros(1, 1, 3, 3), tmp_path / "gray.png", padding=0)
    assert Image.open(gray).mode == "L" and np.asarray(Image.open(gray)).tolist() == [[128] * 3] * 3
    with pytest.raises(ValueError, match=r"images: expected shape \[N, C, H, W\]"):
        save_image_grid(torch.zeros(2, 2, 3, 3), tmp_path / "bad.png")
