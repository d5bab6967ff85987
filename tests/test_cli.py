"""The ``diffcore`` command line: each subcommand's output checked against the library calls it stands for."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffcore import checkpoint as ck
from diffcore import cli
from diffcore.pipelines.sample import sample
from diffcore.samplers import ddim_invert
from diffcore.train import load_trained_model
from helpers import run_cli

TINY = ["--data", "synthetic", "--image-size", "8", "--model-channels", "8", "--channel-mult", "1,2",
        "--num-res-blocks", "1", "--attention-resolutions", "4", "--num-timesteps", "20", "--batch-size", "8",
        "--log-every", "3", "--checkpoint-every", "3", "--no-progress", "--ema-rate", "0.5", "--lr", "1e-2"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    assert cli.main(["train", *TINY, "--steps", "6", "--out-dir", str(out)]) == 0
    torch.set_num_threads(threads)
    return out


def test_help_explains_every_subcommand(capsys):
    for command, needle in (("train", "--timestep-sampler"), ("sample", "--ancestral"), ("invert", "--reconstruction"),
                            ("interpolate", "--seeds"), ("export", "EMA"), ("restore", "--zeta"),
                            ("eval", "--bpd-batches"), ("info", "devices")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        assert exit_info.value.code == 0
        assert needle in capsys.readouterr().out


def test_train_writes_a_resumable_run(run_dir, capsys):
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [3, 6]
    config = json.loads((run_dir / "checkpoints" / "step_00000006" / "config.json").read_text())
    assert config["model"]["channel_mult"] == [1, 2] and config["model"]["learn_sigma"] is True
    assert config["num_timesteps"] == 20 and config["total_steps"] == 6
    # the same command with more steps resumes; another learning rate is refused with a clear message
    code, out, _ = run_cli(capsys, "train", *TINY, "--steps", "7", "--out-dir", run_dir)
    assert code == 0 and "resuming at step 6" in out
    code, _, err = run_cli(capsys, "train", *TINY, "--lr", "0.5", "--steps", "8", "--out-dir", run_dir)
    assert code == 2 and "another configuration" in err and "lr: 0.01 != 0.5" in err
    code, _, err = run_cli(capsys, "train", *TINY, "--no-resume", "--out-dir", run_dir)
    assert code == 2 and "already holds checkpoints" in err
    code, out, _ = run_cli(capsys, "train", *TINY, "--print-config", "--timestep-sampler", "loss-second-moment")
    assert json.loads(out)["timestep_sampler"] == "loss-second-moment"
    assert json.loads(out)["ema_warmup"] is False
    code, out, _ = run_cli(capsys, "train", *TINY, "--print-config", "--ema-warmup")
    assert json.loads(out)["ema_warmup"] is True


def test_sample_matches_the_library(run_dir, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "sample", "--checkpoint", run_dir, "--n", 4, "--steps", 5, "--seed", 3,
                       "--out", tmp_path / "s.png", "--npz", tmp_path / "s.npz", "--no-progress")
    assert code == 0 and "4 images, ancestral, 5 steps" in out
    trained = load_trained_model(run_dir)
    expected = sample(trained.model, n=4, steps=5, seed=3, diffusion=trained.diffusion,
                      image_shape=trained.image_shape, progress=False)
    expected_u8 = ((expected + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    with np.load(tmp_path / "s.npz") as archive:
        np.testing.assert_array_equal(archive["arr_0"], expected_u8)
    with Image.open(tmp_path / "s.png") as grid:  # 2 x 2 grid of 8px images with 2px padding
        assert grid.size == (22, 22)
        np.testing.assert_array_equal(np.asarray(grid)[2:10, 12:20], expected_u8[1, :, :, 0])


def test_invert_and_interpolate(run_dir, tmp_path, capsys):
    images = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "x.npy", images)
    code, out, _ = run_cli(capsys, "invert", "--checkpoint", run_dir, tmp_path / "x.npy", "--steps", 4,
                       "--out", tmp_path / "lat.npz", "--reconstruction", tmp_path / "r.png", "--no-progress")
    assert code == 0 and "reconstruction MSE" in out
    trained = load_trained_model(run_dir)
    x0 = torch.from_numpy(images).float()[:, None] / 127.5 - 1
    expected = ddim_invert(trained.model, trained.diffusion, x0, steps=4, skip_type="uniform", progress=False)
    with np.load(tmp_path / "lat.npz") as archive:
        np.testing.assert_allclose(archive["latents"], expected.sample.numpy(), rtol=0, atol=1e-6)
        assert archive["timesteps"].tolist() == [0, 5, 10, 15]
    # interpolation: the two ends are the samples of the two seeds
    code, _, _ = run_cli(capsys, "interpolate", "--checkpoint", run_dir, "--seeds", 4, 9, "--num", 3, "--steps", 4,
                     "--out", tmp_path / "i.png", "--no-progress")
    assert code == 0
    strip = np.asarray(Image.open(tmp_path / "i.png")).astype(int)
    for seed, left in ((4, 2), (9, 22)):
        end = sample(trained.model, n=1, steps=4, seed=seed, diffusion=trained.diffusion, sampler="ddim",
                     image_shape=trained.image_shape, progress=False)
        end_u8 = ((end[0, 0] + 1) * 127.5).round().numpy().astype(int)
        assert np.abs(strip[2:10, left:left + 8] - end_u8).max() <= 1


def test_export_and_info(run_dir, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "export", run_dir, tmp_path / "exported")
    assert code == 0 and "MB" in out
    exported, original = load_trained_model(tmp_path / "exported"), load_trained_model(run_dir)
    for key, value in original.model.state_dict().items():  # the EMA weights, moved over exactly
        assert torch.equal(exported.model.state_dict()[key], value)
    assert not (tmp_path / "exported" / "ema.safetensors").exists()
    code, out, _ = run_cli(capsys, "info")
    report = json.loads(out)
    assert code == 0 and report["torch"] == torch.__version__
    assert set(report) >= {"build", "kernels", "devices", "packaged_model"}
    assert report["devices"]["cuda_available"] == torch.cuda.is_available()


def test_clear_errors(run_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "sample", "--checkpoint", tmp_path / "missing")
    assert code == 2 and "no such file or folder" in err and "missing" in err
    code, _, err = run_cli(capsys, "sample", "--checkpoint", run_dir, "--steps", 50)
    assert code == 2 and "--steps: expected 1..20" in err
    code, _, err = run_cli(capsys, "sample", "--checkpoint", run_dir, "--label", 1)
    assert code == 2 and "not class-conditional" in err
    code, _, err = run_cli(capsys, "train", "--channel-mult", "1,x")
    assert code == 2 and "--channel-mult" in err
    with pytest.raises(SystemExit):  # argparse rejects an unknown choice itself (exit status 2)
        cli.main(["train", "--schedule", "exponential"])
    # a corrupted checkpoint
    damaged = tmp_path / "damaged"
    cli.main(["export", str(run_dir), str(damaged)])
    blob = bytearray((damaged / "model.safetensors").read_bytes())
    blob[-5] ^= 1
    (damaged / "model.safetensors").write_bytes(bytes(blob))
    code, _, err = run_cli(capsys, "sample", "--checkpoint", damaged, "--steps", 2, "--out", tmp_path / "x.png")
    assert code == 2 and "model.safetensors is corrupted" in err
    # a well-formed checkpoint whose config describes another model than its weights
    
    trained = load_trained_model(run_dir)
    config = trained.config.to_dict()
    config["model"]["model_channels"] = 12
    ck.save_checkpoint(tmp_path / "mismatch", model=trained.model.state_dict(), config=config, step=1)
    code, _, err = run_cli(capsys, "sample", "--checkpoint", tmp_path / "mismatch", "--steps", 2)
    assert code == 2 and "does not match the model configuration" in err and "shape mismatches" in err


def test_invert_and_interpolate_in_batches_give_the_same_results(run_dir, tmp_path, capsys):
    """--batch-size splits inversion and decoding into model calls of that many images; both are deterministic, so
    the latents, the reconstruction and the strip equal those of one batch (up to float rounding)."""
    images = np.random.default_rng(1).integers(0, 256, size=(5, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "x.npy", images)
    results = {}
    for size in ("2", "5"):
        lat, rec, strip = tmp_path / f"lat{size}.npz", tmp_path / f"r{size}.png", tmp_path / f"i{size}.png"
        code, _, _ = run_cli(capsys, "invert", "--checkpoint", run_dir, tmp_path / "x.npy", "--steps", 4, "--out", lat,
                             "--reconstruction", rec, "--batch-size", size, "--no-progress")
        assert code == 0
        code, _, _ = run_cli(capsys, "interpolate", "--checkpoint", run_dir, "--seeds", 4, 9, "--num", 5, "--steps",
                             4, "--out", strip, "--batch-size", size, "--no-progress")
        assert code == 0
        with np.load(lat) as archive:
            results[size] = (archive["latents"], np.asarray(Image.open(rec)).astype(int),
                             np.asarray(Image.open(strip)).astype(int))
    (lat2, rec2, strip2), (lat5, rec5, strip5) = results["2"], results["5"]
    assert lat5.std() > 0.1
    np.testing.assert_allclose(lat2, lat5, rtol=0, atol=1e-5)
    assert np.abs(rec2 - rec5).max() <= 1 and np.abs(strip2 - strip5).max() <= 1
    code, _, err = run_cli(capsys, "invert", "--checkpoint", run_dir, tmp_path / "x.npy", "--out", tmp_path / "z.npz",
                           "--batch-size", "0")
    assert code != 0 and "--batch-size" in err and not (tmp_path / "z.npz").exists()
