"""diffusers import/export: random-weight UNet2DModels built and saved here (nothing downloads), compared with the
converted diffcore models; DDIM-10 through diffusers' DDIMScheduler against diffcore's ddim_sample."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel  # noqa: E402

from diffcore.convert import ConversionError, load_diffusers_folder, save_diffusers_folder  # noqa: E402
from diffcore.diffusion import GaussianDiffusion  # noqa: E402
from diffcore.samplers import ddim_sample  # noqa: E402
from diffcore.schedules import make_schedule  # noqa: E402
from diffcore.unet import UNet, UNetConfig  # noqa: E402

torch.set_num_threads(1)

BASE = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
CONFIGS = {
    "default": {},
    "scale_shift_resnet_updown_classes": dict(resnet_time_scale_shift="scale_shift", attn_norm_num_groups=32,
                                              num_class_embeds=5, downsample_type="resnet", upsample_type="resnet",
                                              down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
                                              up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D"),
                                              attention_head_dim=16, out_channels=6),
    "one_head_three_levels": dict(attention_head_dim=None, block_out_channels=(32, 32, 64), layers_per_block=2,
                                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                                  up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    "attention_first_resnet_resamplers_16_groups": dict(
        down_block_types=("AttnDownBlock2D", "ResnetDownsampleBlock2D"), downsample_type="resnet",
        up_block_types=("ResnetUpsampleBlock2D", "AttnUpBlock2D"), upsample_type="resnet", norm_num_groups=16,
        attn_norm_num_groups=16, attention_head_dim=8, dropout=0.1, time_embedding_dim=128),
    "gray_no_attention_blocks": dict(in_channels=1, out_channels=1, sample_size=None,
                                     down_block_types=("DownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "UpBlock2D")),
}


def random_unet(seed, **overrides):
    torch.manual_seed(seed)
    model = UNet2DModel(**{**BASE, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_import_forward_matches(tmp_path, name):
    theirs = random_unet(0, **CONFIGS[name])
    theirs.save_pretrained(tmp_path / "unet")
    with _maybe_warns(name):
        imported = load_diffusers_folder(tmp_path / "unet")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, theirs.config.in_channels, 16, 16, generator=g)
    t = torch.tensor([0, 417, 999])
    y = torch.tensor([0, 2, 4]) if "classes" in name else None
    with torch.no_grad():
        ref = theirs(x, t, class_labels=y).sample
        ours = imported.model(x, t, y)
    assert (ours - ref).abs().max() <= 1e-5


def _maybe_warns(name):
    import contextlib
    return pytest.warns(UserWarning, match="null class") if "classes" in name else contextlib.nullcontext()


@pytest.mark.parametrize("field,value", [("flip_sin_to_cos", False), ("freq_shift", 1), ("act_fn", "gelu"),
                                         ("center_input_sample", True), ("mid_block_scale_factor", 2),
                                         ("add_attention", False), ("mid_block_type", None),
                                         ("class_embed_type", "timestep"), ("time_embedding_type", "fourier"),
                                         ("norm_eps", 1e-6), ("downsample_padding", 0), ("attn_norm_num_groups", 16)])
def test_unrepresentable_configs_are_refused_naming_the_field(tmp_path, field, value):
    random_unet(0, **{field: value}).save_pretrained(tmp_path / "unet")
    with pytest.raises(ConversionError, match=field):
        load_diffusers_folder(tmp_path / "unet")


@pytest.mark.parametrize("downs,ups", [
    (("SkipDownBlock2D", "AttnSkipDownBlock2D"), ("AttnSkipUpBlock2D", "SkipUpBlock2D")),
    (("ResnetDownsampleBlock2D", "AttnDownBlock2D"), ("AttnUpBlock2D", "UpBlock2D")),  # ResNet down, conv up
    (("DownBlock2D", "AttnDownBlock2D"), ("UpBlock2D", "UpBlock2D"))])  # attention only on the way down
def test_unrepresentable_block_types_are_refused_naming_them(tmp_path, downs, ups):
    random_unet(0, down_block_types=downs, up_block_types=ups).save_pretrained(tmp_path / "unet")
    with pytest.raises(ConversionError, match="block_types"):
        load_diffusers_folder(tmp_path / "unet")


def test_fp16_variant_folder_converts_to_float32(tmp_path):
    theirs = random_unet(6).half()
    theirs.save_pretrained(tmp_path / "unet", variant="fp16")  # diffusion_pytorch_model.fp16.safetensors only
    imported = load_diffusers_folder(tmp_path / "unet")
    assert {p.dtype for p in imported.model.parameters()} == {torch.float32}
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    t = torch.tensor([12, 640])
    with torch.no_grad():
        assert (theirs.float()(x, t).sample - imported.model(x, t)).abs().max() <= 1e-5


def test_scale_shift_without_mid_attention_norm_is_refused(tmp_path):
    random_unet(0, resnet_time_scale_shift="scale_shift").save_pretrained(tmp_path / "unet")
    with pytest.raises(ConversionError, match="attn_norm_num_groups"):
        load_diffusers_folder(tmp_path / "unet")


def small_diffcore(seed, **kw):
    config = UNetConfig(**{**dict(in_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                  attention_resolutions=(8,), image_size=16, learn_sigma=True, num_heads=4,
                                  use_scale_shift_norm=True), **kw})
    torch.manual_seed(seed)
    model = UNet(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model


@pytest.mark.parametrize("kw", [{}, dict(num_classes=3, resblock_updown=True), dict(use_scale_shift_norm=False),
                                dict(resblock_updown=True, conv_resample=False, attention_resolutions=(8, 16),
                                     num_head_channels=16),
                                dict(norm_groups=16, attention_resolutions=(16, 8), num_head_channels=8, dropout=0.1)])
@pytest.mark.parametrize("schedule", ["cosine", "linear", "zero_snr"])
def test_export_round_trip_bit_exact_and_diffusers_loads(tmp_path, kw, schedule):
    model = small_diffcore(2, **kw)
    if schedule == "zero_snr":
        diffusion = GaussianDiffusion(make_schedule("linear", 1000, rescale_to_zero_terminal_snr=True), "v",
                                      "learned_range")
    else:
        diffusion = GaussianDiffusion(make_schedule(schedule, 1000), "eps", "learned_range")
    out = save_diffusers_folder(tmp_path / "df", model, diffusion)
    back = load_diffusers_folder(out)
    assert back.model.config == model.config
    own, got = model.state_dict(), back.model.state_dict()
    assert own.keys() == got.keys() and all(torch.equal(own[k], got[k]) for k in own)
    assert torch.equal(back.diffusion.alphas_cumprod, diffusion.alphas_cumprod)
    assert back.diffusion.prediction_type == diffusion.prediction_type
    theirs = UNet2DModel.from_pretrained(out, subfolder="unet")  # strict: every key used, none missing
    pipe = DDPMPipeline.from_pretrained(out)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([5, 900])
    y = torch.tensor([0, 2]) if kw.get("num_classes") else None
    with torch.no_grad():
        assert (theirs(x, t, class_labels=y).sample - model(x, t, y)).abs().max() <= 1e-5
    ref = pipe.scheduler.alphas_cumprod.detach().to(torch.float64)
    torch.testing.assert_close(ref, diffusion.alphas_cumprod, rtol=1e-5, atol=1e-6)


def test_export_refuses_existing_folder_and_rescaled_timesteps(tmp_path):
    model = small_diffcore(0)
    diffusion = GaussianDiffusion(make_schedule("cosine", 1000), "eps", "learned_range")
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError):
        save_diffusers_folder(tmp_path / "exists", model, diffusion)
    rescaled = UNet(UNetConfig.from_dict({**model.config.to_dict(), "timestep_scale": 0.25}))
    with pytest.raises(ConversionError, match="timestep_scale"):
        save_diffusers_folder(tmp_path / "new", rescaled, diffusion)
    two_widths = small_diffcore(0, attention_resolutions=(16, 8))  # 4 heads of 8 and of 16 channels
    with pytest.raises(ConversionError, match="num_heads"):
        save_diffusers_folder(tmp_path / "new", two_widths, diffusion)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


@pytest.mark.parametrize("clip", [False, True])
def test_ddim10_matches_diffusers_scheduler(tmp_path, clip):
    theirs = random_unet(4, out_channels=3)
    theirs.save_pretrained(tmp_path / "unet")
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=clip,
                          set_alpha_to_one=True, prediction_type="epsilon")
    sched.save_pretrained(tmp_path / "scheduler")
    import contextlib
    with contextlib.nullcontext() if clip else pytest.warns(UserWarning, match="clip_sample=False"):
        imported = load_diffusers_folder(tmp_path / "unet", scheduler_config=dict(sched.config))
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    sched.set_timesteps(10)
    x = x_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            eps = theirs(x, t).sample
            # diffcore re-derives eps from the clipped x0; diffusers does so with use_clipped_model_output=True
            x = sched.step(eps, t, x, eta=0.0, use_clipped_model_output=clip).prev_sample
    steps = sorted(int(t) for t in sched.timesteps)
    ours = ddim_sample(imported.model, imported.diffusion, x_T=x_T, steps=steps, clip_denoised=clip,
                       progress=False).sample
    assert (ours - x).abs().max() <= 1e-4


@pytest.mark.slow  # multi-second end-to-end test: CI runs it with -m slow
def test_cli_diffusers_folder_without_config_json(tmp_path):
    (tmp_path / "df").mkdir()
    (tmp_path / "df" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    r = subprocess.run([sys.executable, "-m", "diffcore.cli", "convert", str(tmp_path / "df"), str(tmp_path / "out"),
                        "--from", "diffusers"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "config" in r.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_packaged_model_round_trips_through_diffusers(tmp_path):
    from diffcore.convert import load_model
    from diffcore.pretrained import default_model_path

    r = subprocess.run([sys.executable, "-m", "diffcore.cli", "convert", str(default_model_path()),
                        str(tmp_path / "df"), "--to", "diffusers"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "diffcore.cli", "convert", str(tmp_path / "df"), str(tmp_path / "back")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    a, b = load_model(default_model_path()), load_model(tmp_path / "back")
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert a.model.config == b.model.config and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a.diffusion.alphas_cumprod, b.diffusion.alphas_cumprod)
