"""The sampler interface (issue 15) against exact computations: every sampler by name on the exact model of
Gaussian data (diffcore.analytic), Heun's and DPM-Solver++(2M)'s observed order against the closed-form ODE
transport, the SDE sampler's sample distribution, the spacings, the callback's early stop, batch-size
independence, and DDIM inversion on the cosine schedule."""
from __future__ import annotations

import math

import pytest
import torch

from diffcore.analytic import GaussianData
from diffcore.diffusion import GaussianDiffusion
from diffcore.samplers import (SAMPLER_INFO, SAMPLERS, ddim_invert, ddim_sample, karras_timesteps, run_sampler,
                               sampling_timesteps, steps_for_evaluations, trailing_timesteps)
from diffcore.schedules import make_schedule

pytestmark = pytest.mark.usefixtures("one_thread")  # restores the thread count afterwards
F64 = torch.float64
MU = torch.tensor([0.3, -0.2], dtype=F64)
COV = torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=F64)


@pytest.fixture(scope="module")
def linear():
    return make_schedule("linear", 1000)


def whitened_moments_ok(x, mean, cov, k=5.0):
    """Sample mean and covariance within k standard errors (computed here from the Gaussian's own moments)."""
    n = x.shape[0]
    se_mean = (cov.diagonal() / n).sqrt()
    se_cov = ((torch.outer(cov.diagonal(), cov.diagonal()) + cov**2) / n).sqrt()
    return bool(((x.mean(0) - mean).abs() < k * se_mean).all() and ((torch.cov(x.T) - cov).abs() < k * se_cov).all())


def error_at_t0(sampler, d, data, x_T, steps):
    """Max error of the state reached at t = 0 (captured by the callback, before the last step to abar = 1) against
    the exact probability-flow transport from abar_(T-1) to abar_0."""
    reached = {}

    def grab(step, t, x, x0):
        reached["x"] = x.clone()
        return False

    kept = sampling_timesteps(d.alphas_cumprod, steps, "quad_full")
    result = run_sampler(sampler, data.model(d), d, x_T=x_T, steps=kept,
                         schedule="quad_full", callback=lambda s, t, x, x0: grab(s, t, x, x0) if s == len(kept) - 2
                         else None, progress=False)
    abar = d.alphas_cumprod
    exact = data.ode_transport(x_T, float(abar[kept[-1]]), float(abar[kept[0]]))
    assert result.timesteps[-1] == kept[0]
    return float((reached["x"] - exact).abs().max())


@pytest.mark.parametrize("sampler, order", [("euler", 1), ("heun", 2), ("dpm++2m", 2)])
def test_observed_order_of_the_ode_samplers_on_the_exact_model(linear, sampler, order):
    d = GaussianDiffusion(linear, "eps", "fixed_small")
    data = GaussianData(MU, COV, linear.alphas_cumprod)
    x_T = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    errors = [error_at_t0(sampler, d, data, x_T, n) for n in (10, 20, 40)]
    rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(order - 0.35 < r < order + 0.6 for r in rates), (errors, rates)
    assert SAMPLER_INFO[sampler].order == order


def test_sde_sampler_draws_the_data_distribution_and_eta0_is_the_ode(linear):
    d = GaussianDiffusion(linear, "eps", "fixed_small")
    data = GaussianData(MU, COV, linear.alphas_cumprod)
    result = run_sampler("dpm++2m-sde", data.model(d), d, (4000, 2), steps=50, seed=3, dtype=F64, progress=False)
    assert whitened_moments_ok(result.sample, MU, COV)
    ode = run_sampler("dpm++2m", data.model(d), d, (16, 2), steps=20, schedule="quad_full", seed=5, dtype=F64,
                      progress=False)
    sde0 = run_sampler("dpm++2m-sde", data.model(d), d, (16, 2), steps=20, schedule="quad_full", seed=5, eta=0.0,
                       dtype=F64, progress=False)
    torch.testing.assert_close(sde0.sample, ode.sample, rtol=1e-12, atol=1e-12)
    # a poor model gives the wrong distribution: the moment check can fail
    bad = run_sampler("dpm++2m-sde", lambda x, t: 0.5 * data.model(d)(x, t), d, (4000, 2), steps=50, seed=3,
                      dtype=F64, progress=False)
    assert not whitened_moments_ok(bad.sample, MU, COV)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_by_name_samples_the_data_and_keeps_rows_whatever_the_batch(linear, sampler):
    d = GaussianDiffusion(linear, "eps", "learned_range")
    data = GaussianData(MU, COV, linear.alphas_cumprod)
    model = data.model(d)
    steps = steps_for_evaluations(sampler, 50)
    calls = []
    counted = lambda x, t: calls.append(1) or model(x, t)  # noqa: E731
    big = run_sampler(sampler, counted, d, (3000, 2), steps=steps, seed=11, dtype=F64, progress=False)
    assert len(calls) == SAMPLER_INFO[sampler].model_calls(len(big.timesteps)) <= 50  # quad_full may merge steps
    assert whitened_moments_ok(big.sample, MU, COV, k=6.0)
    small = run_sampler(sampler, model, d, (5, 2), steps=steps, seed=11, dtype=F64, progress=False)
    torch.testing.assert_close(small.sample, big.sample[:5], rtol=1e-12, atol=1e-12)


def test_sampler_arguments_are_checked():
    d = GaussianDiffusion(make_schedule("linear", 100))
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(ValueError, match="sampler: expected one of 'ddim'"):
        run_sampler("plms", model, d, (2, 2))
    with pytest.raises(ValueError, match="eta: the 'heun' sampler takes no eta"):
        run_sampler("heun", model, d, (2, 2), eta=0.5)
    with pytest.raises(ValueError, match="skip_type: expected one of 'uniform'"):
        run_sampler("ddim", model, d, (2, 2), schedule="linspace")


def test_trailing_and_karras_spacings(linear):
    assert trailing_timesteps(1000, 4) == [249, 499, 749, 999]
    assert trailing_timesteps(10, 3) == [2, 6, 9]  # round([10, 6.67, 3.33]) - 1, as diffusers
    abar = linear.alphas_cumprod
    for steps in (5, 10, 50):
        kept = karras_timesteps(abar, steps, sigma_max=math.inf)
        assert len(kept) == steps and kept == sorted(set(kept)) and kept[-1] == 999 and kept[0] == 0
    # independent: the EDM sigmas (rho = 7) between the ends, each matched to the timestep of nearest log sigma
    sigma = ((1 - abar) / abar).sqrt()

    def nearest_to_edm_sigmas(hi, steps=10):
        lo = float(sigma[0])
        targets = [(hi ** (1 / 7) + i / (steps - 1) * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7 for i in range(steps)]
        return sorted(int((sigma.log() - math.log(s)).abs().argmin()) for s in targets)

    assert float(sigma[-1]) > 150  # the linear schedule ends at sigma 157: the whole range, or capped at EDM's 80
    assert karras_timesteps(abar, 10, sigma_max=math.inf) == nearest_to_edm_sigmas(float(sigma[-1]))
    assert karras_timesteps(abar, 10) == nearest_to_edm_sigmas(80.0)
    assert karras_timesteps(abar, 10, sigma_max=20.0) == nearest_to_edm_sigmas(20.0)
    assert abs(float(sigma[karras_timesteps(abar, 10)[-1]]) / 80.0 - 1) < 0.02
    for bad in (0.0, -1.0, True, "80"):
        with pytest.raises(ValueError, match="sigma_max: expected a number > 0"):
            karras_timesteps(abar, 10, sigma_max=bad)


def test_heun_on_the_cosine_schedule_needs_the_capped_karras_spacing():
    """Issue 15: on the cosine schedule (betas clipped at 0.999: sigma(T - 1) = 2e4) Heun's trapezoid over a first
    interval from sigma 2e4 to ~20 (quadratic spacing) weights the slope at its low end by half the interval, so
    even the exact model's samples come out wrong; its default spacing, Karras from sigma 80, samples the data.
    With an imperfect model (exact + a smooth error) every ODE sampler that starts at T - 1 amplifies the error by
    ~sigma(T - 1) / sigma(next) and blows up, while the capped spacing keeps them near the data."""
    cosine = make_schedule("cosine", 1000)
    d = GaussianDiffusion(cosine, "eps", "fixed_small")
    data = GaussianData(MU, COV, cosine.alphas_cumprod)
    exact = data.model(d)
    assert SAMPLER_INFO["heun"].default_schedule == "karras"

    def draw(sampler, model, schedule=None):
        steps = steps_for_evaluations(sampler, 50)
        return run_sampler(sampler, model, d, (4000, 2), steps=steps, schedule=schedule, seed=0, dtype=F64,
                           progress=False).sample

    assert whitened_moments_ok(draw("heun", exact), MU, COV, k=6.0)
    assert not whitened_moments_ok(draw("heun", exact, "quad_full"), MU, COV, k=6.0)
    imperfect = lambda x, t: exact(x, t) + 0.05 * torch.tanh(3 * x)  # noqa: E731
    for sampler in ("heun", "dpm++2m", "euler"):
        capped, from_top = draw(sampler, imperfect, "karras"), draw(sampler, imperfect, "quad_full")
        assert float((torch.cov(capped.T) - COV).abs().max()) < 0.3, sampler
        assert float((torch.cov(from_top.T) - COV).abs().max()) > 100, sampler


def test_inversion_leaves_out_the_singular_last_step_of_the_cosine_schedule():
    """Issue 15: on the cosine schedule (abar_999 = 2.4e-9) decoding's first step multiplies the encoder/decoder eps
    mismatch by sqrt(abar_998 / abar_999) = 31.6. With an imperfect model (the exact one plus a smooth error) the
    round trip through t = 999 loses the data; without it, it stays close, and the exact model is fine either way."""
    cosine = make_schedule("cosine", 1000)
    d = GaussianDiffusion(cosine, "eps", "fixed_small")
    data = GaussianData(MU, COV, cosine.alphas_cumprod)
    exact = data.model(d)
    imperfect = lambda x, t: exact(x, t) + 0.05 * torch.tanh(3 * x)  # noqa: E731
    x0 = data.sample(16, torch.Generator().manual_seed(1))
    kept = list(range(0, 1000, 20)) + [999]

    def roundtrip(model, skip):
        latent = ddim_invert(model, d, x0, steps=kept, skip_singular_last=skip, progress=False)
        assert (999 in latent.timesteps) is not skip
        back = ddim_sample(model, d, x_T=latent.sample, steps=list(latent.timesteps), progress=False).sample
        return float((back - x0).square().mean())

    assert roundtrip(exact, True) < 5e-3 and roundtrip(exact, False) < 5e-3  # first-order discretization
    with_last, without = roundtrip(imperfect, False), roundtrip(imperfect, True)
    assert without < 0.05 and with_last > 20 * without, (with_last, without)


# ------------------------------------------------------------------ the CLI: samplers, guidance, output formats
def tiny_conditional_checkpoint(path, num_classes=3):
    """A tiny class-conditional fixed-variance U-Net with seeded random weights, saved as a checkpoint."""
    from diffcore import checkpoint as ck
    from diffcore.train import TrainConfig
    from diffcore.unet import UNet, UNetConfig

    config = UNetConfig(in_channels=1, model_channels=8, channel_mult=(1,), num_res_blocks=1,
                        attention_resolutions=(), image_size=4, num_classes=num_classes, num_heads=1)
    torch.manual_seed(0)
    model = UNet(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    train = TrainConfig(data="synthetic", model=config, num_timesteps=10, schedule="cosine", variance_type="fixed_small")
    ck.save_checkpoint(path, model=model.state_dict(), config=train.to_dict(), step=1)
    return path


def test_cli_guided_class_conditional_sampling_in_every_format(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from diffcore.guidance import classifier_free_guidance
    from diffcore.pipelines.sample import sample
    from diffcore.train import load_trained_model
    from helpers import run_cli

    ckpt = tiny_conditional_checkpoint(tmp_path / "ckpt")
    trained = load_trained_model(ckpt)
    labels = torch.tensor([1, 2, 1, 2, 1])
    guided = classifier_free_guidance(trained.model, labels, 2.5, null_class=3)
    expected = sample(guided, n=5, sampler="dpm++2m", steps=4, seed=7, diffusion=trained.diffusion,
                      image_shape=trained.image_shape, progress=False)
    expected_u8 = ((expected + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    common = ("sample", "--checkpoint", ckpt, "--n", 5, "--steps", 4, "--seed", 7, "--sampler", "dpm++2m",
              "--class", 1, 2, "--guidance-scale", 2.5, "--no-progress")
    code, out, err = run_cli(capsys, *common, "--format", "npz", "--out", tmp_path / "s.npz")
    assert code == 0, err
    with np.load(tmp_path / "s.npz") as archive:
        np.testing.assert_array_equal(archive["arr_0"], expected_u8)
        np.testing.assert_array_equal(archive["arr_1"], labels.numpy())
    code, out, err = run_cli(capsys, *common, "--format", "png", "--out", tmp_path / "pngs")
    assert code == 0, err
    files = sorted((tmp_path / "pngs").iterdir())
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(5)]
    with Image.open(files[3]) as image:
        np.testing.assert_array_equal(np.asarray(image), expected_u8[3, :, :, 0])
    # guidance changes the images; an unconditional model refuses --class
    code, _, _ = run_cli(capsys, "sample", "--checkpoint", ckpt, "--n", 5, "--steps", 4, "--seed", 7, "--sampler",
                         "dpm++2m", "--class", 1, 2, "--format", "npz", "--out", tmp_path / "plain.npz",
                         "--no-progress")
    with np.load(tmp_path / "plain.npz") as archive:
        assert (archive["arr_0"].astype(int) - expected_u8).any()
