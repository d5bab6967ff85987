"""attention_qkv: the fused CPU kernel and the pure-torch reference against a float64 softmax attention written
out by hand (not F.scaled_dot_product_attention), every dtype, sequence length and head size the U-Net and larger
models use, strided input and every CPU kernel variant; NaN locality, large scores, gradients, torch.compile and
argument errors."""
from __future__ import annotations

import math
import textwrap

import pytest
import torch

import diffcore
from diffcore import ops, reference

from helpers import outputs_of_cpu_variant
from op_cases import DTYPES, random_images

needs_fused = pytest.mark.skipif(not ops.fused_available("cpu"), reason="diffcore._C is not built")
# the 2x rule's floor: what both computations may round differently in the output's own precision
FLOOR = {torch.float64: 1e-13, torch.float32: 2e-7, torch.bfloat16: 0.0, torch.float16: 0.0}


def expected_float64(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The op's formula in float64 from the definition: scores, a softmax by hand (max subtracted), the weighted
    sum of the values; [B, T, C]."""
    x = qkv.double()
    batch, tokens, features = x.shape
    channels = features // 3
    d = channels // num_heads
    heads = x.reshape(batch, tokens, 3, num_heads, d)
    q, k, v = (heads[:, :, part].transpose(1, 2) for part in range(3))  # [B, H, T, d]
    scores = torch.einsum("bhic,bhjc->bhij", q, k) / math.sqrt(d)
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    out = torch.einsum("bhij,bhjc->bhic", weights, v)
    return out.transpose(1, 2).reshape(batch, tokens, channels)


def make_qkv(batch, tokens, num_heads, head_dim, dtype, *, seed=0, scale=1.0, strided=False):
    """Seeded [B, T, 3 C] features; strided: every other token row of a twice longer tensor (non-contiguous)."""
    features = 3 * num_heads * head_dim
    if strided:
        wide = random_images((batch, 2 * tokens, features), torch.float64, seed=seed, scale=scale).to(dtype)
        return wide[:, ::2]
    return random_images((batch, tokens, features), torch.float64, seed=seed, scale=scale).to(dtype)


def assert_within_twice_reference_error(fused, ref, truth, dtype, floor=None):
    fused_err = (fused.double() - truth).abs().max().item()
    ref_err = (ref.double() - truth).abs().max().item()
    assert fused_err <= 2 * ref_err + (FLOOR[dtype] if floor is None else floor), (fused_err, ref_err)


# ---------------------------------------------------------------- values

SIZES = [(1, 8, 1), (7, 16, 2), (49, 16, 4), (200, 64, 2), (49, 8, 3), (7, 64, 1), (200, 16, 4), (5, 3, 2)]


@needs_fused
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, head_dim, num_heads", SIZES)
def test_fused_and_reference_match_float64(dtype, tokens, head_dim, num_heads):
    qkv = make_qkv(2, tokens, num_heads, head_dim, dtype, seed=tokens + head_dim, scale=1.5)
    fused = ops.attention_qkv(qkv, num_heads, impl="fused")
    ref = ops.attention_qkv(qkv, num_heads, impl="reference")
    truth = expected_float64(qkv, num_heads)
    assert fused.shape == ref.shape == truth.shape == (2, tokens, num_heads * head_dim)
    assert fused.dtype == ref.dtype == dtype and fused.is_contiguous()
    assert_within_twice_reference_error(fused, ref, truth, dtype)
    assert_within_twice_reference_error(ref, ref, truth, dtype)  # the oracle itself is close to the formula
    if dtype == torch.float32:  # about 1e-6 of the output's scale
        assert (fused.double() - truth).abs().max().item() < 2e-6 * truth.abs().max().item()
    if dtype == torch.float64:
        torch.testing.assert_close(fused.double(), truth, atol=1e-12, rtol=1e-12)


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_rows_and_batch_zero(dtype):
    qkv = make_qkv(3, 49, 4, 16, dtype, seed=4, strided=True)
    assert not qkv.is_contiguous() and qkv.stride(-1) == 1
    fused = ops.attention_qkv(qkv, 4, impl="fused")
    torch.testing.assert_close(fused, ops.attention_qkv(qkv.contiguous(), 4, impl="fused"), atol=0, rtol=0)
    assert_within_twice_reference_error(fused, ops.attention_qkv(qkv, 4, impl="reference"),
                                        expected_float64(qkv, 4), dtype)
    columns = make_qkv(2, 7, 2, 8, dtype, seed=5).transpose(1, 2).contiguous().transpose(1, 2)  # last dim strided
    torch.testing.assert_close(ops.attention_qkv(columns, 2, impl="fused"),
                               ops.attention_qkv(columns.contiguous(), 2, impl="fused"), atol=0, rtol=0)
    for shape in [(0, 5, 24), (2, 0, 24)]:
        empty = torch.zeros(shape, dtype=dtype)
        for impl in ("fused", "reference"):
            assert ops.attention_qkv(empty, 2, impl=impl).shape == (shape[0], shape[1], 8)


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_large_scores_do_not_overflow(dtype):
    """|q . k| / sqrt(d) ~ 1e3: exp of unshifted scores would overflow; the max-shifted softmax does not."""
    qkv = make_qkv(2, 49, 4, 16, dtype, seed=6, scale=12.0)
    fused = ops.attention_qkv(qkv, 4, impl="fused")
    ref = ops.attention_qkv(qkv, 4, impl="reference")
    truth = expected_float64(qkv, 4)
    scores = expected_scores(qkv, 4)
    assert scores.abs().max() > 300
    assert torch.isfinite(fused).all()
    # a score of size |s| carries a rounding error of about eps |s| (the dot product's own), which the softmax
    # turns into a relative error of the weights of that size: the floor of any computation in this precision
    eps = torch.finfo(dtype if dtype != torch.bfloat16 else torch.float32).eps
    floor = 4 * eps * scores.abs().max().item() * truth.abs().max().item()
    assert_within_twice_reference_error(fused, ref, truth, dtype, floor=floor)


def expected_scores(qkv, num_heads):
    x = qkv.double()
    batch, tokens, features = x.shape
    d = features // 3 // num_heads
    heads = x.reshape(batch, tokens, 3, num_heads, d)
    return torch.einsum("bihc,bjhc->bhij", heads[:, :, 0], heads[:, :, 1]) / math.sqrt(d)


@needs_fused
@pytest.mark.parametrize("part", ["q", "k", "v"])
def test_nan_stays_in_its_head(part):
    qkv = make_qkv(3, 9, 2, 8, torch.float32, seed=7)
    channels, d = 16, 8
    offset = {"q": 0, "k": channels, "v": 2 * channels}[part]
    qkv[1, 4, offset + d + 3] = float("nan")  # sequence 1, token 4, head 1, channel 3
    expected = torch.zeros(3, 9, channels, dtype=torch.bool)
    if part == "q":
        expected[1, 4, d:] = True  # that query row of head 1
    elif part == "k":
        expected[1, :, d:] = True  # every row of head 1 (the key enters every softmax)
    else:
        expected[1, :, d + 3] = True  # channel 3 of head 1 in every row
    # the reference in float64 (torch's math kernel): torch's float32 CPU flash kernel (torch 2.13) returns a
    # finite row for a NaN query, so the float32 reference is no oracle for NaN placement
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        assert torch.equal(ops.attention_qkv(qkv.to(dtype), 2, impl="fused").isnan(), expected), dtype
    assert torch.equal(ops.attention_qkv(qkv.double(), 2, impl="reference").isnan(), expected)
    fused = ops.attention_qkv(qkv, 2, impl="fused")
    torch.testing.assert_close(fused[~expected], expected_float64(qkv, 2)[~expected].float())


# ---------------------------------------------------------------- every CPU kernel variant

VARIANT_SCRIPT = textwrap.dedent('''
    import sys
    import torch
    import diffcore
    from diffcore import ops
    sys.path.insert(0, sys.argv[2])
    from test_attention_qkv import variant_cases

    outputs = [ops.attention_qkv(qkv, heads, impl="fused") for qkv, heads in variant_cases()]
    torch.save({"isa": diffcore.build_info()["cpu_isa"], "outputs": outputs}, sys.argv[1])
''')


def variant_cases():
    """Inputs run under each CPU kernel variant: every dtype, T and d multiples of 16 and not, strided rows."""
    cases = []
    for dtype in DTYPES:
        for tokens, head_dim, heads in ((49, 16, 4), (20, 8, 3), (33, 64, 1), (3, 5, 2)):
            cases.append((make_qkv(2, tokens, heads, head_dim, dtype, seed=tokens, strided=tokens == 20), heads))
    return cases


@needs_fused
@pytest.mark.slow
def test_every_cpu_variant_matches_float64(tmp_path):
    cases = variant_cases()
    for isa in diffcore.build_info()["cpu_isas"]:
        outputs = outputs_of_cpu_variant(VARIANT_SCRIPT, isa, tmp_path / f"{isa}.pt")
        for got, (qkv, heads) in zip(outputs, cases, strict=True):
            ref = reference.attention_qkv(qkv, heads)
            assert got.dtype == qkv.dtype and got.is_contiguous()
            assert_within_twice_reference_error(got, ref, expected_float64(qkv, heads), qkv.dtype)


# ---------------------------------------------------------------- autograd, compile


@needs_fused
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_gradcheck(impl):
    qkv = make_qkv(2, 5, 2, 3, torch.float64, seed=8).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: ops.attention_qkv(v, 2, impl=impl), (qkv,))


@needs_fused
def test_fused_gradients_equal_the_reference():
    qkv = make_qkv(2, 9, 2, 8, torch.float32, seed=9)
    grads = {}
    for impl in ("fused", "reference"):
        leaf = qkv.detach().requires_grad_(True)
        y = ops.attention_qkv(leaf, 2, impl=impl)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        grads[impl] = leaf.grad
    torch.testing.assert_close(grads["fused"], grads["reference"])


@needs_fused
def test_opcheck():
    for qkv, heads in [(make_qkv(2, 7, 2, 8, torch.float32), 2), (make_qkv(1, 4, 1, 16, torch.bfloat16), 1),
                       (make_qkv(2, 6, 2, 4, torch.float32, strided=True), 2)]:
        torch.library.opcheck(torch.ops.diffcore.attention_qkv, (qkv, heads))


@needs_fused
def test_torch_compile_fullgraph():
    qkv = make_qkv(2, 49, 4, 16, torch.float32, seed=10)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def block(qkv):
        return ops.attention_qkv(qkv * 0.5, 4, impl="fused") + 1

    torch.testing.assert_close(block(qkv), ops.attention_qkv(qkv * 0.5, 4, impl="fused") + 1)


# ---------------------------------------------------------------- errors


def _bad_calls():
    """(args of the op, the argument the error must name)."""
    qkv = torch.randn(2, 5, 24)
    return [
        ((qkv.long(), 2), "qkv"),
        ((qkv[0], 2), "qkv"),
        ((qkv.unsqueeze(0), 2), "qkv"),
        ((qkv[..., :23], 2), "qkv"),
        ((qkv, 3), "qkv"),  # C = 8 is no multiple of 3 heads
        ((qkv, 0), "num_heads"),
        ((qkv, -1), "num_heads"),
        ((qkv[..., :0], 1), "qkv"),
    ]


@needs_fused
def test_cpp_op_and_fake_op_errors_name_the_argument():
    from torch._subclasses.fake_tensor import FakeTensorMode

    for args, name in _bad_calls():
        with pytest.raises(RuntimeError) as real:
            torch.ops.diffcore.attention_qkv(*args)
        assert str(real.value).startswith(f"{name}: expected"), str(real.value)
        mode = FakeTensorMode()
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(RuntimeError) as fake, mode:
            torch.ops.diffcore.attention_qkv(*fake_args)
        assert f"{name}: expected" in str(fake.value), str(fake.value)


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_wrapper_errors_name_the_argument(impl):
    for args, name in _bad_calls():
        with pytest.raises((TypeError, ValueError), match=f"^{name}: expected"):
            ops.attention_qkv(*args, impl=impl)
    with pytest.raises(TypeError, match="^num_heads: expected an int"):
        ops.attention_qkv(torch.randn(1, 2, 6), 1.0)
