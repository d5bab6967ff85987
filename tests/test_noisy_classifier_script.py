"""``scripts/train_noisy_classifier.py``: trains a noisy classifier under a diffusion model's schedule and writes a
checkpoint that ``diffcore sample --classifier`` accepts.

Tiny sizes on diffcore's synthetic shapes (4 classes, 16x16) and a tiny diffusion checkpoint (T = 20): the checkpoint
carries the model's abar table, the printed held-out accuracies equal an accuracy computed here with the noising
written out by hand, the classifier beats chance on clean images, and bad output folders are refused before any
work.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from diffcore.data import synthetic_images
from diffcore.guidance import check_classifier_fits, load_classifier
from diffcore.guidance.noisy_classifier import noisy_accuracy
from diffcore.train import load_trained_model
from helpers import run_cli, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_noisy_classifier.py"
TINY = ["--data", "synthetic", "--steps", "80", "--batch-size", "32", "--width", "8", "--channel-mult", "1", "2",
        "--lr", "3e-3", "--eval-n", "256", "--threads", "1", "--no-progress"]


def script_main(argv):
    spec = importlib.util.spec_from_file_location("train_noisy_classifier_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("noisy_classifier_script")
    model = tiny_checkpoint(root / "model", image_size=16, num_timesteps=20)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = script_main(["--model", model, "--out", root / "clf", *TINY])
    return {"root": root, "model": model, "clf": root / "clf", "code": code, "stdout": out.getvalue()}


def printed_accuracy(stdout: str) -> dict[int, float]:
    line = next(line for line in stdout.splitlines() if line.startswith("held-out accuracy"))
    return {int(t): float(a) for t, a in re.findall(r"t = (\d+): ([0-9.]+)", line)}


def test_script_writes_a_classifier_of_the_models_schedule(trained):
    assert trained["code"] == 0, trained["stdout"]
    loaded = load_classifier(trained["clf"])
    diffusion = load_trained_model(trained["model"]).diffusion
    assert torch.equal(loaded.alphas_cumprod, diffusion.alphas_cumprod.cpu())
    assert loaded.image_shape == (1, 16, 16) and loaded.num_classes == 4 and loaded.step == 80
    check_classifier_fits(loaded, diffusion, (1, 16, 16))  # raises on a mismatch


def test_sample_accepts_the_written_classifier(trained, capsys):
    out = trained["root"] / "guided.npz"
    code, stdout, stderr = run_cli(capsys, "sample", "--model", trained["model"], "--classifier", trained["clf"],
                                   "--class", 2, "--classifier-scale", 3, "--n", 4, "--steps", 3, "--format", "npz",
                                   "--out", out, "--no-progress")
    assert code == 0, stderr
    with np.load(out) as archive:
        assert archive["arr_0"].shape == (4, 16, 16, 1) and archive["arr_1"].tolist() == [2, 2, 2, 2]


def test_printed_accuracy_matches_a_hand_computation(trained):
    """The held-out accuracies at t = 0, T/2, T-1 against x_t = sqrt(abar) x0 + sqrt(1 - abar) noise in float64,
    with the noise of noisy_accuracy's documented draw (one chunk of 256 from a CPU generator seeded 0)."""
    printed = printed_accuracy(trained["stdout"])
    assert sorted(printed) == [0, 10, 19]
    loaded = load_classifier(trained["clf"])
    pixels, labels = synthetic_images(256, 16, 1, seed=1)  # the synthetic set's "test" split
    x0 = pixels.double() / 127.5 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32).double()
    for t, value in printed.items():
        abar = loaded.alphas_cumprod[t]
        x_t = (abar.sqrt() * x0 + (1 - abar).sqrt() * noise).float()
        logits = loaded.classifier(x_t, torch.full((256,), t, dtype=torch.int64))
        expected = float((logits.argmax(1) == labels).double().mean())
        assert abs(value - expected) <= 1 / 256 + 5e-4, (t, value, expected)


def test_classifier_learned_the_classes(trained):
    """On clean images (t = 0) the trained classifier beats chance (1/4) by far (0.4 is 5.5 binomial standard
    deviations above it at 256 images); at t = T-1 (abar ~ 0) the images hold almost no signal."""
    printed = printed_accuracy(trained["stdout"])
    assert printed[0] >= 0.4, trained["stdout"]
    assert printed[0] > printed[19]


def test_noisy_accuracy_names_bad_arguments():
    loaded_like = torch.nn.Conv2d(1, 1, 1)
    images, labels = torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64)
    abar = torch.linspace(0.99, 0.01, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="timesteps: expected .* in \\[0, 5\\)"):
        noisy_accuracy(loaded_like, images, labels, abar, [5])
    with pytest.raises(ValueError, match="labels: expected int64 \\[2\\]"):
        noisy_accuracy(loaded_like, images, labels[:1], abar, [0])
    with pytest.raises(TypeError, match="alphas_cumprod"):
        noisy_accuracy(loaded_like, images, labels, abar.float(), [0])


@pytest.mark.parametrize("case", ["foreign folder", "empty folder", "existing checkpoint"])
def test_script_refuses_an_occupied_out_before_training(trained, tmp_path, capsys, case):
    if case != "existing checkpoint":
        out = tmp_path / "mine"
        out.mkdir()
        if case == "foreign folder":
            (out / "notes.txt").write_text("keep me")
        before = {p.name: p.read_bytes() for p in out.iterdir()}
    else:
        out = trained["clf"]
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    code = script_main(["--model", trained["model"], "--out", out, *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "--out" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
