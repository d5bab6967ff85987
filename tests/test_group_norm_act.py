"""group_norm_act: the fused CPU kernel and the pure-torch reference against a float64 computation written out
directly (mean and biased variance per (image, group), not F.group_norm), in both layouts, every dtype and every
CPU kernel variant; NaN containment, gradients, torch.compile and argument errors."""
from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F

import diffcore
from diffcore import ops, reference

from helpers import outputs_of_cpu_variant
from op_cases import DTYPES, random_images, tolerance

needs_fused = pytest.mark.skipif(not ops.fused_available("cpu"), reason="diffcore._C is not built")
LAYOUTS = ["contiguous", "channels_last"]
# (weight and bias, scale and shift, silu)
OPTIONS = [(False, False, False), (True, False, False), (False, True, True), (True, True, True)]
# the 2x rule's floor: what both computations may round differently in the output's own precision
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 0.0, torch.float16: 0.0}


def expected_float64(x, weight, bias, num_groups, eps=1e-5, scale=None, shift=None, silu=False):
    """The op's formula in float64, from the definition (no torch normalization function)."""
    xd = x.double()
    batch, channels = xd.shape[:2]
    grouped = xd.reshape(batch, num_groups, -1)
    mean = grouped.mean(-1, keepdim=True)
    var = ((grouped - mean) ** 2).mean(-1, keepdim=True)
    y = ((grouped - mean) / torch.sqrt(var + eps)).reshape(xd.shape)
    per_channel, per_sample = (1, channels) + (1,) * (xd.dim() - 2), (batch, channels) + (1,) * (xd.dim() - 2)
    if weight is not None:
        y = y * weight.double().reshape(per_channel)
    if bias is not None:
        y = y + bias.double().reshape(per_channel)
    if scale is not None:
        y = y * (1.0 + scale.double().reshape(per_sample))
    if shift is not None:
        y = y + shift.double().reshape(per_sample)
    if silu:
        y = y / (1.0 + torch.exp(-y))
    return y


def make_inputs(shape, dtype, num_groups, *, affine=True, modulate=True, seed=0, offset=0.0, kind="contiguous"):
    """x (with a common offset added), weight, bias ([C]) and scale, shift ([B, C]), seeded."""
    batch, channels = shape[:2]
    x = (random_images(shape, torch.float64, seed=seed, scale=1.5) + offset).to(dtype)
    if kind == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = bias = scale = shift = None
    if affine:
        weight = (1.0 + 0.5 * random_images((channels,), torch.float64, seed=seed + 1)).to(dtype)
        bias = random_images((channels,), torch.float64, seed=seed + 2, scale=0.3).to(dtype)
    if modulate:
        scale = random_images((batch, channels), torch.float64, seed=seed + 3, scale=0.4).to(dtype)
        shift = random_images((batch, channels), torch.float64, seed=seed + 4, scale=0.4).to(dtype)
    return x, weight, bias, scale, shift


def run(impl, x, weight, bias, num_groups, scale, shift, silu, eps=1e-5):
    return ops.group_norm_act(x, weight, bias, num_groups, eps=eps, scale=scale, shift=shift, silu=silu, impl=impl)


def assert_within_twice_reference_error(fused, ref, truth, dtype):
    fused_err = (fused.double() - truth).abs().max().item()
    ref_err = (ref.double() - truth).abs().max().item()
    assert fused_err <= 2 * ref_err + FLOOR[dtype], (fused_err, ref_err)


# ---------------------------------------------------------------- values


@needs_fused
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("affine, modulate, silu", OPTIONS)
def test_fused_and_reference_match_float64(dtype, kind, affine, modulate, silu):
    x, weight, bias, scale, shift = make_inputs((3, 20, 5, 7), dtype, 5, affine=affine, modulate=modulate, kind=kind)
    fused = run("fused", x, weight, bias, 5, scale, shift, silu)
    ref = run("reference", x, weight, bias, 5, scale, shift, silu)
    truth = expected_float64(x, weight, bias, 5, scale=scale, shift=shift, silu=silu)
    assert fused.dtype == dtype and ref.dtype == dtype
    torch.testing.assert_close(fused.double(), ref.double(), **tolerance(dtype))
    assert_within_twice_reference_error(fused, ref, truth, dtype)
    assert_within_twice_reference_error(ref, ref, truth, dtype)  # the oracle itself is close to the formula
    torch.testing.assert_close(ref.double(), truth, **tolerance(dtype))


@needs_fused
@pytest.mark.parametrize("shape, groups", [((2, 6, 3, 3), 3), ((3, 20, 1, 1), 4), ((0, 8, 4, 4), 2),
                                           ((4, 12, 10), 6), ((5, 16), 4), ((2, 4, 3, 2, 3), 2),
                                           ((2, 64, 14, 14), 32), ((1, 48, 3, 5), 1), ((2, 8, 0, 3), 4),
                                           ((2, 8, 4, 5), 2), ((3, 6, 7, 9), 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_odd_sizes(shape, groups, dtype):
    kinds = LAYOUTS if len(shape) == 4 else ["contiguous"]
    for kind in kinds:
        x, weight, bias, scale, shift = make_inputs(shape, dtype, groups, kind=kind, seed=3)
        for silu in (False, True):
            fused = run("fused", x, weight, bias, groups, scale, shift, silu)
            ref = run("reference", x, weight, bias, groups, scale, shift, silu)
            assert fused.shape == x.shape
            torch.testing.assert_close(fused.double(), ref.double(), **tolerance(dtype))
            if x.numel() > 0:
                truth = expected_float64(x, weight, bias, groups, scale=scale, shift=shift, silu=silu)
                assert_within_twice_reference_error(fused, ref, truth, dtype)


@needs_fused
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("dtype, offset", [(torch.float32, 1000.0), (torch.float32, -3.0e4), (torch.float64, 1e7),
                                           (torch.bfloat16, 40.0)])
def test_large_mean_offset(kind, dtype, offset):
    """|mean| >> std: the shifted sums keep the variance (no E[x^2] - E[x]^2 cancellation)."""
    x, weight, bias, scale, shift = make_inputs((4, 16, 9, 9), dtype, 4, kind=kind, offset=offset, seed=5)
    fused = run("fused", x, weight, bias, 4, scale, shift, True)
    ref = run("reference", x, weight, bias, 4, scale, shift, True)
    truth = expected_float64(x, weight, bias, 4, scale=scale, shift=shift, silu=True)
    assert_within_twice_reference_error(fused, ref, truth, dtype)
    if dtype == torch.float32:  # the normalized values are exact to float32 rounding whatever the offset
        assert (fused.double() - truth).abs().max().item() < 2e-5


def one_group_images(y, kind):
    """y (1-D) as one image in one group: [1, 1, n] (contiguous), or [1, 32, n / 32, 1] in channels_last with the
    values in y's order (the channels_last kernels, vectorized over channels); y's length a multiple of 32."""
    if kind == "contiguous":
        return y.reshape(1, 1, -1)
    return y.reshape(1, -1, 1, 32).permute(0, 3, 1, 2)


def in_memory_order(t):
    """The values of one_group_images' output as a 1-D tensor in y's order."""
    return t.permute(0, 2, 3, 1).reshape(-1) if t.dim() == 4 else t.reshape(-1)


@needs_fused
@pytest.mark.parametrize("kind", LAYOUTS)
def test_silu_error_against_float64(kind):
    """The fast exp (degree 5, fast_math.h) keeps the float32 SiLU within 3.5e-7 of float64 (relative, about 3 ulp;
    3.3e-7 over every float in [-30, 30]), no worse than twice torch's float32 F.silu; in both layouts (channels_last
    runs the AVX-512 variants' micro-kernel)."""
    y = torch.linspace(-30, 30, 200001, dtype=torch.float64)[:199968]
    x = one_group_images(y, kind)  # one group: normalization is an affine map we undo through weight and bias
    assert x.is_contiguous(memory_format=torch.channels_last if kind == "channels_last" else torch.contiguous_format)
    mean, std = x.mean(), x.var(unbiased=False).add(1e-5).sqrt()
    weight, bias = std.expand(x.shape[1]).float(), mean.expand(x.shape[1]).float()
    fused = ops.group_norm_act(x.float(), weight, bias, 1, silu=True, impl="fused").double()
    plain = ops.group_norm_act(x.float(), weight, bias, 1, silu=False, impl="fused")
    truth = plain.double() / (1.0 + torch.exp(-plain.double()))
    torch_err = ((F.silu(plain).double() - truth).abs() / truth.abs().clamp(min=1e-30)).max().item()
    fused_err = ((fused - truth).abs() / truth.abs().clamp(min=1e-30)).max().item()
    assert fused_err <= 3.5e-7 and fused_err <= 2 * torch_err + 4e-7, (fused_err, torch_err)


@needs_fused
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_silu_rounds_a_value_within_1e_5_of_float64(dtype, kind):
    """For 16-bit outputs the kernel takes the short exp (fast_math.h): its SiLU before rounding is within 1e-5
    (relative) of the float64 SiLU. Checked through the rounding: an output that is not the nearest 16-bit value of
    the float64 SiLU must come from a value on the other side of the midpoint between the two neighbours, so the
    float64 SiLU lies within 1e-5 of that midpoint; and at most 1% of the outputs may differ."""
    # exact in both widths' float32; first 32 zeros: the pivots (each layout's first values, formulas.h) are 0, so
    # that the 16-bit and the float32 runs (sums in different orders) normalize to the same y within about 1e-9
    y = torch.cat([torch.zeros(32), torch.linspace(-20, 20, 100001, dtype=torch.float64)[:99936]]).to(dtype)
    x = one_group_images(y, kind)  # one group: normalization is an affine map we undo through weight and bias
    mean, std = x.double().mean(), x.double().var(unbiased=False).add(1e-5).sqrt()
    weight, bias = std.expand(x.shape[1]).float(), mean.expand(x.shape[1]).float()
    fused = in_memory_order(ops.group_norm_act(x, weight, bias, 1, silu=True, impl="fused"))
    plain = in_memory_order(ops.group_norm_act(x.float(), weight, bias, 1, silu=False, impl="fused")).double()
    truth = plain / (1.0 + torch.exp(-plain))
    nearest = truth.to(dtype)  # round to nearest even, from float64
    wrong = (fused != nearest) & (plain.abs() >= 1e-3)  # (y near 0: more than 1e-5 relative of that 1e-9)
    assert wrong.float().mean().item() <= 0.01
    # (truth within 1.2e-5 of the midpoint also makes the two outputs neighbours: nearest is within half a step)
    midpoint = (fused[wrong].double() + nearest[wrong].double()) / 2
    margin = ((truth[wrong] - midpoint).abs() / truth[wrong].abs()).max().item() if wrong.any() else 0.0
    assert margin <= 1.2e-5, margin  # 1e-5 for the short exp, the rest for the float32 normalization's rounding


def tiny_and_nan_case(dtype, kind):
    """Inputs whose outputs are denormal floats (weight 0, bias 1e-39 and 3e-39: y = bias exactly), with a NaN in
    image 1 (its group's outputs NaN), C = 64 (whole vector rows in channels_last)."""
    x, *_ = make_inputs((2, 64, 3, 5), dtype, 8, kind=kind, seed=9)
    x = x.clone()
    x[1, 3, 1, 2] = float("nan")
    weight = torch.zeros(64, dtype=dtype)
    bias = torch.tensor([1e-39, -3e-39], dtype=torch.float32).repeat(32).to(dtype)
    return x, weight, bias


@needs_fused
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_denormal_outputs_round_as_torch_and_nan_stays_nan(dtype, kind):
    """Denormal results are rounded as c10 does, not flushed (the AVX512-BF16 conversion flushes them: vectors
    with one take the integer rounding), and NaN gives NaN: bit for bit equal to the reference."""
    x, weight, bias = tiny_and_nan_case(dtype, kind)
    for silu in (False, True):
        fused = ops.group_norm_act(x, weight, bias, 8, silu=silu, impl="fused")
        ref = ops.group_norm_act(x, weight, bias, 8, silu=silu, impl="reference")
        finite = ~ref.isnan()
        assert torch.equal(fused.isnan(), ref.isnan()) and ref.isnan()[1, :8].all() and finite[0].all()
        assert torch.equal(fused[finite], ref[finite])
        assert (fused[finite] != 0).all() and (fused[finite].abs() < 1.2e-38).all()  # denormal, kept


@needs_fused
@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "strided"])
def test_output_memory_format_follows_the_input(kind):
    x = random_images((2, 8, 6, 6), torch.float32)
    if kind == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif kind == "strided":
        x = torch.zeros(2, 8, 6, 12)[..., ::2].copy_(x)
    for impl in ("fused", "reference"):
        y = ops.group_norm_act(x, None, None, 4, impl=impl)
        assert y.is_contiguous(memory_format=torch.channels_last if kind == "channels_last" else
                               torch.contiguous_format)
    torch.testing.assert_close(ops.group_norm_act(x, None, None, 4, impl="fused"),
                               expected_float64(x, None, None, 4).float(), atol=2e-5, rtol=2e-5)


@needs_fused
@pytest.mark.parametrize("kind", LAYOUTS)
def test_nan_stays_in_its_image_and_group(kind):
    x, weight, bias, scale, shift = make_inputs((3, 12, 5, 5), torch.float32, 4, kind=kind)
    x = x.clone()
    x[1, 7, 2, 3] = float("nan")  # image 1, group 2 (channels 6..8)
    fused = run("fused", x, weight, bias, 4, scale, shift, True)
    ref = run("reference", x, weight, bias, 4, scale, shift, True)
    nan = torch.zeros_like(fused, dtype=torch.bool)
    nan[1, 6:9] = True
    assert torch.equal(fused.isnan(), nan) and torch.equal(ref.isnan(), nan)
    torch.testing.assert_close(fused, ref, atol=2e-5, rtol=2e-5, equal_nan=True)


# ---------------------------------------------------------------- every CPU kernel variant

VARIANT_SCRIPT = textwrap.dedent('''
    import sys
    import torch
    import diffcore
    from diffcore import ops
    sys.path.insert(0, sys.argv[2])
    from test_group_norm_act import variant_cases

    outputs = [ops.group_norm_act(x, w, b, g, scale=s, shift=h, silu=silu, impl="fused")
               for x, w, b, g, s, h, silu in variant_cases()]
    torch.save({"isa": diffcore.build_info()["cpu_isa"], "outputs": outputs}, sys.argv[1])
''')


def variant_cases():
    """Inputs run under each CPU kernel variant: every dtype and layout, C a multiple of 16 and not."""
    cases = []
    for dtype in DTYPES:
        for kind in LAYOUTS:
            for shape, groups in (((3, 20, 5, 7), 5), ((2, 32, 9, 9), 32), ((2, 64, 4, 4), 8)):
                x, w, b, s, h = make_inputs(shape, dtype, groups, kind=kind, seed=7)
                cases.append((x, w, b, groups, s, h, True))
            x, *_ = make_inputs((2, 48, 6, 6), dtype, 6, kind=kind, seed=8, offset=50.0)
            cases.append((x, None, None, 6, None, None, False))
            if dtype in (torch.float32, torch.bfloat16):
                x, w, b = tiny_and_nan_case(dtype, kind)
                cases += [(x, w, b, 8, None, None, silu) for silu in (False, True)]
    return cases


@needs_fused
@pytest.mark.slow
def test_every_cpu_variant_matches_the_reference(tmp_path):
    """Each variant against the reference; the variants with fused multiply-add (avx2, avx512, avx512_bf16) compute
    the same operations (the AVX-512 micro-kernels included, see kernels_cpu.cpp), so their outputs are equal bit for
    bit."""
    expected = [reference.group_norm_act(x, w, b, g, 1e-5, s, h, silu) for x, w, b, g, s, h, silu in variant_cases()]
    with_fma = {}
    for isa in diffcore.build_info()["cpu_isas"]:
        outputs = outputs_of_cpu_variant(VARIANT_SCRIPT, isa, tmp_path / f"{isa}.pt")
        for got, want in zip(outputs, expected, strict=True):
            assert got.stride() == want.stride()
            torch.testing.assert_close(got.double(), want.double(), **tolerance(want.dtype), equal_nan=True)
        if isa != "baseline":
            with_fma[isa] = outputs
    first = next(iter(with_fma.values()), [])
    for isa, outputs in with_fma.items():
        for got, want in zip(outputs, first, strict=True):
            assert same_bits(got, want), isa


def same_bits(a, b):
    """a and b equal bit for bit, except that a NaN matches any NaN."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan].view(ints), b[~nan].view(ints))


# ---------------------------------------------------------------- autograd, compile


@needs_fused
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_gradcheck(kind, impl):
    x, weight, bias, scale, shift = make_inputs((2, 6, 3, 4), torch.float64, 3, kind=kind)
    leaves = [v.detach().requires_grad_(True) for v in (x, weight, bias, scale, shift)]

    def fn(x, weight, bias, scale, shift):
        return ops.group_norm_act(x, weight, bias, 3, scale=scale, shift=shift, silu=True, impl=impl)

    assert torch.autograd.gradcheck(fn, leaves)


@needs_fused
def test_fused_gradients_equal_the_reference():
    x, weight, bias, scale, shift = make_inputs((3, 8, 5, 5), torch.float32, 4, kind="channels_last")
    grads = {}
    for impl in ("fused", "reference"):
        leaves = [v.detach().requires_grad_(True) for v in (x, weight, bias, scale, shift)]
        y = ops.group_norm_act(leaves[0], leaves[1], leaves[2], 4, scale=leaves[3], shift=leaves[4], silu=True,
                               impl=impl)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        grads[impl] = [leaf.grad for leaf in leaves]
    for got, want in zip(grads["fused"], grads["reference"]):
        torch.testing.assert_close(got, want)


@needs_fused
def test_opcheck():
    x, weight, bias, scale, shift = make_inputs((2, 8, 4, 4), torch.float32, 4)
    cl = x.contiguous(memory_format=torch.channels_last)
    for args in [(x, weight, bias, 4, 1e-5, scale, shift, True), (cl, None, None, 2, 1e-3, None, shift, False),
                 (x.to(torch.bfloat16), weight, bias, 4, 1e-5, scale.to(torch.bfloat16), None, True)]:
        torch.library.opcheck(torch.ops.diffcore.group_norm_act, args)


@needs_fused
def test_torch_compile_fullgraph():
    x, weight, bias, scale, shift = make_inputs((2, 8, 6, 6), torch.float32, 4, kind="channels_last")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def block(x, scale, shift):
        return ops.group_norm_act(x, weight, bias, 4, scale=scale, shift=shift, silu=True, impl="fused") * 2

    got = block(x, scale, shift)
    expected = ops.group_norm_act(x, weight, bias, 4, scale=scale, shift=shift, silu=True, impl="fused") * 2
    torch.testing.assert_close(got, expected)
    assert got.is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------- errors


def _bad_calls():
    """(args of the op, the argument the error must name)."""
    x = torch.randn(2, 6, 3, 3)
    w, s = torch.ones(6), torch.zeros(2, 6)
    return [
        ((x.long(), None, None, 2, 1e-5, None, None, False), "x"),
        ((x[0, 0, 0], None, None, 1, 1e-5, None, None, False), "x"),
        ((x, None, None, 4, 1e-5, None, None, False), "num_groups"),
        ((x, None, None, 0, 1e-5, None, None, False), "num_groups"),
        ((x, None, None, 3, 0.0, None, None, False), "eps"),
        ((x, None, None, 3, float("inf"), None, None, False), "eps"),
        ((x, w[:5], None, 3, 1e-5, None, None, False), "weight"),
        ((x, None, w.double(), 3, 1e-5, None, None, False), "bias"),
        ((x, w, w, 3, 1e-5, s[:1], None, False), "scale"),
        ((x, w, w, 3, 1e-5, s, w, False), "shift"),
        ((x, w.to(torch.float16), None, 3, 1e-5, None, None, False), "weight"),
    ]


@needs_fused
def test_cpp_op_and_fake_op_errors_name_the_argument():
    from torch._subclasses.fake_tensor import FakeTensorMode

    for args, name in _bad_calls():
        with pytest.raises(RuntimeError) as real:
            torch.ops.diffcore.group_norm_act(*args)
        mode = FakeTensorMode()
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(RuntimeError) as fake, mode:
            torch.ops.diffcore.group_norm_act(*fake_args)
        for info in (real, fake):
            assert str(info.value).startswith(f"{name}:"), (name, str(info.value))


@pytest.mark.parametrize("impl", ["reference", pytest.param("fused", marks=needs_fused)])
def test_wrapper_errors_name_the_argument(impl):
    for (x, w, b, g, eps, s, h, silu), name in _bad_calls():
        with pytest.raises((ValueError, TypeError), match=f"^{name}:"):
            ops.group_norm_act(x, w, b, g, eps=eps, scale=s, shift=h, silu=silu, impl=impl)
    x = torch.randn(2, 6, 3, 3)
    with pytest.raises(TypeError, match="^silu:"):
        ops.group_norm_act(x, None, None, 3, silu="yes", impl=impl)
    with pytest.raises(TypeError, match="^num_groups:"):
        ops.group_norm_act(x, None, None, 3.0, impl=impl)
