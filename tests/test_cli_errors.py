"""Bad input on the command line: every case exits non-zero with one line on stderr (no traceback) and leaves the
output folder exactly as it was; NaN results are reported, never written as black images."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from diffcore import cli
from diffcore.unet import UNet
from helpers import run_cli, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 8


@pytest.fixture(scope="module")
def nan_ckpt(tmp_path_factory):
    """The tiny checkpoint with one NaN in its first weight: every sample is NaN."""
    from diffcore import checkpoint as ck
    from diffcore.train import load_trained_model

    path = tiny_checkpoint(tmp_path_factory.mktemp("nan") / "good", SIZE, num_timesteps=10)
    trained = load_trained_model(path, use_ema=False)
    state = trained.model.state_dict()
    first = next(iter(state))
    state[first] = state[first].clone()
    state[first].view(-1)[0] = float("nan")
    out = path.parent / "nan"
    ck.save_checkpoint(out, model=state, config=trained.config.to_dict(), step=1)
    return out


def snapshot(folder):
    """Every path under ``folder`` with its size and content hash: the state a failed command must not change."""
    import hashlib

    state = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            state[os.path.relpath(os.path.join(root, name), folder)] = "dir"
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                state[os.path.relpath(path, folder)] = hashlib.sha256(handle.read()).hexdigest()
    return state


def cases(ckpt, out):
    """(argv, text the error line must contain). ``out`` is the (pre-populated) output folder."""
    return [
        (["sample", "--checkpoint", ckpt, "--out", "."], "--out: expected a file path"),
        (["sample", "--checkpoint", ckpt, "--out", out], "is a folder"),
        (["sample", "--checkpoint", ckpt, "--out", out / "keep.txt" / "x.png"], "is a file, not a folder"),
        (["sample", "--checkpoint", ckpt, "--out", out / "new.png", "--npz", out / "keep.txt" / "x.npz"],
         "--npz: cannot create"),
        (["sample", "--checkpoint", ckpt, "--format", "npz", "--out", out / "new.npz", "--npz", out / "new.npz"],
         "--npz: must differ"),
        (["sample", "--checkpoint", ckpt, "--out", out / "new.png", "--eta", "inf"], "--eta: expected a finite"),
        (["sample", "--checkpoint", ckpt, "--out", out / "new.png", "--eta", "-1"], "--eta: expected a finite"),
        (["sample", "--checkpoint", ckpt, "--out", out / "new.png", "--n", "0"], "--n: expected >= 1"),
        (["sample", "--checkpoint", ckpt, "--out", out / "new.png", "--nrow", "0"], "--nrow: expected >= 1"),
        (["sample", "--checkpoint", ckpt, "--out", out / "new.png", "--steps", "11"], "--steps: expected 1..10"),
        (["sample", "--checkpoint", ckpt, "--out", out / "new.png", "--device", "cuda:0"], "--device cuda:0"),
        (["sample", "--checkpoint", ckpt, "--out", out / "new.png", "--device", "tpu9"], "--device"),
        (["sample", "--checkpoint", out / "missing", "--out", out / "new.png"], "no such file or folder"),
        (["sample", "--checkpoint", out / "keep.txt", "--out", out / "new.png"], "keep.txt"),
        (["invert", "--checkpoint", ckpt, out / "keep.txt", "--out", out / "lat.npz"], "not an image file"),
        (["invert", "--checkpoint", ckpt, out / "img.png", "--out", out / "lat.npz", "--reconstruction",
          out / "keep.txt" / "r.png"], "--reconstruction: cannot create"),
        (["interpolate", "--checkpoint", ckpt, "--out", out, "--num", "3"], "is a folder"),
        (["restore", "--checkpoint", ckpt, "--task", "sr4", "--input", out / "img.png", "--out", out / "r",
          "--zeta", "inf"], "--zeta: expected a finite"),
        (["restore", "--checkpoint", ckpt, "--task", "sr4", "--input", out / "img.png", "--out", out / "keep.txt"],
         "exists and is not a folder"),
        (["eval", "--checkpoint", ckpt, "--out", out], "is a folder"),
        (["eval", "--checkpoint", ckpt, "--eta", "nan", "--out", out / "m.json"], "--eta: expected a finite"),
        (["eval", "--checkpoint", ckpt, "--real", out / "img.png", "--out", out / "m.json"], "--real "),
        (["restore", "--checkpoint", ckpt, "--task", "sr4", "--input", out / "img.png", "--out", out / "r",
          "--sigma-y", "inf"], "--sigma-y: expected a finite"),
        (["sample", "--checkpoint", ckpt, "--out", out / "keep.txt"], "exists already"),
        (["sample", "--checkpoint", ckpt, "--out", out / "new.png", "--n", str(2**32 + 1)], "--n: expected at most"),
        (["export", ckpt, out], "not a diffcore checkpoint"),
        (["export", ckpt, out / "keep.txt"], "not a diffcore checkpoint"),
    ]


def populate(folder):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "keep.txt").write_text("the user's file\n")
    (folder / "notes").mkdir(exist_ok=True)
    (folder / "notes" / "a.md").write_text("# mine\n")
    Image.new("L", (SIZE, SIZE), 128).save(folder / "img.png")


def test_each_bad_input_is_one_line_and_touches_nothing(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    populate(out)
    before = snapshot(out)
    cwd = os.getcwd()
    os.chdir(tmp_path)  # "--out ." resolves here
    try:
        for argv, needle in cases(ckpt, out):
            code, _, err = run_cli(capsys, *argv, "--no-progress" if argv[0] not in ("export",) else "--raw-weights")
            assert code == 2, (argv, err)
            assert err.count("\n") == 1 and err.startswith(f"diffcore {argv[0]}: error: "), (argv, err)
            assert "Traceback" not in err
            assert needle in err, (argv, needle, err)
            assert snapshot(out) == before, argv
    finally:
        os.chdir(cwd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.slow
def test_traceback_flag_shows_the_trace(ckpt, tmp_path):
    argv = [sys.executable, "-m", "diffcore.cli", "--traceback", "sample", "--checkpoint", str(ckpt), "--n", "0",
            "--out", str(tmp_path / "x.png")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" in result.stderr and "--n: expected >= 1" in result.stderr
    plain = subprocess.run([a for a in argv if a != "--traceback"], capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr


def test_a_nan_model_is_reported_and_nothing_is_written(nan_ckpt, tmp_path, capsys):
    populate(tmp_path / "in")  # img.png, an input for invert
    for argv in (["sample", "--checkpoint", nan_ckpt, "--n", "2", "--steps", "2", "--out", tmp_path / "s.png",
                  "--npz", tmp_path / "s.npz"],
                 ["sample", "--checkpoint", nan_ckpt, "--n", "2", "--ancestral", "--out", tmp_path / "a.png"],
                 # invert wrote NaN latents with exit status 0 before
                 ["invert", "--checkpoint", nan_ckpt, tmp_path / "in" / "img.png", "--steps", "2", "--out",
                  tmp_path / "lat.npz"],
                 ["interpolate", "--checkpoint", nan_ckpt, "--num", "2", "--steps", "2", "--out", tmp_path / "i.png"]):
        code, _, err = run_cli(capsys, *argv, "--no-progress")
        assert code == 2 and "NaN or infinite" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_the_front_door_raises_on_nan_instead_of_returning_black(nan_ckpt):
    import diffcore
    from diffcore.train import load_trained_model

    trained = load_trained_model(nan_ckpt)
    assert isinstance(trained.model, UNet)
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        diffcore.sample(trained.model, n=2, steps=2, diffusion=trained.diffusion, seed=0, progress=False)
    with pytest.raises(FloatingPointError, match="nothing was written"):
        diffcore.save_image_grid(torch.full((1, 1, 4, 4), float("nan")), "never.png")
    assert not os.path.exists("never.png")


def test_outputs_of_one_command_are_written_together(ckpt, tmp_path, capsys):
    code, out, err = run_cli(capsys, "sample", "--checkpoint", ckpt, "--n", "2", "--steps", "2", "--out",
                             tmp_path / "deep" / "s.png", "--npz", tmp_path / "deep" / "s.npz", "--no-progress")
    assert code == 0, err
    import numpy as np

    with np.load(tmp_path / "deep" / "s.npz") as archive:
        assert archive["arr_0"].shape == (2, SIZE, SIZE, 1)
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["s.npz", "s.png"]


def test_write_together_leaves_nothing_when_one_write_fails(tmp_path, monkeypatch):
    from diffcore import outputs

    (tmp_path / "old.txt").write_text("old")
    real = outputs.write_synced
    calls = []

    def fail_second(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(outputs, "write_synced", fail_second)
    with pytest.raises(OSError, match="No space left"):
        outputs.write_together({tmp_path / "new" / "a.png": b"a", tmp_path / "old.txt": b"new"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.txt"]
    assert (tmp_path / "old.txt").read_text() == "old"


def test_info_and_help_do_not_need_a_model(capsys):
    code, out, _ = run_cli(capsys, "info")
    assert code == 0 and json.loads(out)["diffcore"]
    with pytest.raises(SystemExit):
        cli.main(["sample", "--help"])
