"""``diffcore restore``: the written files checked against explicit constructions and the library, seeds, errors;
and an end-to-end restoration with the packaged model (skipped when it is not installed)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffcore import cli
from diffcore.inverse import make_operator, ssim
from diffcore.images import load_image
from diffcore.pipelines.restore import restoration_metrics, restore
from diffcore.train import load_trained_model
from helpers import run_cli, tiny_checkpoint

TASKS = ["inpaint-box", "inpaint-random", "outpaint", "sr4", "deblur-gauss", "deblur-motion", "ct"]
SIZE = 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", SIZE)


@pytest.fixture(scope="module")
def clean_png(tmp_path_factory):
    """A 16x16 grayscale PNG: a bright square and a ring on black (Fashion-MNIST-like contrast)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    pixels = np.zeros((SIZE, SIZE), dtype=np.uint8)
    pixels[3:9, 4:12] = 200
    pixels[(np.hypot(yy - 11, xx - 9) < 4) & (np.hypot(yy - 11, xx - 9) > 2)] = 150
    path = tmp_path_factory.mktemp("img") / "clean.png"
    Image.fromarray(pixels).save(path)
    return path


def restore_cli(capsys, ckpt, image, out, task, *extra):
    return run_cli(capsys, "restore", "--checkpoint", ckpt, "--task", task, "--input", image, "--out", out,
               "--steps", 4, "--no-progress", *extra)


def png(path) -> np.ndarray:
    with Image.open(path) as picture:
        return np.asarray(picture).astype(np.float64)


def to_unit(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels / 127.5 - 1.0)[None, None]


def psnr_numpy(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two 8-bit images, in dB (independent of diffcore.inverse.psnr)."""
    return float(10 * np.log10(255.0**2 / np.mean((a - b) ** 2)))


@pytest.mark.parametrize("task", TASKS)
def test_restore_writes_consistent_files(task, ckpt, clean_png, tmp_path, capsys):
    code, out, err = restore_cli(capsys, ckpt, clean_png, tmp_path, task)
    assert code == 0, err
    assert "PSNR" in out and "restored" in out
    report = json.loads((tmp_path / "metrics.json").read_text())
    clean = png(clean_png)
    restored, baseline, degraded = (png(tmp_path / f"{n}.png") for n in ("restored", "baseline", "degraded"))
    assert restored.shape == baseline.shape == (SIZE, SIZE)
    assert report["task"] == task and report["steps"] == 4 and report["seed"] == 0
    assert not list(tmp_path.glob(".*")), "temporary files left behind"
    # the metrics are those of the written images, up to 8-bit quantization
    for name, image in (("restored", restored), ("baseline", baseline), ("degraded", degraded)):
        scores = report["metrics"][name]
        if name == "degraded" and task == "ct":
            assert scores is None and not report["degraded_comparable"]
            continue
        assert scores["psnr"] == pytest.approx(psnr_numpy(image, clean), abs=0.05)
        assert scores["ssim"] == pytest.approx(float(ssim(to_unit(image), to_unit(clean))[0]), abs=5e-3)
    # the degraded picture is an explicit construction from x and the seeded noise (drawn on the CPU in float64)
    x = to_unit(clean)
    noise = 0.05 * torch.randn((1, 1, SIZE, SIZE), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if task in ("inpaint-box", "outpaint", "inpaint-random"):
        mask = make_operator(task, (1, SIZE, SIZE)).mask.double()
        if task == "inpaint-box":  # the centred half-size box is missing
            assert mask[0, 0, 4:12, 4:12].sum() == 0 and mask.sum() == SIZE * SIZE - 64
        expected = mask * (x + noise)
        assert report["baseline"] == "naive-inpainting"
    elif task == "sr4":
        low = x.reshape(1, 1, 4, 4, 4, 4).mean(dim=(3, 5))
        low = low + 0.05 * torch.randn((1, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        expected = low.repeat_interleave(4, -2).repeat_interleave(4, -1)  # blocks of 4x4
        assert report["baseline"] == "nearest-upsampling"
        np.testing.assert_array_equal(baseline, degraded)  # nearest up-sampling is the pseudo-inverse
    elif task == "ct":
        assert degraded.shape == (60, 24)  # 60 views, ceil(16 sqrt 2) = 23 bins rounded to the parity of 16
        assert degraded.min() == 0 and degraded.max() == 255  # min-max scaled sinogram
        assert report["baseline"] == "filtered-back-projection"
        assert report["operator_norm"] > 10 and report["step_size"] == pytest.approx(1.0 / report["operator_norm"])
        return
    else:
        expected = make_operator(task, (1, SIZE, SIZE))(x) + noise
        assert report["baseline"] == "damped-least-squares"
    expected_u8 = ((expected.clamp(-1, 1) + 1) * 127.5).round()[0, 0].numpy()
    np.testing.assert_allclose(degraded, expected_u8, atol=1)


def test_restore_matches_the_library_and_seeds_reproduce(ckpt, clean_png, tmp_path, capsys):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        code, _, err = restore_cli(capsys, ckpt, clean_png, tmp_path / name, "sr4", "--seed", seed, "--zeta", 2)
        assert code == 0, err
    for file in ("degraded.png", "restored.png", "baseline.png", "metrics.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    assert not np.array_equal(png(tmp_path / "a" / "restored.png"), png(tmp_path / "c" / "restored.png"))
    assert not np.array_equal(png(tmp_path / "a" / "degraded.png"), png(tmp_path / "c" / "degraded.png"))
    trained = load_trained_model(ckpt)
    x = load_image(clean_png, trained.image_shape)
    result = restore(trained.model, trained.diffusion, x, "sr4", steps=4, zeta=2.0, seed=3, progress=False)
    expected = ((result.restored + 1) * 127.5).round()[0, 0].numpy()
    np.testing.assert_allclose(png(tmp_path / "a" / "restored.png"), expected, atol=1)
    report = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert report["metrics"]["restored"]["psnr"] == pytest.approx(restoration_metrics(result)["restored"]["psnr"][0])
    assert report["zeta"] == 2.0 and report["step_size"] == pytest.approx(2.0 * 4)  # ||A|| = 1/4 for sr4


def test_restore_inputs_options_and_poisson(ckpt, clean_png, tmp_path, capsys):
    clean = png(clean_png)
    # an RGB PNG is converted to the model's single channel by ITU-R 601 luma (grey pixels: exactly)
    Image.fromarray(np.repeat(clean.astype(np.uint8)[:, :, None], 3, axis=2)).save(tmp_path / "rgb.png")
    torch.testing.assert_close(load_image(tmp_path / "rgb.png", (1, SIZE, SIZE)), to_unit(clean).float(),
                               atol=1e-6, rtol=0)
    # .npy in [H, W, C] uint8 and [C, H, W] float, and a 3-channel model input from a grey image
    np.save(tmp_path / "hwc.npy", clean.astype(np.uint8)[:, :, None])
    torch.testing.assert_close(load_image(tmp_path / "hwc.npy", (1, SIZE, SIZE)), to_unit(clean).float())
    np.save(tmp_path / "chw.npy", (clean / 127.5 - 1.0)[None].astype(np.float32))
    assert load_image(tmp_path / "chw.npy", (3, SIZE, SIZE)).shape == (1, 3, SIZE, SIZE)
    # --resize: a 32x32 image becomes 16x16; without it, an error (below)
    Image.fromarray(np.kron(clean, np.ones((2, 2))).astype(np.uint8)).save(tmp_path / "big.png")
    code, _, err = restore_cli(capsys, ckpt, tmp_path / "big.png", tmp_path / "r", "inpaint-box", "--resize")
    assert code == 0, err
    assert png(tmp_path / "r" / "restored.png").shape == (SIZE, SIZE)
    # Poisson noise with options: a 7-pixel motion kernel and 30 CT views
    code, _, err = restore_cli(capsys, ckpt, clean_png, tmp_path / "p", "deblur-motion", "--noise", "poisson",
                               "--photon-rate", 50, "--kernel-size", 7, "--sampler", "ddim", "--eta", 0.5)
    assert code == 0, err
    report = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert report["noise"] == {"kind": "poisson", "photon_rate": 50.0, "low": pytest.approx(-1.0),
                               "high": pytest.approx(1.0)}  # max(A 1) = 1: the motion kernel sums to 1
    assert report["operator_kwargs"] == {"kernel_size": 7} and report["sampler"] == "ddim"
    code, _, err = restore_cli(capsys, ckpt, clean_png, tmp_path / "c", "ct", "--n-angles", 30)
    assert code == 0, err
    assert png(tmp_path / "c" / "degraded.png").shape == (30, 24)


def test_restore_errors_are_one_line(ckpt, clean_png, tmp_path, capsys):
    np.save(tmp_path / "two.npy", np.zeros((2, SIZE, SIZE), dtype=np.uint8))
    np.save(tmp_path / "rgba.npy", np.zeros((SIZE, SIZE, 4), dtype=np.uint8))
    np.save(tmp_path / "wide.npy", np.zeros((SIZE, 20), dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "file").write_text("")
    base = {"--checkpoint": ckpt, "--task": "sr4", "--input": clean_png, "--out": tmp_path / "o", "--steps": 3}
    cases = [  # (flags replacing or adding to base, what the message says)
        ({"--task": "denoise"}, "--task: expected one of inpaint-box"),
        ({"--input": tmp_path / "missing.png"}, "--input: no such file"),
        ({"--input": tmp_path / "wide.npy"}, "the image is 16x20 pixels (HxW) but the model takes 16x16; pass "
                                             "--resize"),
        ({"--input": tmp_path}, "is a folder; expected one image file"),
        ({"--input": tmp_path / "two.npy"}, "expected 1 (grayscale) or 3 (RGB) channels"),
        ({"--input": tmp_path / "rgba.npy"}, "expected 1 (grayscale) or 3 (RGB) channels"),
        ({"--input": tmp_path / "notes.txt"}, "expected a .png"),
        ({"--task": "deblur-gauss", "--kernel-size": 31}, "--kernel-size: the 31x31 kernel is larger than the 16x16"),
        ({"--task": "deblur-gauss", "--kernel-size": 4}, "--kernel-size: expected an odd size"),
        ({"--kernel-size": 5}, "--kernel-size: applies to deblur-gauss and deblur-motion"),
        ({"--steps": 1}, "--steps: expected 2..20"),
        ({"--steps": 21}, "--steps: expected 2..20"),
        ({"--noise": "poisson", "--sigma-y": 0.1}, "--sigma-y: applies to --noise gaussian"),
        ({"--zeta": -1}, "--zeta: expected a finite value >= 0"),
            ({"--zeta": "inf"}, "--zeta: expected a finite value >= 0"),
        ({"--eta": 0.5}, "--eta: applies to --sampler ddim"),
        ({"--out": tmp_path / "file"}, "--out: "),
        ({"--checkpoint": tmp_path / "nothing"}, "--checkpoint: no such file or folder"),
    ]
    for changes, needle in cases:
        argv = [str(a) for pair in {**base, **changes}.items() for a in pair] + ["--no-progress"]
        code, _, err = run_cli(capsys, "restore", *argv)
        assert code == 2, (changes, err)
        assert err.startswith("diffcore restore: error: ") and err.count("\n") == 1, err
        assert needle in err, (needle, err)
    assert not (tmp_path / "o").exists()  # nothing written on errors


def test_restore_help_and_missing_packaged_model(tmp_path, clean_png, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["restore", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--task", "--input", "--out", "--sigma-y", "--noise", "--steps", "--sampler", "--zeta", "--seed",
                 "--device", "--resize", "--checkpoint"):
        assert flag in text
    from diffcore.pretrained import default_model_path

    if (default_model_path() / "manifest.json").is_file():
        pytest.skip("the packaged model is installed; its absence cannot be tested")
    code, _, err = run_cli(capsys, "restore", "--task", "sr4", "--input", clean_png, "--out", tmp_path / "o")
    assert code == 2 and "packaged default model is missing" in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------------------ packaged model
def _packaged_and_data():
    from diffcore.data import load_fashion_mnist
    from diffcore.pretrained import default_model_path, load_default

    if not (default_model_path() / "manifest.json").is_file():
        pytest.skip(f"the packaged model is not installed ({default_model_path()} is missing; "
                    f"scripts/train_default_model.sh makes it)")
    try:
        images, _ = load_fashion_mnist("test")
    except FileNotFoundError as error:
        pytest.skip(f"Fashion-MNIST test images not available: {error}")
    return load_default(), images


@pytest.mark.slow
def test_packaged_model_beats_the_degraded_input_on_every_task():
    """100 DDPM steps, default zeta, two Fashion-MNIST test images per task: DPS's mean PSNR beats the degraded
    input's (the baseline's for CT, whose sinogram is not comparable). About 35 s on one core."""
    trained, images = _packaged_and_data()
    x = images[:2, None].float() / 127.5 - 1.0
    failures = []
    for task in TASKS:
        result = restore(trained.model, trained.diffusion, x, task, steps=100, seed=0, progress=False)
        scores = restoration_metrics(result)
        target = scores["degraded"] if result.degraded_comparable else scores["baseline"]
        ours, theirs = np.mean(scores["restored"]["psnr"]), np.mean(target["psnr"])
        if not ours > theirs:
            failures.append(f"{task}: DPS {ours:.2f} dB <= {theirs:.2f} dB")
    assert not failures, failures
