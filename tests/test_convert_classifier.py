"""guided-diffusion classifier import (``EncoderUNetModel``, ``pool="attention"``): the test writes the checkpoint
layout itself from the documented structure of guided-diffusion's ``unet.py`` / ``script_util.create_classifier``,
fills it with seeded random weights, converts, and compares the converted network with a forward written here from
the raw tensors (legacy-order attention blocks, CLIP-style attention pooling). Every full-size preset is checked
structurally: its layout and parameter count, computed here from the flags, equal the converted network's."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from diffcore.convert import ConversionError
from diffcore.convert.adm_classifier import (ADM_CLASSIFIER_PRESETS, adm_classifier_spec,
                                             expected_adm_classifier_shapes, from_adm_classifier_state_dict)
from diffcore.convert.presets import ADM_PRESETS
from diffcore.guidance import check_classifier_fits, load_classifier
from diffcore.train.trainer import build_diffusion
from diffcore.unet.encoder import EncoderClassifier, EncoderConfig
from helpers import run_cli
from test_convert_adm import adm_attention, adm_group_norm, adm_resblock, random_state

pytestmark = pytest.mark.usefixtures("one_thread")

MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
HEAD_CHANNELS = 64


# ------------------------------------------------------------------------------- the ADM layout, written here
def classifier_layout(flags: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of guided-diffusion's classifier state dict for the flags, following EncoderUNetModel."""
    size, width, depth = flags["image_size"], flags["classifier_width"], flags["classifier_depth"]
    ss, updown = flags.get("classifier_use_scale_shift_norm", True), flags.get("classifier_resblock_updown", True)
    attn_ds = {size // int(r) for r in flags.get("classifier_attention_resolutions", "32,16,8").split(",")}
    emb, k = 4 * width, flags.get("num_classes", 1000)
    shapes = {"time_embed.0.weight": (emb, width), "time_embed.0.bias": (emb,), "time_embed.2.weight": (emb, emb),
              "time_embed.2.bias": (emb,)}

    def res(p, cin, cout):
        e = 2 * cout if ss else cout
        shapes.update({f"{p}.in_layers.0.weight": (cin,), f"{p}.in_layers.0.bias": (cin,),
                       f"{p}.in_layers.2.weight": (cout, cin, 3, 3), f"{p}.in_layers.2.bias": (cout,),
                       f"{p}.emb_layers.1.weight": (e, emb), f"{p}.emb_layers.1.bias": (e,),
                       f"{p}.out_layers.0.weight": (cout,), f"{p}.out_layers.0.bias": (cout,),
                       f"{p}.out_layers.3.weight": (cout, cout, 3, 3), f"{p}.out_layers.3.bias": (cout,)})
        if cin != cout:
            shapes.update({f"{p}.skip_connection.weight": (cout, cin, 1, 1), f"{p}.skip_connection.bias": (cout,)})

    def attn(p, c):
        shapes.update({f"{p}.norm.weight": (c,), f"{p}.norm.bias": (c,), f"{p}.qkv.weight": (3 * c, c, 1),
                       f"{p}.qkv.bias": (3 * c,), f"{p}.proj_out.weight": (c, c, 1), f"{p}.proj_out.bias": (c,)})

    ch = int(MULT[size][0] * width)
    shapes.update({"input_blocks.0.0.weight": (ch, 3, 3, 3), "input_blocks.0.0.bias": (ch,)})
    i, ds = 1, 1
    for level, m in enumerate(MULT[size]):
        for _ in range(depth):
            res(f"input_blocks.{i}.0", ch, int(m * width))
            ch = int(m * width)
            if ds in attn_ds:
                attn(f"input_blocks.{i}.1", ch)
            i += 1
        if level != len(MULT[size]) - 1:
            if updown:
                res(f"input_blocks.{i}.0", ch, ch)
            else:
                shapes.update({f"input_blocks.{i}.0.op.weight": (ch, ch, 3, 3), f"input_blocks.{i}.0.op.bias": (ch,)})
            i, ds = i + 1, ds * 2
    res("middle_block.0", ch, ch)
    attn("middle_block.1", ch)
    res("middle_block.2", ch, ch)
    tokens = (size // ds) ** 2 + 1
    shapes.update({"out.0.weight": (ch,), "out.0.bias": (ch,), "out.2.positional_embedding": (ch, tokens),
                   "out.2.qkv_proj.weight": (3 * ch, ch, 1), "out.2.qkv_proj.bias": (3 * ch,),
                   "out.2.c_proj.weight": (k, ch, 1), "out.2.c_proj.bias": (k,)})
    return shapes


# ------------------------------------------------------------------------------- independent forward
def adm_resblock_down(sd, p, x, emb, scale_shift):
    """ADM's ResBlock(down=True): GN and SiLU, then both branches 2x2-average-pooled, then the usual block."""
    h = F.silu(adm_group_norm(x, sd[f"{p}.in_layers.0.weight"], sd[f"{p}.in_layers.0.bias"]))
    h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
    h = F.conv2d(h, sd[f"{p}.in_layers.2.weight"], sd[f"{p}.in_layers.2.bias"], padding=1)
    e = F.linear(F.silu(emb), sd[f"{p}.emb_layers.1.weight"], sd[f"{p}.emb_layers.1.bias"])[:, :, None, None]
    if scale_shift:
        scale, shift = e.chunk(2, dim=1)
        h = adm_group_norm(h, sd[f"{p}.out_layers.0.weight"], sd[f"{p}.out_layers.0.bias"]) * (1 + scale) + shift
    else:
        h = adm_group_norm(h + e, sd[f"{p}.out_layers.0.weight"], sd[f"{p}.out_layers.0.bias"])
    return x + F.conv2d(F.silu(h), sd[f"{p}.out_layers.3.weight"], sd[f"{p}.out_layers.3.bias"], padding=1)


def adm_attention_pool(sd, x):
    """AttentionPool2d: tokens [B, C, 1 + HW] (mean first) + positional embedding, QKVAttention (q|k|v, then heads)
    with 1/sqrt(sqrt(d)) on q and k, c_proj, token 0."""
    b, c = x.shape[:2]
    x = x.reshape(b, c, -1)
    x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1) + sd["out.2.positional_embedding"][None]
    qkv = F.conv1d(x, sd["out.2.qkv_proj.weight"], sd["out.2.qkv_proj.bias"])
    heads, length = c // HEAD_CHANNELS, x.shape[-1]
    q, k, v = (t.reshape(b * heads, HEAD_CHANNELS, length) for t in qkv.chunk(3, dim=1))
    scale = 1 / math.sqrt(math.sqrt(HEAD_CHANNELS))
    w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, length)
    return F.conv1d(a, sd["out.2.c_proj.weight"], sd["out.2.c_proj.bias"])[:, :, 0]


def adm_classifier_forward(sd, flags, x, t):
    size, width, depth = flags["image_size"], flags["classifier_width"], flags["classifier_depth"]
    ss, updown = flags.get("classifier_use_scale_shift_norm", True), flags.get("classifier_resblock_updown", True)
    attn_ds = {size // int(r) for r in flags.get("classifier_attention_resolutions", "32,16,8").split(",")}
    half = width // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    emb = F.linear(F.silu(F.linear(emb, sd["time_embed.0.weight"], sd["time_embed.0.bias"])),
                   sd["time_embed.2.weight"], sd["time_embed.2.bias"])
    h = F.conv2d(x, sd["input_blocks.0.0.weight"], sd["input_blocks.0.0.bias"], padding=1)
    i, ds = 1, 1
    for level in range(len(MULT[size])):
        for _ in range(depth):
            h = adm_resblock(sd, f"input_blocks.{i}.0", h, emb, ss)
            if ds in attn_ds:
                h = adm_attention(sd, f"input_blocks.{i}.1", h, h.shape[1] // HEAD_CHANNELS, legacy=True)
            i += 1
        if level != len(MULT[size]) - 1:
            p = f"input_blocks.{i}.0"
            h = adm_resblock_down(sd, p, h, emb, ss) if updown else \
                F.conv2d(h, sd[f"{p}.op.weight"], sd[f"{p}.op.bias"], stride=2, padding=1)
            i, ds = i + 1, ds * 2
    h = adm_resblock(sd, "middle_block.0", h, emb, ss)
    h = adm_attention(sd, "middle_block.1", h, h.shape[1] // HEAD_CHANNELS, legacy=True)
    h = adm_resblock(sd, "middle_block.2", h, emb, ss)
    return adm_attention_pool(sd, F.silu(adm_group_norm(h, sd["out.0.weight"], sd["out.0.bias"])))


SMALL = dict(image_size=64, classifier_width=64, classifier_depth=1, classifier_attention_resolutions="32,8",
             num_classes=7, diffusion_steps=1000, noise_schedule="cosine")


@pytest.mark.parametrize("variant", [{}, dict(classifier_resblock_updown=False, classifier_use_scale_shift_norm=False)])
def test_converted_classifier_matches_independent_forward(variant):
    flags = dict(SMALL, **variant)
    sd = random_state(classifier_layout(flags), seed=3)
    model = from_adm_classifier_state_dict(sd, flags)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 64, 64, generator=g), torch.tensor([3, 871])
    with torch.no_grad():
        expected = adm_classifier_forward(sd, flags, x, t)
        got = model(x, t)
    assert expected.shape == (2, 7) and expected.std() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(ADM_CLASSIFIER_PRESETS))
def test_preset_layout_and_parameter_count(name):
    flags = ADM_CLASSIFIER_PRESETS[name]
    layout = classifier_layout(flags)
    with torch.device("meta"):
        model = EncoderClassifier(adm_classifier_spec(name).encoder)
    assert expected_adm_classifier_shapes(model) == layout
    assert sum(p.numel() for p in model.parameters()) == sum(math.prod(s) for s in layout.values())


def test_preset_schedule_is_the_guided_models():
    """The 64x64 classifier guides guided-64-cond (cosine); the others the linear 256x256 models."""
    for clf, model in (("guided-64-classifier", "guided-64-cond"), ("guided-256-classifier", "guided-256-cond")):
        abar = build_diffusion(ADM_PRESETS[model].spec.train_config()).alphas_cumprod
        assert torch.equal(adm_classifier_spec(clf).alphas_cumprod(), abar)


def test_mismatched_checkpoint_lists_keys():
    sd = random_state(classifier_layout(SMALL), seed=1)
    del sd["out.2.c_proj.bias"]
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match="out.2.c_proj.bias") as info:
        from_adm_classifier_state_dict(sd, SMALL)
    assert "extra.weight" in str(info.value)
    with pytest.raises(ConversionError, match="classifier_pool"):
        adm_classifier_spec(dict(SMALL, classifier_pool="adaptive"))


def test_cli_converts_a_pt_file_that_sample_accepts(tmp_path, capsys):
    sd = {k: v.half() for k, v in random_state(classifier_layout(SMALL), seed=2).items()}  # classifier_use_fp16
    torch.save(sd, tmp_path / "clf.pt")
    out = tmp_path / "clf"
    code, stdout, stderr = run_cli(capsys, "convert", tmp_path / "clf.pt", out, "--from", "adm-classifier",
                                   "--config", json.dumps(SMALL))
    assert code == 0, stderr
    loaded = load_classifier(out)
    reference = from_adm_classifier_state_dict(sd, SMALL)
    x, t = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)), torch.tensor([0, 999])
    with torch.no_grad():
        assert torch.equal(loaded.classifier(x, t), reference(x, t))
    diffusion = build_diffusion(ADM_PRESETS["guided-64-cond"].spec.train_config())
    check_classifier_fits(loaded, diffusion, (3, 64, 64))
    code, _, stderr = run_cli(capsys, "convert", tmp_path / "clf.pt", tmp_path / "again", "--from",
                              "adm-classifier", "--preset", "guided-256-cond")
    assert code == 2 and "--preset" in stderr and not (tmp_path / "again").exists()


def test_encoder_config_round_trip_and_named_errors():
    config = adm_classifier_spec("guided-512-classifier").encoder
    assert EncoderConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.level_channels[0] == 64 and config.pooled_size == 8
    with pytest.raises(ValueError, match="channel_mult: .*whole number"):
        EncoderConfig(model_channels=10, channel_mult=(0.25, 1), image_size=8, num_head_channels=10)
    with pytest.raises(ValueError, match="num_head_channels"):
        EncoderConfig(model_channels=96, channel_mult=(1,), image_size=8)
    with pytest.raises(ValueError, match="unknown EncoderConfig keys \\['depth'\\]"):
        EncoderConfig.from_dict(dict(config.to_dict(), depth=2))


def test_a_classifier_converted_as_a_diffusion_model_is_named(tmp_path, capsys):
    """Without --from adm-classifier a classifier .pt looks like an ADM model; the error says what it is."""
    torch.save(random_state(classifier_layout(SMALL), seed=4), tmp_path / "clf.pt")
    code, _, stderr = run_cli(capsys, "convert", tmp_path / "clf.pt", tmp_path / "out", "--preset", "guided-64-cond")
    assert code != 0 and "guided-diffusion classifier" in stderr and "--from adm-classifier" in stderr, stderr
    assert stderr.count("\n") == 1 and not (tmp_path / "out").exists()
