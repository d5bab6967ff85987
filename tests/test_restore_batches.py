"""Restoration in batches: ``first_row`` in DPS and the naive inpainting baseline, ``batch_size`` in ``restore`` and
``--batch-size`` on ``diffcore restore``. A set of images restored k at a time (each batch with first_row = its first
row's index) gives what one call on the whole set gives: the same measurement, restorations, baselines and residual
norms. The reference is always dps_sample / naive_inpaint_sample called once on all the images.

Tolerances. In float64 (the tiny U-Net and y cast to float64) a split run equals the whole run to 1e-10 (measured
<= 1e-11): the split changes nothing but the batching of the model's arithmetic. ``restore`` runs in float32, where
the U-Net's output for an image differs between batch sizes by float32 rounding (measured 8e-7, another blocking of
the convolutions), and the first steps amplify that: x_T ~ N(0, 1) at abar near 0 is divided by sqrt(abar), and
DPS's guidance gradient grad ||r|| of this random (rough) U-Net magnifies it further (measured 1.9e-3 after DPS's
first step, decaying to 3e-5..8e-5 at the end, six steps); so the float32 bound is 5e-4 on images in [-1, 1] (1/16 of
an 8-bit grey level), far below what another image's noise changes (checked: > 1e-2).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from diffcore.data import synthetic_images
from diffcore.inverse import dps_sample, make_operator, naive_inpaint_sample
from diffcore.pipelines.restore import make_measurement_noise, restore
from diffcore.reference.philox import MAX_IMAGES
from diffcore.train import load_trained_model
from helpers import run_cli, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

N, SIZE, STEPS, SEED = 5, 8, 6, 7
CLOSE32 = dict(rtol=0.0, atol=5e-4)  #: float32 restore, split vs whole (see the module docstring)
CLOSE64 = dict(rtol=0.0, atol=1e-10)  #: float64, split vs whole


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("batches") / "ckpt", SIZE, num_timesteps=20)


@pytest.fixture(scope="module")
def trained(ckpt):
    return load_trained_model(ckpt)


def clean_images(n: int = N) -> torch.Tensor:
    return synthetic_images(n, SIZE, 1, seed=5)[0].float() / 127.5 - 1.0  # [n, 1, 8, 8] in [-1, 1]


@pytest.fixture(scope="module")
def model64(trained):
    return copy.deepcopy(trained.model).double()


def whole_set(trained, task, sampler="ddpm", eta=0.0, model=None):
    """Measurement, DPS and baseline of all N images in one call each, built here from the pieces (not restore);
    ``model`` (default the trained one) in float64 runs everything in float64 (y cast)."""
    model = trained.model if model is None else model
    dtype = next(model.parameters()).dtype
    x = clean_images()
    operator = make_operator(task, (1, SIZE, SIZE))
    noise = make_measurement_noise(operator, "gaussian", sigma_y=0.05)
    clean = operator(x.double())
    y = clean + 0.05 * torch.randn(clean.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(SEED))
    y = y.float().to(dtype)
    process = trained.diffusion.respaced(STEPS, "even")
    loop = dict(sampler=sampler, eta=eta, clip_denoised=True, seed=SEED, progress=False)
    dps = dps_sample(model, process, operator, y, zeta=1.0 / operator.spectral_norm(), noise_model=noise, **loop)
    naive = naive_inpaint_sample(model, process, operator, y, **loop) if task == "inpaint-box" else None
    return y, dps, naive, (process, operator, noise, loop)


@pytest.mark.parametrize("task,sampler,eta", [("inpaint-box", "ddpm", 0.0), ("sr2", "ddim", 0.5)])
def test_restore_gives_the_same_restorations_for_every_batch_size(trained, task, sampler, eta):
    y, dps, naive, _ = whole_set(trained, task, sampler, eta)
    x = clean_images()
    results = {k: restore(trained.model, trained.diffusion, x, task, steps=STEPS, sampler=sampler, eta=eta,
                          seed=SEED, progress=False, precision="fp32", batch_size=k) for k in (1, 2, 5)}
    for k, result in results.items():
        assert result.settings["batch_size"] == k
        assert torch.equal(result.measurement, y)  # drawn once on the CPU, before the split
        assert result.restored.shape == (N, 1, SIZE, SIZE) and result.residual_norms.shape == (STEPS, N)
        torch.testing.assert_close(result.restored, dps.sample.clamp(-1, 1), **CLOSE32)
        torch.testing.assert_close(result.residual_norms, dps.residual_norms, **CLOSE32)
        if naive is not None:
            assert result.baseline_name == "naive-inpainting"
            torch.testing.assert_close(result.baseline, naive.clamp(-1, 1), **CLOSE32)
    assert float(dps.sample.std()) > 0.1 and float((dps.sample[1:] - dps.sample[:-1]).abs().max()) > 1e-2
    default = restore(trained.model, trained.diffusion, x, task, steps=STEPS, sampler=sampler, eta=eta, seed=SEED,
                      progress=False, precision="fp32")
    assert default.settings["batch_size"] == N  # default_batch_size: min(n, 64) on a CPU
    assert torch.equal(default.restored, results[5].restored)


@pytest.mark.parametrize("task", ["inpaint-box", "sr2"])
def test_a_batch_with_first_row_is_rows_of_the_whole_set(trained, model64, task):
    sampler, eta = ("ddim", 0.5) if task == "sr2" else ("ddpm", 0.0)
    y, dps, naive, (process, operator, noise, loop) = whole_set(trained, task, sampler, eta, model=model64)
    rows, zeta = slice(2, 5), 1.0 / operator.spectral_norm()
    part = dps_sample(model64, process, operator, y[rows], zeta=zeta, noise_model=noise, first_row=2, **loop)
    torch.testing.assert_close(part.sample, dps.sample[rows], **CLOSE64)
    torch.testing.assert_close(part.residual_norms, dps.residual_norms[:, rows], **CLOSE64)
    shifted = dps_sample(model64, process, operator, y[rows], zeta=zeta, noise_model=noise, **loop)
    assert float((shifted.sample - dps.sample[rows]).abs().max()) > 1e-2  # first_row 0: images 0..2's noise
    if naive is not None:
        torch.testing.assert_close(naive_inpaint_sample(model64, process, operator, y[rows], first_row=2,
                                                        **loop), naive[rows], **CLOSE64)
        shifted = naive_inpaint_sample(model64, process, operator, y[rows], **loop)
        assert float((shifted - naive[rows]).abs().max()) > 1e-2


def test_naive_baseline_replacement_noise_follows_first_row(trained, model64):
    """With x_T given and the step noise of DDIM eta = 0 absent, the only noise left is the replacement's (offset
    1 + S + k): a batch given rows 2..4 of x_T and first_row=2 equals those rows of the whole call."""
    y, _, _, (process, operator, _, loop) = whole_set(trained, "inpaint-box", model=model64)
    x_T = torch.randn((N, 1, SIZE, SIZE), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    det = {**loop, "sampler": "ddim", "eta": 0.0}
    whole = naive_inpaint_sample(model64, process, operator, y, x_T=x_T, **det)
    part = naive_inpaint_sample(model64, process, operator, y[2:], x_T=x_T[2:], first_row=2, **det)
    torch.testing.assert_close(part, whole[2:], **CLOSE64)
    other = naive_inpaint_sample(model64, process, operator, y[2:], x_T=x_T[2:], **det)
    assert float((other - whole[2:]).abs().max()) > 1e-2


def test_first_row_and_batch_size_errors_are_named(trained):
    y, _, _, (process, operator, noise, loop) = whole_set(trained, "inpaint-box")
    for call in (lambda r: dps_sample(trained.model, process, operator, y[:2], first_row=r, **loop),
                 lambda r: naive_inpaint_sample(trained.model, process, operator, y[:2], first_row=r, **loop)):
        for bad, kind in [(-1, ValueError), (True, TypeError), (1.5, TypeError), ("0", TypeError),
                          (MAX_IMAGES - 1, ValueError)]:
            with pytest.raises(kind, match="^first_row: expected an int"):
                call(bad)
        call(MAX_IMAGES - 2)  # the last two images of the seed's numbering are fine
    x = clean_images(2)
    for bad in (0, -3, True, 1.5):
        with pytest.raises(ValueError, match="^batch_size: expected an int >= 1"):
            restore(trained.model, trained.diffusion, x, "sr2", steps=2, progress=False, batch_size=bad)


def test_cli_restore_takes_batch_size(tmp_path, capsys, monkeypatch):
    """--batch-size reaches restore (the command restores one image, so it runs as one batch of 1); bad values are
    one-line usage errors before anything is written."""
    import diffcore.cli.restore as restore_cli
    from PIL import Image

    ckpt = tiny_checkpoint(tmp_path / "ckpt", 16, num_timesteps=20)  # SSIM needs 11x11 pixels at least
    image = tmp_path / "clean.png"
    Image.fromarray((synthetic_images(1, 16, 1, seed=5)[0][0, 0]).numpy()).save(image)
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["batch_size"])
        return restore(*args, **kwargs)

    monkeypatch.setattr(restore_cli, "restore", spy)
    base = ["restore", "--checkpoint", ckpt, "--task", "inpaint-box", "--input", image, "--steps", 3,
            "--no-progress"]
    for out, extra in (("a", ["--batch-size", 3]), ("b", [])):
        code, _, err = run_cli(capsys, *base, "--out", tmp_path / out, *extra)
        assert code == 0, err
    assert seen == [3, None]
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in "ab")
    assert a["batch_size"] == b["batch_size"] == 1  # the batch size used: one image
    assert (tmp_path / "a" / "restored.png").read_bytes() == (tmp_path / "b" / "restored.png").read_bytes()
    for bad in (0, -2):
        code, _, err = run_cli(capsys, *base, "--out", tmp_path / "c", "--batch-size", bad)
        assert code == 2 and err.startswith("diffcore restore: error: --batch-size: expected >= 1"), err
        assert err.count("\n") == 1
    assert not (tmp_path / "c").exists() and seen == [3, None]
