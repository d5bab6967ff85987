"""``diffcore eval``: the JSON it writes checked against the metrics, samplers and bound computed directly."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from diffcore.data import ImageDataset, synthetic_images
from diffcore.pipelines.evaluate import to_classifier_input
from diffcore.metrics import extract_features, real_floor, score_samples
from diffcore.pipelines.sample import sample
from diffcore.train import load_trained_model

from helpers import run_cli, tiny_checkpoint

N_REAL = 30


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    ckpt = tiny_checkpoint(root / "ckpt", 28, num_timesteps=10)
    real = synthetic_images(N_REAL, 28, 1, seed=5)[0]  # uint8 [30, 1, 28, 28]
    np.save(root / "real.npy", real[:, 0].numpy())
    return ckpt, root / "real.npy", real


def test_eval_writes_consistent_json(setup, tmp_path, capsys):
    ckpt, real_path, real = setup
    code, out, err = run_cli(capsys, "eval", "--checkpoint", ckpt, "--n", 6, "--steps", 2, "--batch-size", 4,
                         "--bpd-batches", 1, "--bpd-batch-size", 3, "--seed", 1, "--real", real_path,
                         "--out", tmp_path / "m.json", "--no-progress")
    assert code == 0, err
    assert "real floor" in out and "bits/dim" in out and "FID" in out
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["num_samples"] == 6 and report["settings"]["sampler"] == "ddim"
    assert "within this project only" in report["note"]
    for group in ("metrics", "floor"):
        assert set(report[group]) == {"fid", "kid_mean", "kid_std", "precision", "recall"}
        assert all(math.isfinite(v) for v in report[group].values())
        assert report[group]["fid"] >= 0 and 0 <= report[group]["precision"] <= 1
    # the samples are diffcore.sample's, batch k with seed 1 + k; scored as diffcore.metrics.score_samples does
    trained = load_trained_model(ckpt)
    images = torch.cat([sample(trained.model, n=count, steps=2, seed=1 + k, diffusion=trained.diffusion,
                               sampler="ddim", image_shape=trained.image_shape, progress=False)
                        for k, count in enumerate((4, 2))])
    direct = score_samples(images, real, with_floor=True, seed=1)
    assert report["metrics"]["fid"] == pytest.approx(direct.fid, rel=1e-6)
    assert report["metrics"]["kid_mean"] == pytest.approx(direct.kid_mean, rel=1e-6, abs=1e-12)
    # the floor depends on the real images only: two disjoint halves of 6, scored against each other
    floor = real_floor(extract_features(real), 6, seed=1)
    assert report["floor"]["fid"] == pytest.approx(floor.fid, rel=1e-6)
    assert report["floor"]["recall"] == pytest.approx(floor.recall)
    # bits/dim: the bound of 3 images drawn by Generator(1), x_t noise from a torch generator seeded 1
    bpd = report["bpd"]
    order = np.random.default_rng(1).permutation(N_REAL)[:3]
    x0 = real[order].float() / 127.5 - 1.0
    expected = trained.diffusion.calc_bpd_loop(trained.model, x0, generator=torch.Generator().manual_seed(1))
    assert bpd["bpd"] == pytest.approx(float(expected.total_bpd.mean()), rel=1e-5)
    assert bpd["decoder_bpd"] == pytest.approx(float(expected.decoder_bpd.mean()), rel=1e-5)
    assert bpd["num_images"] == 3 and bpd["bpd"] > 0 and math.isfinite(bpd["bpd_sem"])
    assert not list(tmp_path.glob(".*")), "temporary files left behind"


def test_eval_ancestral_and_padded_models(setup, tmp_path, capsys):
    ckpt, real_path, _ = setup
    code, _, err = run_cli(capsys, "eval", "--checkpoint", ckpt, "--n", 4, "--steps", 3, "--sampler", "ddpm",
                       "--real", real_path, "--out", tmp_path / "a.json", "--no-progress")
    assert code == 0, err
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["bpd"] is None and report["settings"]["eta"] is None and report["settings"]["steps"] == 3
    # a model trained with pad_to=32 is scored on the centred 28x28 crop, which undoes ImageDataset's padding
    real = synthetic_images(3, 28, 1, seed=0)[0]
    padded, _ = ImageDataset(real, pad_to=32).batch(torch.arange(3))
    plain, _ = ImageDataset(real).batch(torch.arange(3))
    assert torch.equal(to_classifier_input(padded), plain)


def test_eval_errors_are_one_line(setup, tmp_path, capsys):
    ckpt, real_path, _ = setup
    small = tiny_checkpoint(tmp_path / "small", 16, num_timesteps=10)
    base = {"--checkpoint": ckpt, "--n": 4, "--steps": 2, "--real": real_path, "--out": tmp_path / "m.json"}
    cases = [
        ({"--n": 16}, "--n: the real-against-real floor needs 2n = 32 real images"),
        ({"--n": 0}, "--n: expected >= 1"),
        ({"--checkpoint": small}, "compares with 1x28x28 Fashion-MNIST images"),
        ({"--sampler": "ddpm", "--eta": 0.5}, "--eta: applies to --sampler ddim"),
        ({"--steps": 11}, "--steps: expected 1..10"),
        ({"--real": tmp_path / "none.npy"}, "not found"),
        ({"--bpd-batches": 4, "--bpd-batch-size": 8}, "--bpd-batches: 4 x 8 images exceed the 30 real images"),
        ({"--out": tmp_path}, "is a folder"),
    ]
    for changes, needle in cases:
        argv = [str(a) for pair in {**base, **changes}.items() for a in pair] + ["--no-progress"]
        code, _, err = run_cli(capsys, "eval", *argv)
        assert code == 2, (changes, err)
        assert err.startswith("diffcore eval: error: ") and err.count("\n") == 1, err
        assert needle in err, (needle, err)
    assert not (tmp_path / "m.json").exists()
