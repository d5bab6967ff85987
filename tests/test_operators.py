"""Degradation operators, noise models and quality metrics against explicit constructions."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

import diffcore.inverse as inv
from diffcore.inverse.base import LinearOperator

torch.set_num_threads(1)
DT = torch.float64
SHAPE = (3, 16, 16)


def _rand(*shape, seed=0, dtype=DT):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _small(task):
    """Each task on a 3x16x16 image, with kernels that fit it."""
    extra = {"deblur-gauss": {"kernel_size": 7, "sigma": 1.5}, "deblur-motion": {"kernel_size": 7, "seed": 4},
             "ct": {"n_angles": 12}}.get(task, {})
    return inv.make_operator(task, SHAPE, **extra)


def _dense(op):
    """The operator as an explicit matrix [m, n], column j = A e_j."""
    n = math.prod(op.image_shape)
    basis = torch.eye(n, dtype=DT).reshape(n, *op.image_shape)
    return op(basis).reshape(n, -1).T


# -- adjointness and differentiability -------------------------------------------------------------------------
@pytest.mark.parametrize("task", inv.TASKS)
def test_adjoint_is_the_transpose(task):
    op = _small(task)
    x = _rand(4, *op.image_shape, seed=1)
    y = _rand(4, *op.measurement_shape, seed=2)
    lhs = (op(x) * y).flatten(1).sum(1)
    rhs = (x * op.adjoint(y)).flatten(1).sum(1)
    scale = op(x).flatten(1).norm(dim=1) * y.flatten(1).norm(dim=1)
    assert torch.all((lhs - rhs).abs() <= 1e-12 * scale), (lhs - rhs).abs().max()
    # the explicit adjoint equals the vector-Jacobian product of forward
    assert torch.allclose(op.adjoint(y), LinearOperator._adjoint_map(op, y), atol=1e-12)
    assert op.transpose(y).equal(op.adjoint(y))


@pytest.mark.parametrize("padding", ["reflect", "replicate", "circular", "zeros"])
def test_blur_adjoint_every_padding(padding):
    op = inv.MotionBlur((2, 9, 11), kernel_size=9, seed=2, padding=padding)
    a = _dense(op)
    y = _rand(1, 2, 9, 11, seed=3)
    assert torch.allclose(op.adjoint(y).reshape(-1), a.T @ y.reshape(-1), atol=1e-13)


@pytest.mark.parametrize("task", ["sr4-bicubic", "deblur-motion", "ct"])
def test_forward_and_adjoint_are_differentiable(task):
    op = inv.make_operator(task, (1, 8, 8), **({"kernel_size": 5} if task == "deblur-motion" else
                                               {"n_angles": 3} if task == "ct" else {}))
    x = _rand(2, *op.image_shape, seed=4).requires_grad_(True)
    y = _rand(2, *op.measurement_shape, seed=5).requires_grad_(True)
    assert torch.autograd.gradcheck(op, (x,))
    assert torch.autograd.gradcheck(op.adjoint, (y,))
    assert torch.autograd.gradgradcheck(lambda v: op(v).pow(2).sum(), (x,))


# -- explicit constructions -------------------------------------------------------------------------------------
def test_gaussian_kernel_matches_formula():
    k, sigma = 9, 1.3
    r = np.arange(k) - 4
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    np.testing.assert_allclose(inv.gaussian_kernel(k, sigma).numpy(), g / g.sum(), rtol=1e-12)


@pytest.mark.parametrize("task", ["deblur-gauss", "deblur-motion"])
def test_blur_of_a_centred_delta_is_the_kernel(task):
    op = inv.make_operator(task, (1, 15, 15), kernel_size=9)
    delta = torch.zeros(1, 1, 15, 15, dtype=DT)
    delta[0, 0, 7, 7] = 1.0
    out = op(delta)[0, 0]
    assert torch.allclose(out[3:12, 3:12], op.kernel, atol=1e-15)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-12)
    # off-centre delta: the kernel shifted there (a true convolution, not a correlation)
    delta = torch.zeros(1, 1, 15, 15, dtype=DT)
    delta[0, 0, 5, 9] = 1.0
    assert torch.allclose(op(delta)[0, 0, 1:10, 5:14], op.kernel, atol=1e-15)


def test_blur_matches_scipy_convolution():
    op = inv.MotionBlur((1, 12, 12), kernel_size=5, seed=7, padding="reflect")
    x = _rand(1, 1, 12, 12, seed=6)
    # scipy's "mirror" is reflection without repeating the edge (torch's "reflect")
    ref = ndimage.convolve(x[0, 0].numpy(), op.kernel.numpy(), mode="mirror")
    np.testing.assert_allclose(op(x)[0, 0].numpy(), ref, atol=1e-13)


def test_motion_kernel_is_seeded_normalized_and_straight_without_shake():
    a, b = inv.motion_kernel(15, 0.5, seed=3), inv.motion_kernel(15, 0.5, seed=3)
    assert a.equal(b) and not a.equal(inv.motion_kernel(15, 0.5, seed=4))
    assert a.min() >= 0 and a.sum().item() == pytest.approx(1.0, abs=1e-12)
    line = inv.motion_kernel(15, 0.0, seed=5)
    rows, cols = torch.meshgrid(torch.arange(15.0, dtype=DT), torch.arange(15.0, dtype=DT), indexing="ij")
    pts = torch.stack([rows.flatten(), cols.flatten()], 1)
    w = line.flatten()
    centre = (w[:, None] * pts).sum(0)
    cov = ((pts - centre).T * w) @ (pts - centre)
    low, high = torch.linalg.eigvalsh(cov)
    assert high > 4.0 and low < 0.05 * high  # a long, thin (straight) streak
    assert (centre - 7.0).abs().max() < 0.5  # centred


def test_average_pool_of_constant_and_blocks():
    op = inv.make_operator("sr4", (2, 8, 12))
    assert torch.allclose(op(torch.full((1, 2, 8, 12), 0.37, dtype=DT)), torch.full((1, 2, 2, 3), 0.37, dtype=DT))
    x = _rand(3, 2, 8, 12, seed=7)
    blocks = x.numpy().reshape(3, 2, 2, 4, 3, 4).mean(axis=(3, 5))
    np.testing.assert_allclose(op(x).numpy(), blocks, atol=1e-14)


@pytest.mark.parametrize("h,w,factor", [(32, 32, 4), (28, 20, 2), (16, 24, 4)])
def test_bicubic_matches_pil_and_torch(h, w, factor):
    op = inv.BicubicDownsample((1, h, w), factor)
    x = torch.rand(1, 1, h, w, generator=torch.Generator().manual_seed(8), dtype=DT)
    pil = Image.fromarray(x[0, 0].numpy().astype(np.float32), mode="F").resize((w // factor, h // factor),
                                                                                   Image.BICUBIC)
    np.testing.assert_allclose(op(x)[0, 0].numpy(), np.asarray(pil), atol=1e-6)
    ref = F.interpolate(x, size=(h // factor, w // factor), mode="bicubic", antialias=True, align_corners=False)
    assert torch.allclose(op(x), ref, atol=1e-12)


def _disc(n, r, sub=8):
    """Anti-aliased disc image [n, n] (pixel coverage) of radius r centred in the image."""
    o = (np.arange(sub) + 0.5) / sub - 0.5
    c = np.arange(n) - (n - 1) / 2
    yy = c[:, None, None, None] + o[None, None, :, None]
    xx = c[None, :, None, None] + o[None, None, None, :]
    return torch.from_numpy(((xx**2 + yy**2) <= r * r).mean(axis=(2, 3)))


def test_radon_of_a_disc_is_the_chord_profile():
    n, r = 40, 12.3
    op = inv.RadonTransform((1, n, n), n_angles=18)
    x = _disc(n, r)[None, None]
    sino = op(x)[0, 0]
    s = torch.arange(op.n_detectors, dtype=DT) - (op.n_detectors - 1) / 2
    chord = 2.0 * torch.sqrt((r * r - s * s).clamp(min=0))
    inside = s.abs() <= r - 1.5  # away from the edge, where the pixelized disc differs from the true one
    err = (sino - chord)[:, inside].abs()
    assert err.max() < 0.35 and err.mean() < 0.1, (err.max(), err.mean())  # chord lengths up to 24.6
    # every projection integrates the image: sum over bins (unit spacing) = sum of pixels
    assert torch.allclose(sino.sum(1), x.sum().expand(18), rtol=1e-3)


def test_fbp_reconstructs_a_disc():
    n, r = 40, 12.3
    op = inv.RadonTransform((1, n, n), n_angles=120)
    x = _disc(n, r)[None, None]
    rec = op.pseudo_inverse(op(x))[0, 0]
    interior, exterior = _disc(n, r - 2.0) > 0.99, _disc(n, r + 2.0) == 0
    assert (rec[interior] - 1.0).abs().mean() < 0.01 and (rec[interior] - 1.0).abs().max() < 0.03
    assert rec[exterior].abs().max() < 0.03


# -- pseudo-inverses and masks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["inpaint-box", "inpaint-random", "outpaint"])
def test_mask_pseudo_inverse_recovers_observed_pixels(task):
    op = _small(task)
    x = _rand(2, *SHAPE, seed=9)
    rec = op.pseudo_inverse(op(x))
    m = op.mask.expand_as(x)
    assert rec[m].equal(x[m]) and (rec[~m] == 0).all()


@pytest.mark.parametrize("task", ["sr2", "sr4", "sr4-bicubic"])
def test_sr_pseudo_inverse_is_moore_penrose(task):
    op = _small(task)
    a = _dense(op)
    pinv = torch.linalg.pinv(a)
    y = _rand(2, *op.measurement_shape, seed=10)
    rec = op.pseudo_inverse(y)
    assert torch.allclose(rec.reshape(2, -1), y.reshape(2, -1) @ pinv.T, atol=1e-10)
    assert torch.allclose(op(rec), y, atol=1e-10)  # consistent with the measurement
    if task.startswith("sr") and not task.endswith("bicubic"):  # nearest up-sampling: known pixels recovered
        x = op.pseudo_inverse(y)
        assert torch.allclose(op.pseudo_inverse(op(x)), x, atol=1e-14)


@pytest.mark.parametrize("task", ["sr4-bicubic", "deblur-motion", "ct"])
def test_spectral_norm_is_the_largest_singular_value(task):
    op = _small(task)
    largest = torch.linalg.matrix_norm(_dense(op), ord=2).item()
    assert op.spectral_norm(iterations=300) == pytest.approx(largest, rel=1e-4)


def test_least_squares_matches_dense_solve():
    op = inv.GaussianBlur((1, 8, 8), kernel_size=5, sigma=1.0)
    a = _dense(op)
    y = _rand(2, 1, 8, 8, seed=11)
    lam = 1e-2
    ref = torch.linalg.solve(a.T @ a + lam * torch.eye(64, dtype=DT), a.T @ y.reshape(2, -1).T).T
    assert torch.allclose(op.least_squares(y, damping=lam, iterations=200).reshape(2, -1), ref, atol=1e-8)
    # undamped, from 0: the minimum-norm solution for a rank-deficient operator
    sr = inv.BicubicDownsample((1, 8, 8), 2)
    yy = _rand(2, 1, 4, 4, seed=12)
    assert torch.allclose(sr.least_squares(yy, damping=0.0, iterations=100), sr.pseudo_inverse(yy), atol=1e-10)


def test_mask_fractions():
    h, w = 20, 30
    box = inv.box_mask(h, w, box=(5, 8))
    assert (~box).sum() == 40 and (~box)[7:12, 11:19].all()  # centred
    moved = inv.box_mask(h, w, box=(5, 8), seed=1)
    assert (~moved).sum() == 40 and moved.equal(inv.box_mask(h, w, box=(5, 8), seed=1))
    rnd = inv.random_mask(h, w, missing=0.7, seed=3)
    assert (~rnd).sum() == 420 and rnd.equal(inv.random_mask(h, w, missing=0.7, seed=3))
    assert not rnd.equal(inv.random_mask(h, w, missing=0.7, seed=4))
    out = inv.outpaint_mask(h, w)
    assert out.sum() == 10 * 15 and out[5:15, 7:22].all()
    op = inv.make_operator("inpaint-random", (3, h, w))
    assert op.missing_fraction == pytest.approx(round(0.92 * 600) / 600)
    y = op(torch.ones(1, 3, h, w))
    assert torch.equal(y[0, 0], y[0, 2])  # the same pixels are missing in every channel


# -- argument errors --------------------------------------------------------------------------------------------
def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="task"):
        inv.make_operator("denoise", SHAPE)
    with pytest.raises(ValueError, match="kernel_size"):
        inv.make_operator("deblur-gauss", (3, 16, 16), kernel_size=21)
    with pytest.raises(ValueError, match="kernel_size"):
        inv.GaussianBlur((3, 32, 32))  # DPS's 61-pixel kernel on a small image
    with pytest.raises(ValueError, match="image_shape"):
        inv.make_operator("sr4", (3, 30, 32))
    with pytest.raises(ValueError, match="image_shape"):
        inv.make_operator("sr2", (32, 32))
    with pytest.raises(TypeError, match="sigma"):
        inv.make_operator("sr2", SHAPE, sigma=2.0)
    op = inv.make_operator("sr2", SHAPE)
    with pytest.raises(ValueError, match=r"x: expected 3 channels"):
        op(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"^x: .*16, 16"):
        op(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="^y:"):
        op.adjoint(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="missing"):
        inv.make_operator("inpaint-random", SHAPE, missing=1.5)


def test_default_blur_sizes_follow_the_image():
    assert inv.default_blur_arguments("deblur-gauss", (3, 256, 256)) == {"kernel_size": 61, "sigma": 3.0}
    assert inv.default_blur_arguments("deblur-motion", (3, 256, 256)) == {"kernel_size": 61}
    assert inv.default_blur_arguments("deblur-gauss", (1, 28, 28)) == {"kernel_size": 9, "sigma": 1.0}
    assert inv.default_blur_arguments("deblur-motion", (3, 32, 32)) == {"kernel_size": 9}


# -- noise models -----------------------------------------------------------------------------------------------
def test_gaussian_noise_mean_and_variance():
    clean = torch.linspace(-1, 1, 5, dtype=DT).repeat(40000, 1)
    noisy = inv.GaussianNoise(0.05)(clean, seed=0)
    n = clean.shape[0]
    assert ((noisy - clean).mean(0).abs() < 4 * 0.05 / math.sqrt(n)).all()
    assert torch.allclose((noisy - clean).var(0), torch.full((5,), 0.05**2, dtype=DT), rtol=0.04)
    assert noisy.equal(inv.GaussianNoise(0.05)(clean, seed=0))
    assert not noisy.equal(inv.GaussianNoise(0.05)(clean, seed=1))


def test_poisson_noise_mean_and_variance():
    noise = inv.PoissonNoise(rate=50.0, low=-1.0, high=1.0)
    z = torch.tensor([-0.9, -0.2, 0.4, 1.0], dtype=DT)
    clean = z.repeat(40000, 1)
    noisy = noise(clean, seed=0)
    var = 2.0 * (z + 1.0) / 50.0
    n = clean.shape[0]
    assert ((noisy.mean(0) - z).abs() < 4 * torch.sqrt(var / n)).all()
    assert torch.allclose(noisy.var(0), var, rtol=0.05)
    counts = (noisy + 1.0) / 2.0 * 50.0
    assert torch.allclose(counts, counts.round(), atol=1e-9)  # integer photon counts
    assert noisy.equal(noise(clean, seed=0))
    # the weighted (Algorithm 2) residual norm, written out
    y, pred = noisy[:2], clean[:2]
    k = ((y + 1.0) / 2.0 * 50.0).clamp(min=1.0)
    ref = torch.sqrt(((25.0 * (y - pred)) ** 2 / (2.0 * k)).sum(1))
    assert torch.allclose(noise.residual_norm(y, pred), ref, rtol=1e-12)


# -- quality ----------------------------------------------------------------------------------------------------
def test_psnr_of_known_mse_and_range_invariance():
    x = torch.zeros(2, 3, 8, 8, dtype=DT)
    y = x.clone()
    y[0] += 0.1
    y[1, :, ::2] += 0.2  # mse = 0.02
    expected = torch.tensor([10 * math.log10(4 / 0.01), 10 * math.log10(4 / 0.02)], dtype=DT)
    assert torch.allclose(inv.psnr(y, x), expected, atol=1e-10)
    assert torch.allclose(inv.psnr((y + 1) / 2, (x + 1) / 2, value_range=(0.0, 1.0)), expected, atol=1e-10)
    assert inv.psnr(x, x)[0] == math.inf


def _ssim_scipy(a, b, span):
    """Wang et al. SSIM with scipy's Gaussian filter (sigma 1.5, 11 taps) and the valid region."""
    c1, c2 = (0.01 * span) ** 2, (0.03 * span) ** 2
    scores = []
    for ch in range(a.shape[0]):
        def f(z):
            return ndimage.gaussian_filter(z, 1.5, truncate=3.5, mode="constant")[5:-5, 5:-5]
        x, y = a[ch], b[ch]
        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
        scores.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return np.mean(scores)


def test_ssim_matches_an_independent_implementation():
    x = torch.rand(3, 2, 20, 24, generator=torch.Generator().manual_seed(13), dtype=DT) * 2 - 1
    y = (x + 0.3 * _rand(3, 2, 20, 24, seed=14)).clamp(-1, 1)
    ours = inv.ssim(y, x)
    for i in range(3):
        # the standard convention: intensities from 0, here [0, 1] with L = 1
        ref = _ssim_scipy((y[i].numpy() + 1) / 2, (x[i].numpy() + 1) / 2, 1.0)
        assert ours[i].item() == pytest.approx(ref, abs=1e-10)
    assert torch.allclose(inv.ssim(x, x), torch.ones(3, dtype=DT), atol=1e-12)
    assert torch.allclose(inv.ssim((y + 1) / 2, (x + 1) / 2, value_range=(0.0, 1.0)), ours, atol=1e-12)
    assert (ours < 0.9).all()
    with pytest.raises(ValueError, match="11x11"):
        inv.ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))
