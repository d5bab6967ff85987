"""Tests of the U-Net (diffcore.unet) and its config: numbers against closed forms and hand-written layers."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from diffcore.unet.blocks import AttentionBlock, Downsample, ResBlock, timestep_embedding
from diffcore.unet import UNet, UNetConfig

torch.set_num_threads(1)

BF16_UNIT_ROUNDOFF = 2.0**-8


def tiny_config(**overrides) -> UNetConfig:
    """Two levels (8x8 and 4x4), attention at 4x4, 8 and 16 channels (GroupNorm with fewer than 32 groups)."""
    base = dict(in_channels=2, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                image_size=8, num_heads=2, dropout=0.0, learn_sigma=True)
    base.update(overrides)
    return UNetConfig(**base)


def unzero(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Give every all-zero parameter (zero-initialized convs, GroupNorm biases) random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return model


def make_model(config: UNetConfig, seed: int = 0, zeroed: bool = False) -> UNet:
    torch.manual_seed(seed)
    model = UNet(config)
    return model if zeroed else unzero(model, seed)


def inputs(config: UNetConfig, batch: int, seed: int = 1, size: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    size = size or config.image_size
    x = torch.randn(batch, config.in_channels, size, size, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    return x, t


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ------------------------------------------------------------------------------------- timestep embedding
@pytest.mark.parametrize("dim", [16, 7])
def test_timestep_embedding_closed_form(dim):
    steps = [0, 1, 2, 5, 17, 100, 999, 3999]
    emb = timestep_embedding(torch.tensor(steps), dim)
    assert emb.dtype == torch.float32 and emb.shape == (len(steps), dim)
    half = dim // 2
    expected = torch.zeros(len(steps), dim, dtype=torch.float64)
    for i, s in enumerate(steps):
        for j in range(half):
            freq = 10000.0 ** (-j / half)
            expected[i, j] = math.cos(s * freq)
            expected[i, half + j] = math.sin(s * freq)
    # float32 rounding of the argument s * f (|s f| <= s) bounds the error: a few ulps of s.
    tol = torch.tensor([8 * max(s, 1) * 2.0**-24 for s in steps], dtype=torch.float64)[:, None]
    assert ((emb.double() - expected).abs() <= tol + 1e-7).all()
    assert torch.equal(emb[0, :half], torch.ones(half)) and torch.equal(emb[0, half:2 * half], torch.zeros(half))
    if dim % 2:
        assert torch.equal(emb[:, -1], torch.zeros(len(steps)))


def test_float_timesteps_give_the_same_output_as_int64():
    cfg = tiny_config()
    model = make_model(cfg).eval()
    x, t = inputs(cfg, 3)
    with torch.no_grad():
        assert torch.equal(model(x, t), model(x, t.double()))
        assert not torch.allclose(model(x, t), model(x, t + 1))  # the timestep reaches the output


# ------------------------------------------------------------------------------------------ zero init
def test_output_is_exactly_zero_at_init_and_not_after_perturbing():
    cfg = tiny_config(num_classes=3)
    model = make_model(cfg, zeroed=True)
    x, t = inputs(cfg, 4)
    y = torch.tensor([0, 1, 2, 3])
    out = model(x, t, y)
    assert out.shape == (4, 2 * cfg.in_channels, 8, 8)
    assert torch.equal(out, torch.zeros_like(out))
    # Each residual branch ends in a zero conv: a fresh ResBlock is its skip path, a fresh attention the identity.
    with torch.no_grad():
        torch.nn.init.normal_(model.out[2].weight, std=0.1)
    assert model(x, t, y).abs().max() > 1e-3


def test_only_the_output_conv_gets_gradient_at_init():
    cfg = tiny_config()
    model = make_model(cfg, zeroed=True)
    x, t = inputs(cfg, 2)
    (model(x, t) - x.repeat(1, 2, 1, 1)).square().mean().backward()
    out_conv = {id(p) for p in model.out[2].parameters()}
    for name, p in model.named_parameters():
        if id(p) in out_conv:
            assert p.grad.abs().max() > 0, name
        else:
            assert p.grad is None or not p.grad.any(), name


def test_gradient_reaches_every_parameter_after_unzeroing():
    cfg = tiny_config(num_classes=3, channel_mult=(1, 2, 2), image_size=8, attention_resolutions=(8, 2),
                      resblock_updown=True, dropout=0.1)
    model = make_model(cfg).train()
    x, t = inputs(cfg, 4)
    y = torch.arange(4)  # every label row, including the null class 3
    target = torch.randn(4, cfg.out_channels, 8, 8, generator=torch.Generator().manual_seed(5))
    (model(x, t, y) - target).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


# ----------------------------------------------------------------------------- per-sample independence
def test_each_sample_is_independent_of_the_rest_of_the_batch():
    cfg = tiny_config(num_classes=4)
    model = make_model(cfg).train()  # train mode: GroupNorm uses no batch statistics (dropout is 0 here)
    x, t = inputs(cfg, 5)
    y = torch.tensor([0, 4, 2, 1, 3])
    with torch.no_grad():
        batch = model(x, t, y)
        singles = torch.cat([model(x[i:i + 1], t[i:i + 1], y[i:i + 1]) for i in range(5)])
        perm = torch.tensor([3, 0, 4, 1, 2])
        permuted = model(x[perm], t[perm], y[perm])
    assert torch.allclose(batch, singles, rtol=1e-5, atol=1e-5)
    assert torch.allclose(permuted, batch[perm], rtol=1e-5, atol=1e-5)
    assert batch.std() > 0.1  # a model that does something


def test_non_square_and_other_sizes_work():
    cfg = tiny_config()
    model = make_model(cfg).eval()
    x = torch.randn(2, 2, 4, 12)
    out = model(x, torch.tensor([3, 4]))
    assert out.shape == (2, 4, 4, 12) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------- attention
def handwritten_attention(x, block: AttentionBlock, groups: int, heads: int):
    """softmax(Q K^T / sqrt(d)) V per head after a GroupNorm written out, in float64."""
    b, c, h, w = x.shape
    xg = x.reshape(b, groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)
    normed = ((xg - mean) / torch.sqrt(var + block.norm.eps)).reshape(b, c, h, w)
    normed = normed * block.norm.weight[None, :, None, None] + block.norm.bias[None, :, None, None]
    tokens = normed.reshape(b, c, h * w).transpose(1, 2)  # [B, T, C]
    qkv = tokens @ block.qkv.weight.T + block.qkv.bias  # [B, T, 3C]: q | k | v, each heads x d
    d = c // heads
    outs = []
    for head in range(heads):
        q = qkv[:, :, head * d:(head + 1) * d]
        k = qkv[:, :, c + head * d:c + (head + 1) * d]
        v = qkv[:, :, 2 * c + head * d:2 * c + (head + 1) * d]
        scores = q @ k.transpose(1, 2) / math.sqrt(d)
        weights = torch.exp(scores - scores.max(-1, keepdim=True).values)
        outs.append((weights / weights.sum(-1, keepdim=True)) @ v)
    out = torch.cat(outs, dim=-1) @ block.proj_out.weight.T + block.proj_out.bias
    return x + out.transpose(1, 2).reshape(b, c, h, w)


@pytest.mark.parametrize("heads_kw, heads", [(dict(num_heads=2), 2), (dict(num_head_channels=4), 3)])
def test_attention_block_matches_handwritten_softmax(heads_kw, heads):
    cfg = tiny_config(**heads_kw)
    torch.manual_seed(0)
    block = unzero(AttentionBlock(cfg, 12)).double()
    assert block.num_heads == heads
    x = torch.randn(2, 12, 3, 5, dtype=torch.float64)
    with torch.no_grad():
        got = block(x)
        expected = handwritten_attention(x, block, groups=cfg.groups_for(12), heads=heads)
    assert cfg.groups_for(12) == 12
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- residual blocks, resampling
@pytest.mark.parametrize("scale_shift", [True, False])
def test_resblock_matches_its_formula(scale_shift):
    cfg = tiny_config(use_scale_shift_norm=scale_shift, model_channels=4)
    torch.manual_seed(0)
    block = unzero(ResBlock(cfg, 6, 10)).double().eval()
    x = torch.randn(3, 6, 4, 4, dtype=torch.float64)
    emb = torch.randn(3, cfg.time_embed_dim, dtype=torch.float64)
    gn = lambda v, norm: F.group_norm(v, norm.num_groups, norm.weight, norm.bias, norm.eps)  # noqa: E731
    with torch.no_grad():
        h = block.in_conv(F.silu(gn(x, block.in_norm)))
        e = F.linear(F.silu(emb), block.emb_proj.weight, block.emb_proj.bias)[:, :, None, None]
        if scale_shift:
            h = gn(h, block.out_norm) * (1 + e[:, :10]) + e[:, 10:]
        else:
            h = gn(h + e, block.out_norm)
        expected = F.conv2d(x, block.skip.weight, block.skip.bias) + block.out_conv(F.silu(h))
        got = block(x, emb)
    assert (block.in_norm.num_groups, block.out_norm.num_groups) == (6, 10)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_fresh_updown_resblocks_are_nearest_upsampling_and_average_pooling():
    cfg = tiny_config()
    x = torch.randn(2, 8, 4, 6)
    emb = torch.randn(2, cfg.time_embed_dim)
    up, down = ResBlock(cfg, 8, 8, up=True), ResBlock(cfg, 8, 8, down=True)
    expected_up = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    expected_down = x.reshape(2, 8, 2, 2, 3, 2).mean(dim=(3, 5))
    assert torch.equal(up(x, emb), expected_up)
    assert torch.allclose(down(x, emb), expected_down, atol=1e-6)
    assert torch.allclose(Downsample(8, use_conv=False)(x), expected_down, atol=1e-6)


def test_group_counts_for_small_channel_counts():
    cfg = tiny_config()
    assert [cfg.groups_for(c) for c in (32, 64, 160, 48, 24, 20, 3, 1, 37)] == [32, 32, 32, 24, 24, 20, 3, 1, 1]
    assert UNetConfig(norm_groups=8).groups_for(48) == 8
    model = make_model(tiny_config(model_channels=3, num_heads=1, in_channels=1))
    out = model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]))
    assert out.shape == (2, 2, 8, 8) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------- class conditioning
def test_class_conditioning_and_null_class():
    cfg = tiny_config(num_classes=3)
    model = make_model(cfg).eval()
    assert model.null_class == 3 and model.label_emb.num_embeddings == 4
    x, t = inputs(cfg, 1)
    x, t = x.repeat(4, 1, 1, 1), t.repeat(4)
    with torch.no_grad():
        out = model(x, t, torch.tensor([0, 1, 2, 3]))
        # each label gives a different prediction for the same (x, t); label 3 is the null class
        for i in range(4):
            for j in range(i + 1, 4):
                assert (out[i] - out[j]).abs().max() > 1e-3, (i, j)
        # the label of one sample does not change the others
        changed = model(x, t, torch.tensor([2, 1, 2, 3]))
    assert torch.allclose(changed[1:], out[1:], atol=1e-6) and torch.allclose(changed[0], out[2], atol=1e-6)
    with pytest.raises(ValueError, match=r"y: expected labels in \[0, 3\]"):
        model(x, t, torch.tensor([0, 1, 4, 0]))
    with pytest.raises(ValueError, match="y: this model is class-conditional"):
        model(x, t)
    with pytest.raises(TypeError, match="y: expected an int64"):
        model(x, t, torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"y: expected shape \(4,\)"):
        model(x, t, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="y: this model is not class-conditional"):
        make_model(tiny_config())(x, t, torch.zeros(4, dtype=torch.int64))


# ------------------------------------------------------------------------------ precision and memory format
def test_bf16_autocast_is_close_to_fp32():
    cfg = tiny_config(num_classes=2, use_scale_shift_norm=True)
    model = make_model(cfg).eval()
    x, t = inputs(cfg, 3)
    y = torch.tensor([0, 1, 2])
    with torch.no_grad():
        ref = model.double()(x.double(), t, y)
        fp32 = model.float()(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, y)
    assert low.dtype == torch.float32  # cast back to x's dtype
    assert rel_err(fp32, ref) < 1e-5
    # bf16 really ran (error well above fp32's) and stays within a few bf16 roundings of the fp64 result
    assert BF16_UNIT_ROUNDOFF / 20 < rel_err(low, ref) < 10 * BF16_UNIT_ROUNDOFF
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, t, y).square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_channels_last_matches_contiguous():
    cfg = tiny_config(resblock_updown=True)
    model = make_model(cfg).eval()
    x, t = inputs(cfg, 3)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x, t)
        got = model(x_cl, t)
        model_cl = model.to(memory_format=torch.channels_last)
        got_both = model_cl(x_cl, t)
    assert got_both.is_contiguous(memory_format=torch.channels_last)
    scale = ref.abs().max()
    assert ref.std() > 0.1
    assert (got - ref).abs().max() <= 1e-5 * scale and (got_both - ref).abs().max() <= 1e-5 * scale


# ----------------------------------------------------------------------------------------- parameter count
def count_formula(cfg: UNetConfig) -> int:
    """Parameters of the architecture from layer formulas (no modules built)."""
    conv = lambda i, o, k: i * o * k * k + o  # noqa: E731
    lin = lambda i, o: i * o + o  # noqa: E731
    emb = 4 * cfg.model_channels

    def res(i, o):
        return (2 * i + conv(i, o, 3) + lin(emb, (2 if cfg.use_scale_shift_norm else 1) * o) + 2 * o
                + conv(o, o, 3) + (conv(i, o, 1) if i != o else 0))

    def attn(c):
        return 2 * c + lin(c, 3 * c) + lin(c, c)

    resample = (lambda c: res(c, c)) if cfg.resblock_updown else (lambda c: conv(c, c, 3) if cfg.conv_resample else 0)
    total = lin(cfg.model_channels, emb) + lin(emb, emb) + conv(cfg.in_channels, cfg.model_channels, 3)
    if cfg.num_classes is not None:
        total += (cfg.num_classes + 1) * emb
    levels = len(cfg.channel_mult)
    attn_at = {level for level in range(levels) if cfg.image_size // 2**level in cfg.attention_resolutions}
    ch, skips = cfg.model_channels, [cfg.model_channels]
    for level, m in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            total += res(ch, m * cfg.model_channels) + (attn(m * cfg.model_channels) if level in attn_at else 0)
            ch = m * cfg.model_channels
            skips.append(ch)
        if level < levels - 1:
            total += resample(ch)
            skips.append(ch)
    total += 2 * res(ch, ch) + attn(ch)
    for level in reversed(range(levels)):
        width = cfg.channel_mult[level] * cfg.model_channels
        for i in range(cfg.num_res_blocks + 1):
            total += res(ch + skips.pop(), width) + (attn(width) if level in attn_at else 0)
            ch = width
            if level and i == cfg.num_res_blocks:
                total += resample(ch)
    return total + 2 * ch + conv(ch, cfg.out_channels, 3)


def n_params(cfg: UNetConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in UNet(cfg).parameters())


@pytest.mark.parametrize("cfg, known", [
    (UNetConfig.cifar10(), 35_749_766),
    # DDPM's CIFAR-10 model (Ho et al. 2020; google/ddpm-cifar10-32): 35,746,307 parameters
    (UNetConfig.cifar10(learn_sigma=False), 35_746_307),
    (UNetConfig.cifar10(use_scale_shift_norm=True), 38_310_662),
    (UNetConfig.fashion_mnist_small(), 1_743_170),
    (UNetConfig.fashion_mnist_small(num_classes=10, resblock_updown=True, conv_resample=False), None),
    (tiny_config(channel_mult=(1, 2, 3), num_res_blocks=2, attention_resolutions=(8, 2), conv_resample=False), None),
])
def test_parameter_count(cfg, known):
    assert n_params(cfg) == count_formula(cfg)
    if known is not None:
        assert count_formula(cfg) == known


# ------------------------------------------------------------------------------------------------- config
def test_config_json_round_trip_and_presets():
    for cfg in (UNetConfig.cifar10(), UNetConfig.fashion_mnist_small(num_classes=10, num_head_channels=16),
                tiny_config()):
        data = json.loads(json.dumps(cfg.to_dict()))
        assert UNetConfig.from_dict(data) == cfg
    cifar = UNetConfig.cifar10()
    assert (cifar.model_channels, cifar.channel_mult, cifar.num_res_blocks, cifar.attention_resolutions,
            cifar.dropout, cifar.image_size, cifar.in_channels, cifar.out_channels) == (
        128, (1, 2, 2, 2), 2, (16,), 0.1, 32, 3, 6)
    fm = UNetConfig.fashion_mnist_small()
    assert (fm.in_channels, fm.out_channels, fm.image_size, fm.attention_levels) == (1, 2, 28, frozenset({2}))
    assert UNetConfig.from_dict({"channel_mult": [1, 2], "attention_resolutions": []}).channel_mult == (1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cifar.dropout = 0.3  # type: ignore[misc]


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(channel_mult=()), ValueError, "channel_mult: expected at least one"),
    (dict(channel_mult=(1, "2")), TypeError, r"channel_mult\[1\]: expected an int"),
    (dict(channel_mult=(1, 0)), ValueError, r"channel_mult\[1\]: expected an int >= 1"),
    (dict(dropout=1.0), ValueError, "dropout: expected a probability"),
    (dict(learn_sigma="yes"), TypeError, "learn_sigma: expected a bool"),
    (dict(num_res_blocks=True), TypeError, "num_res_blocks: expected an int"),
    (dict(attention_resolutions=(12,)), ValueError, "attention_resolutions: 12 is not a feature-map size"),
    (dict(attention_resolutions=(16, 16)), ValueError, "attention_resolutions: expected distinct"),
    (dict(image_size=30), ValueError, "image_size: expected a multiple of .* = 8"),
    (dict(num_heads=3), ValueError, r"num_heads: level 1 \(16px\) has 256 channels, not a multiple of num_heads=3"),
    (dict(num_head_channels=48), ValueError, "num_head_channels: .*256 channels"),
    (dict(num_classes=0), ValueError, "num_classes: expected an int >= 1"),
])
def test_bad_config_values_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        UNetConfig(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown UNetConfig keys \['channels'\]"):
        UNetConfig.from_dict({"channels": 128})
    with pytest.raises(ValueError, match="'out_channels' is not a field"):
        UNetConfig.from_dict({**UNetConfig.cifar10().to_dict(), "out_channels": 6})
    with pytest.raises(TypeError, match="data: expected a mapping"):
        UNetConfig.from_dict([("model_channels", 8)])
    with pytest.raises(TypeError, match="config: expected a UNetConfig"):
        UNet(UNetConfig.cifar10().to_dict())


# -------------------------------------------------------------------------------------------- input errors
def test_bad_inputs_raise_clear_errors():
    cfg = tiny_config()
    model = make_model(cfg)
    x, t = inputs(cfg, 2)
    with pytest.raises(ValueError, match="x: expected H and W to be positive multiples of 2"):
        model(torch.randn(2, 2, 6, 7), t)
    with pytest.raises(ValueError, match="x: expected 2 channels"):
        model(torch.randn(2, 3, 8, 8), t)
    with pytest.raises(ValueError, match="x: expected a 4-D tensor"):
        model(torch.randn(2, 2, 8), t)
    with pytest.raises(TypeError, match="x: expected a floating-point"):
        model(torch.ones(2, 2, 8, 8, dtype=torch.int64), t)
    with pytest.raises(TypeError, match="x: expected dtype torch.float32"):
        model(x.double(), t)
    with pytest.raises(ValueError, match=r"t: expected shape \(2,\)"):
        model(x, t[:1])
    with pytest.raises(TypeError, match="t: expected an int64"):
        model(x, t.int())
    with pytest.raises(TypeError, match="t: expected an int64 tensor"):
        model(x, 5)
