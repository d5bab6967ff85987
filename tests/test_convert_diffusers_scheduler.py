"""diffusers scheduler configs -> diffcore's process, checked against diffusers' own DDPMScheduler: the betas, and
one DDPM step with the same model output and noise (diffusers run on diffcore's float64 tables, so that only the
formulas are compared, not float32 rounding); the settings diffcore refuses or names in a warning; the scheduler
an export writes."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
import diffusers.schedulers.scheduling_ddpm as ddpm_module  # noqa: E402
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

from diffcore.convert import (ConversionError, diffusion_from_diffusers_config, load_diffusers_folder,  # noqa: E402
                              save_diffusers_folder)
from diffcore.diffusion import GaussianDiffusion  # noqa: E402
from diffcore.schedules import make_schedule  # noqa: E402
from diffcore.unet import UNet, UNetConfig  # noqa: E402

torch.set_num_threads(1)

CONFIGS = {
    "linear": {}, "linear_T500": dict(num_train_timesteps=500),
    "linear_T4000_own_betas": dict(num_train_timesteps=4000, beta_start=2.5e-5, beta_end=0.005),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
    "squaredcos_cap_v2_T50": dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=50),
    "sigmoid": dict(beta_schedule="sigmoid", beta_start=1e-3, beta_end=0.03),
    "trained_betas": dict(num_train_timesteps=10, trained_betas=[0.01 * (i + 1) for i in range(10)]),
    "v_prediction": dict(prediction_type="v_prediction"), "sample": dict(prediction_type="sample"),
    "zero_snr_v": dict(rescale_betas_zero_snr=True, prediction_type="v_prediction"),
    "no_clip": dict(clip_sample=False), "fixed_large": dict(variance_type="fixed_large"),
    "fixed_small_log": dict(variance_type="fixed_small_log"), "learned_range": dict(variance_type="learned_range"),
}


def one_step_both(theirs: DDPMScheduler, ours: GaussianDiffusion, t: int, seed: int, monkeypatch):
    """x_{t-1} from diffusers' DDPMScheduler.step and from diffcore's p_mean_variance, same output and noise."""
    learned = theirs.config.variance_type == "learned_range"
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    out = 1.5 * torch.randn(2, 6 if learned else 3, 4, 4, generator=g, dtype=torch.float64)
    if learned:
        out[:, 3:] = out[:, 3:].clamp(-1, 1)
    z = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    monkeypatch.setattr(ddpm_module, "randn_tensor", lambda *args, **kwargs: z)
    ref = theirs.step(out, t, x).prev_sample
    mv = ours.p_mean_variance(None, x, torch.tensor([t, t]), clip_denoised=theirs.config.clip_sample,
                              model_output=out)
    return mv.mean + (0.5 * mv.log_variance).exp() * z, ref


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_process_and_one_ddpm_step_match_diffusers(name, monkeypatch):
    theirs = DDPMScheduler(**CONFIGS[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no_clip is named in a warning (tested below)
        ours = diffusion_from_diffusers_config(dict(theirs.config))
    torch.testing.assert_close(ours.schedule.betas.float(), theirs.betas, rtol=1e-5, atol=1e-6)
    # diffusers' formulas on diffcore's float64 tables
    theirs.betas = ours.schedule.betas.clone()
    theirs.alphas = 1.0 - theirs.betas
    theirs.alphas_cumprod = ours.alphas_cumprod.clone()
    theirs.one = torch.tensor(1.0, dtype=torch.float64)
    T = ours.num_timesteps
    for seed, t in enumerate((T - 2, T // 2, 1)):
        got, ref = one_step_both(theirs, ours, t, seed, monkeypatch)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("field,kwargs", [("beta_schedule", dict(beta_schedule="laplace")),
                                          ("prediction_type", dict(rescale_betas_zero_snr=True)),
                                          ("variance_type", dict(variance_type="learned"))])
def test_unrepresentable_scheduler_configs_are_refused_naming_the_field(field, kwargs):
    with pytest.raises(ConversionError, match=field):
        diffusion_from_diffusers_config(dict(DDPMScheduler(**kwargs).config))


def test_learned_variance_means_another_function_in_diffusers(tmp_path, monkeypatch):
    """Why 'learned' is refused: diffusers' step reads the extra channels as the variance, diffcore's as its log."""
    theirs = DDPMScheduler(variance_type="learned")
    ours = GaussianDiffusion(make_schedule("linear", 1000), "eps", "learned")
    g = torch.Generator().manual_seed(0)
    x, out, z = (torch.randn(1, 3, 4, 4, generator=g) for _ in range(3))
    var = torch.full_like(x, 0.01)
    monkeypatch.setattr(ddpm_module, "randn_tensor", lambda *args, **kwargs: z)
    ref = theirs.step(torch.cat([out, var], 1), 500, x).prev_sample
    mv = ours.p_mean_variance(None, x, torch.tensor([500]), clip_denoised=True,
                              model_output=torch.cat([out, var.log()], 1))
    torch.testing.assert_close(mv.mean + (0.5 * mv.log_variance).exp() * z, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConversionError, match="learned"):
        save_diffusers_folder(tmp_path / "df", _small_unet(learn_sigma=True), ours)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("scheduler,kwargs,named", [
    (DDPMScheduler, dict(thresholding=True), "thresholding"),
    (DDPMScheduler, dict(clip_sample_range=2.0), "clip_sample_range"),
    (DDPMScheduler, dict(clip_sample=False), "clip_sample=False"),
    (DDIMScheduler, dict(set_alpha_to_one=False), "set_alpha_to_one")])
def test_sampler_settings_diffcore_does_not_reproduce_are_named(scheduler, kwargs, named):
    with pytest.warns(UserWarning, match=named):
        diffusion_from_diffusers_config(dict(scheduler(**kwargs).config))


@pytest.mark.parametrize("scheduler", [DDPMScheduler, DDIMScheduler])
def test_default_schedulers_import_without_notes(scheduler):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        diffusion_from_diffusers_config(dict(scheduler().config))


def _small_unet(**kw) -> UNet:
    config = UNetConfig(in_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                        attention_resolutions=(8,), image_size=16, **kw)
    return UNet(config).eval()


def test_exported_scheduler_samples_as_diffcore_sample_does(tmp_path, monkeypatch):
    """An exported DDPMPipeline clips x0_hat as `diffcore sample` does by default, so both run the same chain."""
    diffusion = GaussianDiffusion(make_schedule("linear", 1000), "eps", "fixed_small")
    out = save_diffusers_folder(tmp_path / "df", _small_unet(), diffusion)
    theirs = DDPMScheduler.from_pretrained(out, subfolder="scheduler")
    assert theirs.config.clip_sample is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to note about a folder diffcore wrote
        back = load_diffusers_folder(out)
    theirs.alphas_cumprod = diffusion.alphas_cumprod.clone()
    theirs.one = torch.tensor(1.0, dtype=torch.float64)
    for seed, t in enumerate((999, 30)):
        got, ref = one_step_both(theirs, back.diffusion, t, seed, monkeypatch)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
