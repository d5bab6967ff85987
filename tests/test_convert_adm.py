"""ADM (improved-diffusion / guided-diffusion / DPS) import: the test builds the ADM checkpoint layout itself from the
documented structure of ``unet.py`` (names, Conv1d attention projections, legacy/new qkv order, K label rows), fills
it with seeded random weights, converts, and checks blocks against forwards written here from the raw tensors."""
from __future__ import annotations

import math
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from diffcore.convert import ConversionError, adm_spec, from_adm_state_dict, load_pt_state_dict
from diffcore.convert.presets import ADM_PRESETS
from diffcore.samplers import ddim_sample
from diffcore.schedules import make_schedule
from diffcore.diffusion import GaussianDiffusion
from diffcore.unet import UNet
from helpers import run_cli

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------- the ADM layout, written here
def adm_layout(flags: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of guided-diffusion's UNetModel state dict for the flags (improved-diffusion's is the
    same without resblock_updown / num_head_channels), following unet.py's constructor."""
    size, ch0, nrb = flags["image_size"], flags["num_channels"], flags["num_res_blocks"]
    mult = (tuple(int(m) for m in flags["channel_mult"].split(",")) if flags.get("channel_mult") else
            {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}[size])
    ds_attn = {size // int(r) for r in str(flags.get("attention_resolutions", "16,8")).split(",")}
    out_ch = 6 if flags.get("learn_sigma") else 3
    emb = 4 * ch0
    shapes: dict[str, tuple[int, ...]] = {}

    def res(prefix, cin, cout):
        shapes.update({f"{prefix}.in_layers.0.weight": (cin,), f"{prefix}.in_layers.0.bias": (cin,),
                       f"{prefix}.in_layers.2.weight": (cout, cin, 3, 3), f"{prefix}.in_layers.2.bias": (cout,),
                       f"{prefix}.emb_layers.1.weight": ((2 if flags.get("use_scale_shift_norm", True) else 1) * cout, emb),
                       f"{prefix}.emb_layers.1.bias": ((2 if flags.get("use_scale_shift_norm", True) else 1) * cout,),
                       f"{prefix}.out_layers.0.weight": (cout,), f"{prefix}.out_layers.0.bias": (cout,),
                       f"{prefix}.out_layers.3.weight": (cout, cout, 3, 3), f"{prefix}.out_layers.3.bias": (cout,)})
        if cin != cout:
            shapes.update({f"{prefix}.skip_connection.weight": (cout, cin, 1, 1),
                           f"{prefix}.skip_connection.bias": (cout,)})

    def attn(prefix, c):
        shapes.update({f"{prefix}.norm.weight": (c,), f"{prefix}.norm.bias": (c,), f"{prefix}.qkv.weight": (3 * c, c, 1),
                       f"{prefix}.qkv.bias": (3 * c,), f"{prefix}.proj_out.weight": (c, c, 1),
                       f"{prefix}.proj_out.bias": (c,)})

    shapes.update({"time_embed.0.weight": (emb, ch0), "time_embed.0.bias": (emb,), "time_embed.2.weight": (emb, emb),
                   "time_embed.2.bias": (emb,)})
    if flags.get("class_cond"):
        shapes["label_emb.weight"] = (flags.get("num_classes", 1000), emb)
    shapes.update({"input_blocks.0.0.weight": (ch0, 3, 3, 3), "input_blocks.0.0.bias": (ch0,)})
    chans, ch, ds, i = [ch0], ch0, 1, 1
    for level, m in enumerate(mult):
        for _ in range(nrb):
            res(f"input_blocks.{i}.0", ch, m * ch0)
            ch = m * ch0
            if ds in ds_attn:
                attn(f"input_blocks.{i}.1", ch)
            chans.append(ch)
            i += 1
        if level != len(mult) - 1:
            if flags.get("resblock_updown"):
                res(f"input_blocks.{i}.0", ch, ch)
            else:
                shapes.update({f"input_blocks.{i}.0.op.weight": (ch, ch, 3, 3), f"input_blocks.{i}.0.op.bias": (ch,)})
            chans.append(ch)
            ds *= 2
            i += 1
    res("middle_block.0", ch, ch)
    attn("middle_block.1", ch)
    res("middle_block.2", ch, ch)
    o = 0
    for level, m in list(enumerate(mult))[::-1]:
        for j in range(nrb + 1):
            res(f"output_blocks.{o}.0", ch + chans.pop(), m * ch0)
            ch, k = m * ch0, 1
            if ds in ds_attn:
                attn(f"output_blocks.{o}.1", ch)
                k = 2
            if level and j == nrb:
                if flags.get("resblock_updown"):
                    res(f"output_blocks.{o}.{k}", ch, ch)
                else:
                    shapes.update({f"output_blocks.{o}.{k}.conv.weight": (ch, ch, 3, 3),
                                   f"output_blocks.{o}.{k}.conv.bias": (ch,)})
                ds //= 2
            o += 1
    shapes.update({"out.0.weight": (ch,), "out.0.bias": (ch,), "out.2.weight": (out_ch, ch0, 3, 3),
                   "out.2.bias": (out_ch,)})
    return shapes


def random_state(shapes, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in shapes.items():
        fan_in = math.prod(s[1:]) if len(s) > 1 else 1
        t = torch.randn(s, generator=g) / math.sqrt(fan_in)
        if k.endswith(("norm.weight", "in_layers.0.weight", "out_layers.0.weight", "out.0.weight")):
            t = 1 + 0.1 * t
        out[k] = t.to(dtype)
    return out


SMALL = dict(codebase="guided-diffusion", image_size=32, num_channels=32, num_res_blocks=1, learn_sigma=True,
             attention_resolutions="16,8", num_heads=2, use_scale_shift_norm=True, channel_mult="1,2,2,2")


def small_flags(**kw):
    f = dict(SMALL, **kw)
    return f


def layout_flags(flags):
    return {k: v for k, v in flags.items() if k != "channel_mult"}


# ---------------------------------------------------------------------------------- independent block forwards
def adm_group_norm(x, w, b):
    return F.group_norm(x.float(), 32, w, b, 1e-5)


def adm_resblock(sd, p, x, emb, scale_shift, resample=None):
    h = F.silu(adm_group_norm(x, sd[f"{p}.in_layers.0.weight"], sd[f"{p}.in_layers.0.bias"]))
    if resample is not None:  # ADM's ResBlock(up=True / down=True): resample h and x between in_rest and in_conv
        upd = (lambda z: F.interpolate(z, scale_factor=2, mode="nearest")) if resample == "up" else \
            (lambda z: F.avg_pool2d(z, kernel_size=2, stride=2))
        h, x = upd(h), upd(x)
    h = F.conv2d(h, sd[f"{p}.in_layers.2.weight"], sd[f"{p}.in_layers.2.bias"], padding=1)
    e = F.linear(F.silu(emb), sd[f"{p}.emb_layers.1.weight"], sd[f"{p}.emb_layers.1.bias"])[:, :, None, None]
    if scale_shift:
        scale, shift = e.chunk(2, dim=1)
        h = adm_group_norm(h, sd[f"{p}.out_layers.0.weight"], sd[f"{p}.out_layers.0.bias"]) * (1 + scale) + shift
    else:
        h = adm_group_norm(h + e, sd[f"{p}.out_layers.0.weight"], sd[f"{p}.out_layers.0.bias"])
    h = F.conv2d(F.silu(h), sd[f"{p}.out_layers.3.weight"], sd[f"{p}.out_layers.3.bias"], padding=1)
    skip = x if f"{p}.skip_connection.weight" not in sd else F.conv2d(x, sd[f"{p}.skip_connection.weight"],
                                                                       sd[f"{p}.skip_connection.bias"])
    return skip + h


def adm_attention(sd, p, x, heads, legacy):
    b, c, hh, ww = x.shape
    xs = x.reshape(b, c, -1)
    qkv = F.conv1d(adm_group_norm(xs, sd[f"{p}.norm.weight"], sd[f"{p}.norm.bias"]), sd[f"{p}.qkv.weight"],
                   sd[f"{p}.qkv.bias"])
    length = qkv.shape[-1]
    ch = c // heads
    if legacy:  # QKVAttentionLegacy: split heads, then q|k|v
        q, k, v = qkv.reshape(b * heads, 3 * ch, length).split(ch, dim=1)
    else:  # QKVAttention: q|k|v, then heads
        q, k, v = (t.reshape(b * heads, ch, length) for t in qkv.chunk(3, dim=1))
    scale = 1 / math.sqrt(math.sqrt(ch))
    w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    a = torch.einsum("bts,bcs->bct", w, v).reshape(b, -1, length)
    h = F.conv1d(a, sd[f"{p}.proj_out.weight"], sd[f"{p}.proj_out.bias"])
    return (xs + h).reshape(b, c, hh, ww)


def adm_forward(sd, flags, x, t, y=None):
    """guided-diffusion's UNetModel.forward over the raw ADM tensors, following unet.py's constructor."""
    size, ch0, nrb = flags["image_size"], flags["num_channels"], flags["num_res_blocks"]
    mult = tuple(int(m) for m in flags["channel_mult"].split(","))
    ds_attn = {size // int(r) for r in str(flags["attention_resolutions"]).split(",")}
    ss, updown = flags.get("use_scale_shift_norm", True), flags.get("resblock_updown", False)
    legacy = not flags.get("use_new_attention_order", False)
    head_ch, heads, heads_up = (flags.get("num_head_channels", -1), flags.get("num_heads", 4),
                                flags.get("num_heads_upsample", -1))

    def n_heads(c, up):
        return c // head_ch if head_ch != -1 else (heads_up if up and heads_up != -1 else heads)

    half = ch0 // 2
    args = t[:, None].float() * torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)[None]
    emb = F.linear(F.silu(F.linear(torch.cat([torch.cos(args), torch.sin(args)], -1), sd["time_embed.0.weight"],
                                   sd["time_embed.0.bias"])), sd["time_embed.2.weight"], sd["time_embed.2.bias"])
    if y is not None:
        emb = emb + sd["label_emb.weight"][y]
    h = F.conv2d(x, sd["input_blocks.0.0.weight"], sd["input_blocks.0.0.bias"], padding=1)
    hs, ds, i = [h], 1, 1
    for level, m in enumerate(mult):
        for _ in range(nrb):
            h = adm_resblock(sd, f"input_blocks.{i}.0", h, emb, ss)
            if ds in ds_attn:
                h = adm_attention(sd, f"input_blocks.{i}.1", h, n_heads(h.shape[1], False), legacy)
            hs.append(h)
            i += 1
        if level != len(mult) - 1:
            p = f"input_blocks.{i}.0"
            h = adm_resblock(sd, p, h, emb, ss, "down") if updown else \
                F.conv2d(h, sd[f"{p}.op.weight"], sd[f"{p}.op.bias"], stride=2, padding=1)
            hs.append(h)
            ds, i = ds * 2, i + 1
    h = adm_resblock(sd, "middle_block.0", h, emb, ss)
    h = adm_attention(sd, "middle_block.1", h, n_heads(h.shape[1], False), legacy)
    h = adm_resblock(sd, "middle_block.2", h, emb, ss)
    o = 0
    for level, m in list(enumerate(mult))[::-1]:
        for j in range(nrb + 1):
            h = adm_resblock(sd, f"output_blocks.{o}.0", torch.cat([h, hs.pop()], 1), emb, ss)
            k = 1
            if ds in ds_attn:
                h = adm_attention(sd, f"output_blocks.{o}.1", h, n_heads(h.shape[1], True), legacy)
                k = 2
            if level and j == nrb:
                p = f"output_blocks.{o}.{k}"
                h = adm_resblock(sd, p, h, emb, ss, "up") if updown else \
                    F.conv2d(F.interpolate(h, scale_factor=2, mode="nearest"), sd[f"{p}.conv.weight"],
                             sd[f"{p}.conv.bias"], padding=1)
                ds //= 2
            o += 1
    h = F.silu(adm_group_norm(h, sd["out.0.weight"], sd["out.0.bias"]))
    return F.conv2d(h, sd["out.2.weight"], sd["out.2.bias"], padding=1)


WHOLE_MODELS = {
    # sizes and channel_mult outside the presets, fp16 tensors, every option away from the presets' values
    "new_order_head_channels_updown_no_scale_shift_classes_eps_fp16": dict(
        image_size=24, channel_mult="1,2", num_channels=32, num_res_blocks=1, attention_resolutions="24,12",
        num_head_channels=16, use_new_attention_order=True, resblock_updown=True, use_scale_shift_norm=False,
        learn_sigma=False, class_cond=True, num_classes=5),
    "legacy_heads_upsample_conv_resample_learn_sigma": dict(
        image_size=32, channel_mult="1,2,2", num_channels=32, num_res_blocks=2, attention_resolutions="16,8",
        num_heads=2, num_heads_upsample=4, use_scale_shift_norm=True, learn_sigma=True),
}


@pytest.mark.parametrize("name", sorted(WHOLE_MODELS))
def test_whole_model_matches_independent_adm_forward(name):
    flags = dict(WHOLE_MODELS[name], codebase="guided-diffusion")
    dtype = torch.float16 if "fp16" in name else torch.float32
    sd = random_state(adm_layout(flags), seed=21, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the null-class row
        model = from_adm_state_dict(sd, flags)
    g = torch.Generator().manual_seed(22)
    size = flags["image_size"]
    x = torch.randn(2, 3, size, size, generator=g)
    t, y = torch.tensor([7, 901]), (torch.tensor([0, 4]) if flags.get("class_cond") else None)
    with torch.no_grad():
        ours = model(x, t, y)
    ref = adm_forward({k: v.float() for k, v in sd.items()}, flags, x, t, y)
    assert ours.shape == (2, 6 if flags["learn_sigma"] else 3, size, size)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scale_shift", [True, False])
def test_resblock_matches_independent_forward(scale_shift):
    flags = small_flags(use_scale_shift_norm=scale_shift)
    sd = random_state(adm_layout(layout_flags(flags)), seed=1)
    model = from_adm_state_dict(sd, flags)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 32, 16, 16, generator=g)
    emb = torch.randn(2, 128, generator=g)
    for prefix, block in (("input_blocks.1.0", model.input_blocks[1][0]),  # 32 -> 32
                          ("input_blocks.3.0", model.input_blocks[3][0])):  # 32 -> 64: skip conv
        x_in = x if prefix.endswith("1.0") else x
        with torch.no_grad():
            ours = block(x_in, emb)
        ref = adm_resblock(sd, prefix, x_in, emb, scale_shift)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", ["legacy", "new"])
def test_attention_matches_independent_forward(order):
    flags = small_flags(use_new_attention_order=order == "new", num_heads=4)
    sd = random_state(adm_layout(layout_flags(flags)), seed=3)
    model = from_adm_state_dict(sd, flags)
    block = model.input_blocks[3][1]  # 16x16 level, 64 channels, 4 heads
    assert block.num_heads == 4
    x = torch.randn(2, 64, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = block(x)
    ref = adm_attention(sd, "input_blocks.3.1", x, 4, legacy=order == "legacy")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # the other order's forward is a different function of the same tensors: the order matters
    wrong = adm_attention(sd, "input_blocks.3.1", x, 4, legacy=order != "legacy")
    assert (wrong - ref).abs().max() > 1e-3


def test_num_heads_upsample_used_on_the_way_up():
    flags = small_flags(num_heads=2, num_heads_upsample=4)
    sd = random_state(adm_layout(layout_flags(flags)), seed=5)
    model = from_adm_state_dict(sd, flags)
    heads_down = model.input_blocks[3][1].num_heads
    up = [b[1].num_heads for b in model.output_blocks if len(b) > 1 and hasattr(b[1], "num_heads")]
    assert heads_down == 2 and model.middle_block[1].num_heads == 2 and set(up) == {4}
    x = torch.randn(1, 64, 8, 8, generator=torch.Generator().manual_seed(6))
    prefix = next(f"output_blocks.{i}.1" for i, b in enumerate(model.output_blocks)
                  if len(b) > 1 and hasattr(b[1], "num_heads") and b[1].qkv.in_features == 64)
    idx = int(prefix.split(".")[1])
    with torch.no_grad():
        ours = model.output_blocks[idx][1](x)
    torch.testing.assert_close(ours, adm_attention(sd, prefix, x, 4, legacy=True), rtol=1e-5, atol=1e-5)


def test_timestep_rescaling_and_fp16_and_null_class():
    flags = small_flags(codebase="improved-diffusion", diffusion_steps=4000, class_cond=True, num_classes=1000)
    spec = adm_spec(flags)
    assert spec.unet.timestep_scale == 0.25 and spec.num_timesteps == 4000 and spec.variance_type == "learned_range"
    layout = adm_layout(layout_flags(flags))
    sd16 = random_state(layout, seed=7, dtype=torch.float16)
    with pytest.warns(UserWarning, match="null class"):
        model = from_adm_state_dict(sd16, flags)
    assert model.label_emb.weight.shape == (1001, 128) and model.label_emb.weight.dtype == torch.float32
    assert torch.equal(model.label_emb.weight[:1000], sd16["label_emb.weight"].float())
    assert torch.equal(model.label_emb.weight[1000], torch.zeros(128))
    # the model embeds t * 1000 / T: equal to an unscaled copy given float t / 4
    plain = UNet(spec.unet.__class__.from_dict({**spec.unet.to_dict(), "timestep_scale": 1.0}))
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    t, y = torch.tensor([10, 3999]), torch.tensor([1, 999])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), plain.eval()(x, t.float() * 0.25, y), rtol=0, atol=0)


def test_mismatch_lists_what_did_not_fit():
    flags = small_flags()
    sd = random_state(adm_layout(layout_flags(flags)))
    del sd["middle_block.1.qkv.bias"]
    sd["extra.weight"] = torch.zeros(1)
    sd["out.2.weight"] = torch.zeros(3, 32, 3, 3)
    with pytest.raises(ConversionError) as info:
        from_adm_state_dict(sd, flags)
    msg = str(info.value)
    assert "middle_block.1.qkv.bias" in msg and "extra.weight" in msg and "out.2.weight (3, 32, 3, 3)" in msg


@pytest.mark.parametrize("name", sorted(ADM_PRESETS))
def test_preset_parameter_count_matches_adm_layout(name):
    preset = ADM_PRESETS[name]
    layout = adm_layout(dict(preset.flags))
    with torch.device("meta"):
        model = UNet(preset.spec.unet)
    ours = sum(p.numel() for p in model.parameters())
    adm = sum(math.prod(s) for s in layout.values())
    extra = model.config.time_embed_dim if model.config.num_classes is not None else 0  # the null row
    assert ours == adm + extra
    # and the converter accepts exactly this layout's names and shapes
    from diffcore.convert.adm import expected_adm_shapes
    assert expected_adm_shapes(model) == layout


def _reduced(flags):
    """The preset's structure at width 32 (head width 32): the same blocks, resolutions and options."""
    f = dict(flags, num_channels=32)
    if f.get("num_head_channels", -1) != -1:
        f["num_head_channels"] = 32
    return f


@pytest.mark.parametrize("name", sorted(set(ADM_PRESETS) - {"dps-imagenet256"}))
def test_preset_converts_and_samples_one_ddim_step(name):
    flags = dict(ADM_PRESETS[name].flags) if name == "improved-cifar10" else _reduced(ADM_PRESETS[name].flags)
    sd = random_state(adm_layout(flags), seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = from_adm_state_dict(sd, flags)
    spec = adm_spec(flags)
    diffusion = GaussianDiffusion(make_schedule(spec.schedule, spec.num_timesteps), spec.prediction_type,
                                  spec.variance_type)
    size = spec.unet.image_size
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(12))
    kwargs = {"y": torch.tensor([7])} if spec.unet.num_classes else None
    t = spec.num_timesteps // 2
    out = ddim_sample(model, diffusion, x_T=x, steps=[t], model_kwargs=kwargs, progress=False).sample
    with torch.no_grad():
        eps = model(x, torch.tensor([t]), **(kwargs or {}))
    assert eps.shape == (1, 6, size, size)
    abar = float(diffusion.alphas_cumprod[t])
    expected = (x.double() - math.sqrt(1 - abar) * eps[:, :3].double()) / math.sqrt(abar)  # the step to abar = 1
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------- files and the command line
def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "diffcore.cli", "convert", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # multi-second end-to-end test: CI runs it with -m slow
def test_pt_file_round_trip_and_cli(tmp_path):
    flags = small_flags()
    sd = random_state(adm_layout(layout_flags(flags)), seed=13)
    torch.save(sd, tmp_path / "model.pt")
    loaded = load_pt_state_dict(tmp_path / "model.pt")
    assert loaded.keys() == sd.keys()
    (tmp_path / "flags.json").write_text(__import__("json").dumps(flags))
    r = _cli(tmp_path / "model.pt", tmp_path / "out", "--from", "adm", "--config", tmp_path / "flags.json",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    from diffcore.convert import load_model
    trained = load_model(tmp_path / "out")
    ref = from_adm_state_dict(sd, flags)
    for k, v in ref.state_dict().items():
        assert torch.equal(trained.model.state_dict()[k], v)
    assert trained.diffusion.variance_type.name == "LEARNED_RANGE"


def test_training_checkpoint_dict_gives_its_ema_weights(tmp_path):
    layout = adm_layout(layout_flags(small_flags()))
    raw, ema = random_state(layout, seed=15), random_state(layout, seed=16)
    torch.save({"model": raw, "ema": ema, "opt": {"lr": 1e-4}, "step": 10}, tmp_path / "train.pt")
    with pytest.warns(UserWarning, match="took 'ema'"):
        loaded = load_pt_state_dict(tmp_path / "train.pt")
    assert loaded.keys() == ema.keys() and all(torch.equal(loaded[k], ema[k]) for k in ema)
    torch.save({"model": raw, "step": 10}, tmp_path / "raw.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one set of weights: nothing to say
        loaded = load_pt_state_dict(tmp_path / "raw.pt")
    assert all(torch.equal(loaded[k], raw[k]) for k in raw)
    torch.save({"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
               tmp_path / "opt.pt")
    with pytest.raises(ConversionError, match="optimizer state"):
        load_pt_state_dict(tmp_path / "opt.pt")


class NotWeights:
    pass


@pytest.mark.parametrize("case", ["truncated", "object", "not_state_dict", "other_arch"])
def test_bad_pt_files_one_line_nothing_written(tmp_path, case, capsys, monkeypatch):
    sd = random_state(adm_layout(layout_flags(small_flags())), seed=14)
    path = tmp_path / "bad.pt"
    if case == "truncated":
        torch.save(sd, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif case == "object":
        torch.save({"x": NotWeights()}, path)
    elif case == "not_state_dict":
        torch.save([1, 2, 3], path)
    else:
        torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, path)
    monkeypatch.chdir(tmp_path)  # in process (the subprocess path is test_pt_file_round_trip_and_cli's)
    code, _, err = run_cli(capsys, "convert", path, tmp_path / "out", "--preset", "improved-cifar10")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffcore convert: error:"), err
    assert {"truncated": "not a readable", "object": "refused to unpickle", "not_state_dict": "expected a state dict",
            "other_arch": "missing"}[case] in lines[0]
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]
