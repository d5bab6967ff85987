"""Per-image noise streams (``first_row``): row b of a call draws the Philox noise of image first_row + b of the seed,
so a batch split into chunks (each with first_row = its first row) draws what the whole batch draws, and every
sampler, stochastic ones included, gives the same images whatever the batch size."""
from __future__ import annotations

import math

import pytest
import torch

import diffcore
from diffcore import ops
from diffcore.diffusion import GaussianDiffusion
from diffcore.reference.philox import MAX_IMAGES, philox4x32_10, philox_normal, philox_normal_like
from diffcore.samplers import run_sampler
from diffcore.samplers.loop import initial_noise
from diffcore.schedules import make_schedule

from op_cases import T_STEPS, layout, make_table, random_images, timesteps, tolerance

needs_fused = pytest.mark.skipif(not ops.fused_available("cpu"), reason="diffcore._C is not built")
STOCHASTIC = [("ancestral", None), ("ddim", 1.0), ("dpm++2m-sde", None)]


def _close(a, b, dtype):
    torch.testing.assert_close(a, b, **tolerance(dtype), equal_nan=True)


# ---------------------------------------------------------------- the counter rule (reference)


def test_philox_first_row_draws_rows_of_the_whole_batch():
    whole = philox_normal(9, 13, seed=7, offset=3)
    for first_row, rows in [(0, 4), (2, 5), (8, 1), (4, 5)]:
        part = philox_normal(rows, 13, seed=7, offset=3, first_row=first_row)
        assert torch.equal(part, whole[first_row:first_row + rows])
    assert not torch.allclose(philox_normal(4, 13, 7, 3, first_row=1), whole[:4])  # the row index matters


@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_philox_normal_like_and_initial_noise_slice_like_the_whole_batch(kind):
    whole = philox_normal_like(layout(torch.empty(7, 3, 4, 5), kind), 11, 2)
    part = philox_normal_like(layout(torch.empty(3, 3, 4, 5), kind), 11, 2, first_row=4)
    assert torch.equal(part, whole[4:])
    x_T = initial_noise((7, 2, 3, 3), 5)
    assert torch.equal(initial_noise((2, 2, 3, 3), 5, 3), x_T[3:5])


def test_last_image_of_a_seed_uses_counter_word_2_to_the_32_minus_1():
    """Rows at the end of the image numbering against Philox4x32-10 (checked by known answers in test_ops) and
    Box-Muller written out here."""
    seed, offset = 2**40 + 17, 2**33 + 5
    got = philox_normal(2, 8, seed, offset, first_row=MAX_IMAGES - 2)
    for b, image in enumerate([MAX_IMAGES - 2, MAX_IMAGES - 1]):
        for g in range(2):
            counter = (g, image, offset % 2**32, offset >> 32)
            r = [int(w) for w in philox4x32_10(tuple(torch.tensor([c]) for c in counter), seed)]
            rad_a = math.sqrt(-2 * math.log((r[0] + 1) * 2.0**-32))
            rad_b = math.sqrt(-2 * math.log((r[2] + 1) * 2.0**-32))
            ang_a, ang_b = (2 * math.pi * 2.0**-32 * r[1], 2 * math.pi * 2.0**-32 * r[3])
            expected = [rad_a * math.cos(ang_a), rad_a * math.sin(ang_a), rad_b * math.cos(ang_b),
                        rad_b * math.sin(ang_b)]
            torch.testing.assert_close(got[b, 4 * g:4 * g + 4], torch.tensor(expected, dtype=torch.float64),
                                       rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- fused ops == reference, chunks == whole batch


def _ddim(x, eps, t, table, **kw):
    return ops.ddim_step(x, eps, t, (t - 3).clamp(min=-1), table, 0.8, seed=21, offset=4, **kw)


def _ddpm(x, mo, t, table, **kw):
    return ops.ddpm_step(x, mo, t, table, variance_type="learned_range", seed=21, offset=4, **kw)


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
@pytest.mark.parametrize("step", ["ddim", "ddpm"])
def test_fused_steps_with_first_row_match_the_reference_and_the_whole_batch(dtype, kind, step):
    batch, first_row = 7, 3
    x = layout(random_images((batch, 3, 5, 6), dtype), kind)
    t, table = timesteps(batch).clamp(min=1), make_table()
    channels = 3 if step == "ddim" else 6
    mo = layout(random_images((batch, channels, 5, 6), dtype, seed=1, scale=0.5).clamp(-1, 1), kind)
    fn = _ddim if step == "ddim" else _ddpm
    whole = fn(x, mo, t, table, impl="fused")
    rows = slice(first_row, batch)
    for impl in ("fused", "reference"):
        part = fn(x[rows], mo[rows], t[rows], table, first_row=first_row, impl=impl)
        for got, want in zip(part, whole):
            _close(got, want[rows], dtype)
    shifted = fn(x[rows], mo[rows], t[rows], table, impl="fused")  # first_row 0: other images' noise
    assert not torch.allclose(shifted[0], whole[0][rows])


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_noise_at_the_end_of_the_image_numbering(dtype):
    x = torch.zeros(3, 2, 3, 3, dtype=dtype)
    t, table = torch.full((3,), T_STEPS - 1), make_table()
    first_row = MAX_IMAGES - 3
    fused, ref = (ops.ddpm_step(x, x, t, table, seed=9, offset=1, first_row=first_row, impl=impl)[0]
                  for impl in ("fused", "reference"))
    _close(fused, ref, dtype)
    assert fused.std() > 0.1


@needs_fused
def test_fused_backward_redraws_the_noise_of_the_same_images():
    """The gradient of a learned variance depends on z: the fused op's backward (the reference's VJP) must redraw
    the noise of images first_row + b, as the forward drew it."""
    x = random_images((4, 2, 3, 3), torch.float64)
    mo = random_images((4, 4, 3, 3), torch.float64, seed=1).clamp(-1, 1)
    t, table = timesteps(4).clamp(min=1), make_table()
    weights = random_images((4, 2, 3, 3), torch.float64, seed=2)

    def grad(impl, first_row):
        m = mo.clone().requires_grad_(True)
        out = ops.ddpm_step(x, m, t, table, variance_type="learned_range", seed=3, first_row=first_row, impl=impl)
        (out[0] * weights).sum().backward()
        return m.grad

    fused = grad("fused", 5)
    torch.testing.assert_close(fused, grad("reference", 5), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(fused, grad("reference", 0))


# ---------------------------------------------------------------- fake implementation and bad first_row


@needs_fused
def test_fake_op_takes_first_row_and_checks_it():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, t, table = torch.randn(2, 3, 4, 4), torch.tensor([3, 5]), make_table()
    cl = x.contiguous(memory_format=torch.channels_last)
    mode = FakeTensorMode()
    fx, fcl, ft, ftable = (mode.from_tensor(v) for v in (x, cl, t, table))
    with mode:
        out = torch.ops.diffcore.ddim_step(fcl, fcl, ft, ft - 1, ftable, 1.0, 0, False, None, 3, 4, first_row=7)
        ddpm = torch.ops.diffcore.ddpm_step(fx, fx, ft, ftable, 0, 0, False, None, 3, 4, 11)
        with pytest.raises(RuntimeError, match="^first_row: expected an int in"):
            torch.ops.diffcore.ddpm_step(fx, fx, ft, ftable, 0, 0, False, None, 3, 4, MAX_IMAGES - 1)
    real = torch.ops.diffcore.ddim_step(cl, cl, t, t - 1, table, 1.0, 0, False, None, 3, 4, first_row=7)
    for f, r in zip(out + ddpm, real + torch.ops.diffcore.ddpm_step(x, x, t, table, 0, 0, False, None, 3, 4, 11)):
        assert (f.shape, f.dtype, f.stride()) == (r.shape, r.dtype, r.stride())


@needs_fused
def test_opcheck_with_first_row():
    x, t, table = random_images((3, 2, 4, 4), torch.float32), timesteps(3), make_table()
    torch.library.opcheck(torch.ops.diffcore.ddim_step, (x, x, t, t - 1, table, 0.5, 0, True, None, 3, 1, 5))
    torch.library.opcheck(torch.ops.diffcore.ddpm_step, (x, x, t, table, 0, 0, False, None, 3, 0),
                          {"first_row": 2})


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_bad_first_row_names_the_argument(impl):
    if impl == "fused" and not ops.fused_available("cpu"):
        pytest.skip("diffcore._C is not built")
    x, t, table = torch.randn(3, 2, 4, 4), torch.tensor([3, 5, 7]), make_table()
    for bad, kind in [(-1, ValueError), (True, TypeError), (1.5, TypeError), (MAX_IMAGES - 2, ValueError)]:
        for call in (lambda: ops.ddim_step(x, x, t, t - 1, table, 1.0, seed=1, first_row=bad, impl=impl),
                     lambda: ops.ddpm_step(x, x, t, table, seed=1, first_row=bad, impl=impl)):
            with pytest.raises(kind, match="^first_row: expected an int"):
                call()
    ops.ddpm_step(x, x, t, table, seed=1, first_row=MAX_IMAGES - 3, impl=impl)  # the last rows are fine
    with pytest.raises(ValueError, match="^first_row:"):
        philox_normal_like(x, 1, 0, first_row=MAX_IMAGES - 2)


@needs_fused
def test_cpp_op_checks_first_row_when_called_directly():
    x, t, table = torch.randn(3, 2, 4, 4), torch.tensor([3, 5, 7]), make_table()
    for bad in (-1, MAX_IMAGES - 2):
        with pytest.raises(RuntimeError, match=r"^first_row: expected an int in \[0, 2\*\*32 - B\] with B = 3"):
            torch.ops.diffcore.ddpm_step(x, x, t, table, 0, 0, False, None, 1, 0, bad)


def test_samplers_check_first_row():
    diffusion = GaussianDiffusion(make_schedule("cosine", 20))
    model = _Model(learned=False)
    for sampler, eta in STOCHASTIC:
        with pytest.raises(TypeError, match="^first_row:"):
            run_sampler(sampler, model, diffusion, (2, 2, 4, 4), steps=3, eta=eta, seed=0, progress=False,
                        first_row=True)
        with pytest.raises(ValueError, match="^first_row:"):
            run_sampler(sampler, model, diffusion, (2, 2, 4, 4), steps=3, eta=eta, seed=0, progress=False,
                        first_row=MAX_IMAGES - 1)


# ---------------------------------------------------------------- samplers and diffcore.sample split into batches


class _Model:
    """A small per-image model: a fixed random 3x3 convolution scaled by the timestep, tanh'd variance channels
    for a learned variance."""

    def __init__(self, learned: bool, channels: int = 2, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.learned = learned
        self.weight = 0.3 * torch.randn((2 if learned else 1) * channels, channels, 3, 3, generator=g)

    def __call__(self, x, t, y=None):
        h = torch.nn.functional.conv2d(x, self.weight.to(x.dtype), padding=1)
        h = h * (1.0 + t.to(x.dtype)[:, None, None, None] / 50.0)
        if y is not None:  # a per-image label shifts the output (model_kwargs are sliced with the rows)
            h = h + 0.1 * y.to(x.dtype)[:, None, None, None]
        if not self.learned:
            return h
        prediction, v = h.chunk(2, dim=1)
        return torch.cat([prediction, torch.tanh(v)], dim=1)


@pytest.mark.parametrize("sampler,eta", STOCHASTIC)
def test_a_chunk_with_first_row_is_rows_of_the_whole_batch(one_thread, sampler, eta):
    diffusion = GaussianDiffusion(make_schedule("cosine", 40), variance_type="learned_range")
    model = _Model(learned=True)
    kw = dict(steps=6, eta=eta, seed=3, progress=False)
    whole = run_sampler(sampler, model, diffusion, (6, 2, 4, 4), **kw).sample
    part = run_sampler(sampler, model, diffusion, (3, 2, 4, 4), first_row=2, **kw).sample
    torch.testing.assert_close(part, whole[2:5], rtol=1e-5, atol=1e-5)
    same_x_T = run_sampler(sampler, model, diffusion, x_T=initial_noise((3, 2, 4, 4), 3, 2), **kw).sample
    assert (same_x_T - whole[2:5]).abs().max() > 1e-2  # the steps' noise of rows 0..2 is other images' noise


@pytest.mark.parametrize("sampler,eta", STOCHASTIC)
@pytest.mark.parametrize("learned", [False, True])
def test_sample_gives_the_same_images_for_every_batch_size(one_thread, sampler, eta, learned):
    variance = "learned_range" if learned else "fixed_small"
    diffusion = GaussianDiffusion(make_schedule("cosine", 40), variance_type=variance)
    model = _Model(learned=learned)
    n = 7
    labels = torch.arange(n) % 3
    kw = dict(n=n, steps=8, sampler=sampler, eta=eta, seed=12, diffusion=diffusion, image_shape=(2, 4, 4),
              progress=False, precision="fp32", model_kwargs={"y": labels})
    whole = diffcore.sample(model, batch_size=n, **kw)
    assert whole.shape == (n, 2, 4, 4) and whole.std() > 0.1
    for batch_size in (1, 3):
        split = diffcore.sample(model, batch_size=batch_size, **kw)
        torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
    other_seed = diffcore.sample(model, batch_size=3, **{**kw, "seed": 13})
    assert (other_seed - whole).abs().max() > 1e-2
