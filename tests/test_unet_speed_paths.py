"""The U-Net's fast paths (in-place ops without autograd, fused scale-shift, bf16 GroupNorm without the float32 round
trip) against a functional re-implementation of the U-Net as it was before them, written here from the layer
formulas with the module's parameters (no block forward is called)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import diffcore
from diffcore.pretrained import load_default
from diffcore.unet import UNet, UNetConfig
import diffcore.unet.blocks as blocks_module
from diffcore.unet.blocks import AttentionBlock, Downsample, GroupNorm32, ResBlock, Upsample, upsample_conv3x3


def ref_norm(gn: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm in float32 (the former round trip) and back to x's dtype."""
    return F.group_norm(x.float(), gn.num_groups, gn.weight.float(), gn.bias.float(), gn.eps).to(x.dtype)


def ref_conv(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)


def ref_resample(module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, Upsample):
        x = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        return ref_conv(module.conv, x) if module.conv is not None else x
    if isinstance(module.op, torch.nn.Conv2d):
        return ref_conv(module.op, x)
    return F.avg_pool2d(x, 2)


def ref_resblock(block: ResBlock, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    h = F.silu(ref_norm(block.in_norm, x))
    if block.resample is not None:
        h, x = ref_resample(block.resample, h), ref_resample(block.resample, x)
    h = ref_conv(block.in_conv, h)
    e = F.linear(F.silu(emb), block.emb_proj.weight, block.emb_proj.bias)[:, :, None, None]
    if block.use_scale_shift_norm:
        scale, shift = e.chunk(2, dim=1)
        h = ref_norm(block.out_norm, h) * (1 + scale) + shift
    else:
        h = ref_norm(block.out_norm, h + e)
    h = ref_conv(block.out_conv, F.silu(h))
    skip = x if isinstance(block.skip, torch.nn.Identity) else ref_conv(block.skip, x)
    return skip + h


def ref_attention(block: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    b, c, hh, ww = x.shape
    heads, d = block.num_heads, c // block.num_heads
    tokens = ref_norm(block.norm, x).reshape(b, c, hh * ww).permute(0, 2, 1)
    qkv = F.linear(tokens, block.qkv.weight, block.qkv.bias).reshape(b, hh * ww, 3, heads, d)
    q, k, v = (qkv[:, :, i].permute(0, 2, 1, 3) for i in range(3))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    out = (weights @ v).permute(0, 2, 1, 3).reshape(b, hh * ww, c)
    out = F.linear(out, block.proj_out.weight, block.proj_out.bias)
    return x + out.permute(0, 2, 1).reshape(b, c, hh, ww)


def ref_layer(layer, h, emb):
    if isinstance(layer, ResBlock):
        return ref_resblock(layer, h, emb)
    if isinstance(layer, AttentionBlock):
        return ref_attention(layer, h)
    if isinstance(layer, (Upsample, Downsample)):
        return ref_resample(layer, h)
    return ref_conv(layer, h)


def reference_forward(model: UNet, x: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
    """The U-Net's forward as it was (improved-diffusion's UNetModel), from the parameters."""
    cfg = model.config
    tt = t.to(torch.float32) * cfg.timestep_scale
    half = cfg.model_channels // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = tt[:, None] * freqs[None]
    emb = F.pad(torch.cat([torch.cos(args), torch.sin(args)], -1), (0, cfg.model_channels % 2)).to(x.dtype)
    lin1, _, lin2 = model.time_embed
    emb = F.linear(F.silu(F.linear(emb, lin1.weight, lin1.bias)), lin2.weight, lin2.bias)
    if model.label_emb is not None:
        emb = emb + model.label_emb.weight[y]
    skips, h = [], x
    for block in model.input_blocks:
        for layer in block:
            h = ref_layer(layer, h, emb)
        skips.append(h)
    for layer in model.middle_block:
        h = ref_layer(layer, h, emb)
    for block in model.output_blocks:
        h = torch.cat([h, skips.pop()], dim=1)
        for layer in block:
            h = ref_layer(layer, h, emb)
    norm, _, conv = model.out
    return ref_conv(conv, F.silu(ref_norm(norm, h)))


def random_model(seed: int = 0, **overrides) -> UNet:
    """A small U-Net with every parameter perturbed (a fresh ADM U-Net outputs exactly zero)."""
    base = dict(in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                image_size=8, learn_sigma=True, num_heads=2, norm_groups=8)
    base.update(overrides)
    torch.manual_seed(seed)
    model = UNet(UNetConfig(**base))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("overrides", [{}, {"use_scale_shift_norm": False, "num_classes": 3},
                                       {"resblock_updown": True, "conv_resample": False}])
@pytest.mark.parametrize("grad", [False, True])
def test_fp32_forward_matches_the_former_forward(one_thread, overrides, grad):
    model = random_model(1, **overrides)
    torch.manual_seed(2)
    x = torch.randn(5, 1, 8, 8)
    t = torch.randint(0, 1000, (5,))
    y = torch.tensor([0, 1, 2, 3, 1]) if "num_classes" in overrides else None
    x_before = x.clone()
    with torch.set_grad_enabled(grad):
        got = model(x, t, y)
    with torch.no_grad():
        ref = reference_forward(model, x, t, y)
    assert ref.std() > 0.1
    assert torch.equal(x, x_before)  # the in-place paths never touch the input
    assert (got.detach() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_gradients_match_the_former_forward(one_thread):
    model = random_model(3)
    x = torch.randn(3, 1, 8, 8)
    t = torch.randint(0, 1000, (3,))
    model(x, t).square().mean().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reference_forward(model, x, t).square().mean().backward()
    for g, r in zip(got, (p.grad for p in model.parameters())):
        assert (g - r).abs().max() <= 1e-5 * (r.abs().max() + 1e-12)


def test_packaged_model_samples_unchanged(one_thread):
    packaged = load_default()
    model = packaged.model.eval()
    kw = dict(n=3, steps=5, seed=11, diffusion=packaged.diffusion, progress=False, image_shape=packaged.image_shape,
              precision="fp32", sampler="ddim")  # deterministic: ancestral noise would amplify rounding differences
    got = diffcore.sample(model, **kw)
    ref = diffcore.sample(lambda x, t: reference_forward(model, x, t), **kw)
    assert ref.std() > 0.1
    assert (got - ref).abs().max() <= 1e-4


def test_bf16_groupnorm_without_round_trip_is_as_accurate(one_thread):
    """flash-attention's rule: the bf16 fast path's error against float64 at most ~2x the plain round trip's."""
    torch.manual_seed(4)
    gn = GroupNorm32(4, 16)
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    for offset in (0.0, 300.0):  # a large common offset: variance by cancellation would fail in bf16
        x = (torch.randn(6, 16, 7, 7) * 3 + offset).bfloat16()
        exact = F.group_norm(x.double(), 4, gn.weight.double(), gn.bias.double(), gn.eps)
        got = gn(x)
        with torch.autocast("cpu", torch.bfloat16):
            got_autocast = gn(x)
        plain = ref_norm(gn, x)
        assert got.dtype == got_autocast.dtype == torch.bfloat16
        err_plain = (plain.double() - exact).abs().max()
        assert (got.double() - exact).abs().max() <= 2 * err_plain
        assert (got_autocast.double() - exact).abs().max() <= 2 * err_plain


def test_bf16_autocast_forward_close_to_fp32(one_thread):
    model = random_model(5)
    x = torch.randn(4, 1, 8, 8)
    t = torch.randint(0, 1000, (4,))
    with torch.no_grad():
        exact = reference_forward(model.double(), x.double(), t)
        model.float()
        with torch.autocast("cpu", torch.bfloat16):
            low = model(x, t)
        with torch.autocast("cpu", torch.bfloat16):
            plain = reference_forward(model, x, t)  # the former bf16 path (GroupNorm round trip)
    assert low.dtype == torch.float32
    err = (low.double() - exact).norm() / exact.norm()
    err_plain = (plain.double() - exact).norm() / exact.norm()
    assert 2.0**-9 / 20 < err <= 2 * err_plain + 2.0**-9


@pytest.mark.parametrize("channels_last_input", [False, True])
def test_inference_runs_fused_group_norm_in_channels_last(one_thread, monkeypatch, channels_last_input):
    """Without autograd on a CPU with the kernels, every GroupNorm is the fused op on NHWC activations, and the
    output comes back in the input's layout; with autograd on, none is (training keeps torch's GroupNorm)."""
    if not diffcore.ops.fused_available("cpu"):
        pytest.skip("the fused kernels are not built")
    model = random_model(6, in_channels=3)
    calls = []
    fused = diffcore.ops.group_norm_act

    def spy(x, *args, **kwargs):
        calls.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return fused(x, *args, **kwargs)

    monkeypatch.setattr(diffcore.ops, "group_norm_act", spy)
    torch.manual_seed(7)
    x = torch.randn(4, 3, 8, 8)
    if channels_last_input:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (4,))
    with torch.no_grad():
        got = model(x, t)
        ref = reference_forward(model, x.contiguous(), t)
    norms = sum(isinstance(m, GroupNorm32) for m in model.modules())
    assert len(calls) == norms and all(calls)
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last_input else torch.contiguous_format)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    calls.clear()
    model(x, t)
    assert calls == []


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape,with_bias", [((2, 3, 5, 7), True), ((1, 4, 1, 3), False), ((3, 2, 4, 4), True)])
def test_upsample_conv_by_phases_equals_upsample_then_conv(layout, shape, with_bias):
    """The four 2x2 phase convolutions equal nearest 2x upsampling then the 3x3 conv, written here as
    repeat_interleave + conv2d: to float64 rounding in float64, float32 rounding in float32; the layout is kept."""
    torch.manual_seed(8)
    x = torch.randn(*shape, dtype=torch.float64).contiguous(memory_format=layout)
    weight = torch.randn(5, shape[1], 3, 3, dtype=torch.float64)
    bias = torch.randn(5, dtype=torch.float64) if with_bias else None
    ref = F.conv2d(x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3), weight, bias, padding=1)
    got = upsample_conv3x3(x, weight, bias)
    assert got.shape == (shape[0], 5, 2 * shape[2], 2 * shape[3])
    assert (got - ref).abs().max() <= 1e-12 * ref.abs().max()
    assert got.is_contiguous(memory_format=layout)
    got32 = upsample_conv3x3(x.float(), weight.float(), bias.float() if with_bias else None)
    assert got32.dtype == torch.float32
    assert (got32.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_upsample_conv_by_phases_under_bf16_autocast(one_thread):
    """Under bf16 autocast the folded taps (summed in float32, then rounded once) are no less accurate than the
    plain bf16 upsample + conv, both against float64."""
    torch.manual_seed(9)
    x = torch.randn(4, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    weight, bias = 0.1 * torch.randn(16, 16, 3, 3), torch.randn(16)
    exact = F.conv2d(F.interpolate(x.double(), scale_factor=2.0, mode="nearest"), weight.double(), bias.double(),
                     padding=1)
    with torch.autocast("cpu", torch.bfloat16):
        got = upsample_conv3x3(x, weight, bias)
        plain = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
    assert got.dtype == plain.dtype == torch.bfloat16
    err = (got.double() - exact).norm() / exact.norm()
    err_plain = (plain.double() - exact).norm() / exact.norm()
    assert err <= 1.5 * err_plain + 1e-4


def test_upsample_uses_phases_only_for_cpu_inference(monkeypatch):
    """Training (autograd on) keeps interpolate + conv; inference on a CPU takes the phase convolutions."""
    calls = []
    monkeypatch.setattr(blocks_module, "upsample_conv3x3", lambda *args: calls.append(1) or upsample_conv3x3(*args))
    up = Upsample(3, use_conv=True)
    x = torch.randn(2, 3, 4, 4)
    train_out = up(x)
    assert calls == [] and train_out.requires_grad
    with torch.no_grad():
        infer_out = up(x)
    assert calls == [1]
    assert (infer_out - train_out.detach()).abs().max() <= 1e-5 * train_out.abs().max()


@pytest.mark.parametrize("amx", [False, True])
def test_cpu_attention_runs_in_float32_without_amx(monkeypatch, amx):
    """bf16 q, k, v on a CPU without AMX are attended in float32 (the result equals float32 attention of the same
    inputs, rounded once to bf16, and is closer to float64 than bf16 attention); with AMX (simulated) bf16 stays."""
    monkeypatch.setenv("DIFFCORE_CPU_FEATURES", "amx,avx512_bf16,avx512,avx2" if amx else "avx512_bf16,avx512,avx2,amd")
    block = AttentionBlock(UNetConfig(image_size=8, model_channels=16, channel_mult=(1, 2), num_heads=2,
                                      attention_resolutions=(4,)), 16)
    assert block.float32_on_cpu is (not amx)
    torch.manual_seed(10)
    q, k, v = (torch.randn(3, 2, 49, 8).bfloat16() for _ in range(3))
    got = block.attend(q, k, v)
    assert got.dtype == torch.bfloat16
    in_float32 = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).bfloat16()
    in_bf16 = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(got, in_bf16 if amx else in_float32)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert (in_float32.double() - exact).norm() <= (in_bf16.double() - exact).norm()


@pytest.mark.parametrize("channels", [1, 3])
def test_channels_last_view_makes_the_first_conv_write_nhwc(channels):
    """The U-Net's input goes to NHWC strides (a view for one channel, where torch's own conversion keeps NCHW),
    with the same values, so that the first conv already writes NHWC."""
    from diffcore.unet.model import channels_last

    torch.manual_seed(11)
    x = torch.randn(2, channels, 5, 6)[:, :, 1:]  # a non-contiguous input
    got = channels_last(x)
    assert torch.equal(got, x)
    out = F.conv2d(got, torch.randn(4, channels, 3, 3), padding=1)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()


def test_inference_runs_fused_attention(one_thread, monkeypatch):
    """Without autograd on a CPU with the kernels, each attention block is one attention_qkv call on the packed
    qkv (and the model still equals the former forward); with autograd on, torch's attention runs."""
    if not diffcore.ops.fused_available("cpu"):
        pytest.skip("the fused kernels are not built")
    model = random_model(12)
    calls = []
    fused = diffcore.ops.attention_qkv

    def spy(qkv, num_heads, **kwargs):
        calls.append((tuple(qkv.shape), num_heads))
        return fused(qkv, num_heads, **kwargs)

    monkeypatch.setattr(diffcore.ops, "attention_qkv", spy)
    torch.manual_seed(13)
    x = torch.randn(3, 1, 8, 8)
    t = torch.randint(0, 1000, (3,))
    with torch.no_grad():
        got = model(x, t)
        ref = reference_forward(model, x, t)
    blocks = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    assert blocks and calls == [((3, 16, 3 * m.qkv.in_features), m.num_heads) for m in blocks]
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    calls.clear()
    model(x, t)
    assert calls == []
