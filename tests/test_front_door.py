"""The front door as a new user meets it: outputs that exist are never replaced unless asked, writes that fail name
the file, 16-bit images read as what they show, impossible requests are refused before any work, and the Python
entry point names the argument it cannot use."""
from __future__ import annotations

import errno
import hashlib
import json
import os

import numpy as np
import pytest
import torch

import diffcore
from diffcore import outputs
from diffcore.diffusion import GaussianDiffusion
from diffcore.images import load_image, open_picture
from diffcore.schedules import make_schedule
from helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 8


@pytest.fixture(scope="module")
def gray_png(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "gray.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)).save(path)
    return path


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error_line(code, err, command, needle):
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith(f"diffcore {command}: error: ") and "Traceback" not in err, err
    assert needle in err, (needle, err)


def command_lines(ckpt, gray_png, folder):
    """(argv writing ``target``, target) for every command that writes files; ``target`` gets created first."""
    quick = ["--checkpoint", ckpt, "--steps", "2", "--no-progress"]
    return [
        (["sample", *quick, "--n", "2", "--out", folder / "grid.png"], folder / "grid.png"),
        (["sample", *quick, "--n", "2", "--format", "npz", "--out", folder / "s.npz"], folder / "s.npz"),
        (["sample", *quick, "--n", "2", "--out", folder / "g2.png", "--npz", folder / "also.npz"],
         folder / "also.npz"),
        (["invert", *quick, gray_png, "--out", folder / "lat.npz"], folder / "lat.npz"),
        (["invert", *quick, gray_png, "--out", folder / "lat2.npz", "--reconstruction", folder / "rec.png"],
         folder / "rec.png"),
        (["interpolate", *quick, "--num", "2", "--out", folder / "strip.png"], folder / "strip.png"),
        (["restore", *quick, "--task", "sr4", "--input", gray_png, "--out", folder / "r"], folder / "r" / "metrics.json"),
    ]


def test_an_existing_output_is_refused_unless_overwrite(ckpt, gray_png, tmp_path, capsys):
    """Before: every command silently replaced a user's file at --out (os.replace). Now it is an error naming the
    file and the way out, the file keeps its bytes and nothing else is written; --overwrite replaces it."""
    for argv, target in command_lines(ckpt, gray_png, tmp_path):
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(b"the user's own file\n")
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        code, _, err = run_cli(capsys, *argv)
        one_error_line(code, err, argv[0], "exists already")
        assert "--overwrite" in err and str(target) in err, err
        assert target.read_bytes() == b"the user's own file\n"
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, argv
        code, out, err = run_cli(capsys, *argv, "--overwrite")
        assert code == 0, err
        assert target.read_bytes() != b"the user's own file\n", argv
    assert not [p for p in tmp_path.rglob(".*tmp-*")]


def test_a_device_or_fifo_at_out_is_never_written(ckpt, tmp_path, capsys):
    """Before: --out /dev/full passed the checks and the write renamed a PNG over the device node (as root). Now a
    path that exists and is not a regular file is refused, --overwrite or not."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for extra in ([], ["--overwrite"]):
        code, _, err = run_cli(capsys, "sample", "--checkpoint", ckpt, "--n", "1", "--steps", "2", "--no-progress",
                               "--out", fifo, *extra)
        one_error_line(code, err, "sample", "not a regular file")
    assert fifo.is_fifo() and sorted(os.listdir(tmp_path)) == ["pipe.png"]


def test_output_suffix_that_names_another_format_is_refused(ckpt, tmp_path, capsys):
    """Before: --out x.jpg got PNG bytes, --format npz --out x.png an .npz, invert --out x.png an .npz: files that
    lie about their kind."""
    quick = ["--checkpoint", ckpt, "--steps", "2", "--no-progress"]
    for argv, needle in ((["sample", "--out", tmp_path / "x.jpg"], "--out: this writes a .png file"),
                         (["sample", "--format", "npz", "--out", tmp_path / "x.png"], "--out: this writes a .npz file"),
                         (["sample", "--out", tmp_path / "x.png", "--npz", tmp_path / "y.png"],
                          "--npz: this writes a .npz"),
                         (["interpolate", "--out", tmp_path / "x.npz"], "--out: this writes a .png"),
                         (["eval", "--out", tmp_path / "x.npz"], "--out: this writes a .json"),
                         (["invert", tmp_path, "--out", tmp_path / "x.png"], "--out: this writes a .npz"),
                         (["invert", tmp_path, "--out", tmp_path / "x.npz", "--reconstruction", tmp_path / "r.npz"],
                          "--reconstruction: this writes a .png")):
        code, _, err = run_cli(capsys, *argv, *quick)
        one_error_line(code, err, argv[0], needle)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_names_the_target_and_leaves_nothing(ckpt, tmp_path, capsys, monkeypatch):
    """Before: a full disk printed '[Errno 28] No space left on device' (or named diffcore's hidden temporary
    file). Now the one line names the file that could not be written, and no temporary file is left."""
    real = outputs.write_synced

    def full_disk(path, data):
        if path.name.startswith(".s.npz.tmp-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data)

    monkeypatch.setattr(outputs, "write_synced", full_disk)
    code, _, err = run_cli(capsys, "sample", "--checkpoint", ckpt, "--n", "2", "--steps", "2", "--no-progress",
                           "--out", tmp_path / "s.png", "--npz", tmp_path / "s.npz")
    one_error_line(code, err, "sample", f"could not write {tmp_path / 's.npz'}: No space left on device")
    assert "[Errno" not in err and ".tmp-" not in err
    assert list(tmp_path.iterdir()) == []


def test_write_together_without_replace_never_clobbers_a_file_that_appears(tmp_path, monkeypatch):
    """The race the pre-check cannot see: a file appears at a target after the check (another process). With
    replace=False the move is a no-clobber link: that file is kept, and the files this call had already moved
    into place are taken back."""
    real = outputs.write_synced

    def another_writer(path, data):
        real(path, data)
        if path.name.startswith(".b.txt.tmp-"):
            (tmp_path / "b.txt").write_text("theirs")

    monkeypatch.setattr(outputs, "write_synced", another_writer)
    with pytest.raises(FileExistsError, match=f"could not write {tmp_path / 'b.txt'}: it exists already"):
        outputs.write_together({tmp_path / "a.txt": b"a", tmp_path / "b.txt": b"b"}, replace=False)
    assert sorted(os.listdir(tmp_path)) == ["b.txt"] and (tmp_path / "b.txt").read_text() == "theirs"
    with pytest.raises(FileExistsError, match="exists already"):  # the check before any write
        outputs.write_together({tmp_path / "c.txt": b"c", tmp_path / "b.txt": b"b"}, replace=False)
    assert sorted(os.listdir(tmp_path)) == ["b.txt"]
    monkeypatch.setattr(outputs, "write_synced", real)
    outputs.write_together({tmp_path / "b.txt": b"mine"})  # replace=True (the Python default) replaces
    assert (tmp_path / "b.txt").read_bytes() == b"mine"


def test_16_bit_images_are_scaled_not_clipped_to_white(tmp_path):
    """Before: PIL's convert("L") clipped every 16-bit value above 255, so a 16-bit PNG read as a white image."""
    from PIL import Image

    values = np.random.default_rng(1).integers(0, 65536, (SIZE, SIZE), dtype=np.uint16)
    values[0, :3] = (0, 65535, 32896)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")  # really a 16-bit file
    expected = np.floor(values / 257.0 + 0.5) / 127.5 - 1.0  # round(v * 255 / 65535), then diffcore's pixel map
    gray = load_image(tmp_path / "deep.png", (1, SIZE, SIZE))
    assert torch.allclose(gray[0, 0].double(), torch.from_numpy(expected), atol=1e-6)
    assert gray[0, 0, 0, :3].tolist() == pytest.approx([-1.0, 1.0, 1.0 / 255], abs=1e-6)
    rgb = load_image(tmp_path / "deep.png", (3, SIZE, SIZE))
    assert torch.equal(rgb[0], gray[0].expand(3, -1, -1))
    wide = Image.fromarray((values.astype(np.int32) * 4).astype(np.int32), mode="I")
    with pytest.raises(ValueError, match="32-bit integer pixels"):
        open_picture(_tiff_bytes(wide), 1, "wide.png")


def _tiff_bytes(picture):
    import io

    buffer = io.BytesIO()
    picture.save(buffer, format="TIFF")  # TIFF keeps 32-bit integer pixels
    return buffer.getvalue()


def test_restore_on_images_smaller_than_the_ssim_window(ckpt, gray_png, tmp_path, capsys):
    """Before: an 8x8 model ran the whole restoration, then failed with 'x: SSIM needs images of at least 11x11'.
    Now SSIM is reported as absent (null) and PSNR as usual."""
    code, out, err = run_cli(capsys, "restore", "--checkpoint", ckpt, "--task", "inpaint-box", "--input", gray_png,
                             "--out", tmp_path / "r", "--steps", "2", "--no-progress")
    assert code == 0, err
    report = json.loads((tmp_path / "r" / "metrics.json").read_text())
    from PIL import Image

    clean = np.asarray(Image.open(gray_png), dtype=np.float64) / 127.5 - 1.0
    restored = np.asarray(Image.open(tmp_path / "r" / "restored.png"), dtype=np.float64) / 127.5 - 1.0
    psnr_8bit = 10 * np.log10(4.0 / np.mean((restored - clean) ** 2))  # the PNG is quantized: within 0.5 dB
    assert report["metrics"]["restored"]["ssim"] is None
    assert report["metrics"]["restored"]["psnr"] == pytest.approx(psnr_8bit, abs=0.5)


def test_threads_beyond_the_cpus_are_refused(ckpt, tmp_path, capsys):
    """Before: --threads 100000 crashed OpenMP (segmentation fault, exit 139)."""
    cpus = len(os.sched_getaffinity(0))
    code, _, err = run_cli(capsys, "sample", "--checkpoint", ckpt, "--threads", cpus + 1, "--out", tmp_path / "x.png")
    one_error_line(code, err, "sample", f"--threads: expected 1..{cpus}")
    assert list(tmp_path.iterdir()) == []


def test_train_names_the_flag_of_a_bad_config_or_out_dir(tmp_path, capsys):
    """Before: '--config x.png' printed a bare UnicodeDecodeError, and an --out-dir that is a file failed after
    the model was built with '[Errno 17] File exists'."""
    (tmp_path / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "broken.json").write_text("{oops")
    for argv, needle in (
            (["--config", tmp_path / "picture.png"], "--config: "),
            (["--config", tmp_path / "broken.json"], "is not a TrainConfig JSON file"),
            (["--data", "synthetic", "--out-dir", tmp_path / "picture.png"], "--out-dir: ")):
        code, _, err = run_cli(capsys, "train", *argv, "--steps", "1", "--no-progress")
        one_error_line(code, err, "train", needle)
    assert sorted(os.listdir(tmp_path)) == ["broken.json", "picture.png"]


def test_sample_names_the_argument_it_cannot_use():
    """Before: generator=3 and diffusion=3 raised AttributeError, device="tpu" torch's list of device types,
    fast="no" ran fast sampling, n=2**40 blamed first_image."""
    calls = []

    def model(x, t):
        calls.append(x.shape)
        return torch.zeros_like(x)

    diffusion = GaussianDiffusion(make_schedule("cosine", 10))
    common = dict(diffusion=diffusion, image_shape=(1, 4, 4), steps=2, progress=False)
    for kwargs, kind, needle in (
            (dict(generator=3), TypeError, "generator: expected a torch.Generator"),
            (dict(diffusion=3), TypeError, "diffusion: expected a diffcore.GaussianDiffusion"),
            (dict(device="tpu"), ValueError, "device: expected a torch device"),
            (dict(fast="no"), TypeError, "fast: expected a bool"),
            (dict(compile="yes"), TypeError, "compile: expected a bool"),
            (dict(n=2**40), ValueError, r"n: expected an int in \[1, 2\*\*32\]"),
            (dict(n=2**24, image_shape=(3, 512, 512)), MemoryError, "n: 16777216 images")):
        with pytest.raises(kind, match=needle):
            diffcore.sample(model, **{**common, **kwargs})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device cuda: this torch .* sees no CUDA device"):
            diffcore.sample(model, device="cuda", **common)
    assert calls == []  # every one refused before the first model call
    images = diffcore.sample(model, n=2, seed=0, **common)  # and the checks pass a valid call
    assert images.shape == (2, 1, 4, 4) and len(calls) == 2


def test_restore_names_bad_clean_images_and_settings_before_any_work():
    """Before: NaN images ran the whole DPS loop and were blamed on the model ('the DPS result ... diverged'),
    images in [0, 255] or [-5, 5] were restored as if valid, an empty batch blamed batch_size, sigma_y=inf ended
    in NaN, zeta="1" raised a bare TypeError, and eta with the ddpm sampler was ignored."""
    from diffcore.pipelines.restore import restore

    calls = []

    def model(x, t):
        calls.append(x.shape)
        return torch.zeros_like(x)

    diffusion = GaussianDiffusion(make_schedule("cosine", 10))
    clean = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    nan = clean.clone()
    nan[0, 0, 3, 4] = float("nan")
    for x, kwargs, kind, needle in (
            (nan, {}, ValueError, "x: 1 of 256 values are NaN or infinite"),
            (clean * 127.5 + 127.5, {}, ValueError, r"x: expected clean images in \[-1, 1\]"),
            (clean[:0], {}, ValueError, "x: expected at least one image"),
            (clean[0], {}, TypeError, r"x: expected float images \[B, C, H, W\], got a torch.float32 tensor"),
            (clean, dict(sigma_y=float("inf")), ValueError, "sigma_y: expected a finite float"),
            (clean, dict(zeta="1"), TypeError, "zeta: expected a float >= 0, got str"),
            (clean, dict(eta=0.5), ValueError, "eta: applies to sampler='ddim'")):
        with pytest.raises(kind, match=needle):
            restore(model, diffusion, x, "sr4", steps=2, progress=False, **kwargs)
    assert calls == []
    result = restore(model, diffusion, clean, "sr4", steps=2, progress=False)  # the checks pass valid input
    assert torch.equal(result.reference, clean) and len(calls) > 0


def test_ctrl_c_while_writing_leaves_nothing(ckpt, tmp_path, capsys, monkeypatch):
    """An interrupt between the first and the second file of a command: status 130, one line, no file and no
    temporary left (write_together cleans up on any exception, KeyboardInterrupt included)."""
    real = outputs.write_synced

    def interrupted(path, data):
        if path.name.startswith(".s.npz.tmp-"):
            raise KeyboardInterrupt
        real(path, data)

    monkeypatch.setattr(outputs, "write_synced", interrupted)
    code, _, err = run_cli(capsys, "sample", "--checkpoint", ckpt, "--n", "2", "--steps", "2", "--no-progress",
                           "--out", tmp_path / "deep" / "s.png", "--npz", tmp_path / "deep" / "s.npz")
    assert code == 130 and err == "diffcore sample: interrupted\n"
    assert list(tmp_path.iterdir()) == []


def test_no_clobber_placement_without_hard_links(tmp_path, monkeypatch):
    """Where the file system has no hard links, replace=False falls back to a check and a rename: new files are
    written, an existing one is still refused."""
    def no_links(source, target):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    outputs.write_together({tmp_path / "a.txt": b"a"}, replace=False)
    assert (tmp_path / "a.txt").read_bytes() == b"a" and sorted(os.listdir(tmp_path)) == ["a.txt"]
    with pytest.raises(FileExistsError):
        outputs.write_together({tmp_path / "a.txt": b"b"}, replace=False)
    assert (tmp_path / "a.txt").read_bytes() == b"a" and sorted(os.listdir(tmp_path)) == ["a.txt"]


def test_python_writers_keep_an_existing_file_when_asked(tmp_path):
    """save_image_grid / save_npz replace like Python's writers by default; overwrite=False keeps the file."""
    from diffcore.images import save_image_grid, save_npz

    (tmp_path / "g.png").write_text("mine")
    (tmp_path / "a.npz").write_text("mine")
    with pytest.raises(FileExistsError, match="exists already"):
        save_image_grid(torch.zeros(1, 1, 2, 2), tmp_path / "g.png", overwrite=False)
    with pytest.raises(FileExistsError, match="exists already"):
        save_npz(tmp_path / "a.npz", overwrite=False, arr_0=np.zeros(2))
    assert (tmp_path / "g.png").read_text() == "mine" and (tmp_path / "a.npz").read_text() == "mine"
    save_npz(tmp_path / "a.npz", arr_0=np.arange(3))
    with np.load(tmp_path / "a.npz") as archive:
        assert archive["arr_0"].tolist() == [0, 1, 2]


@pytest.mark.parametrize("sampler", ["ddim", "ancestral", "euler", "heun", "dpm++2m", "dpm++2m-sde"])
def test_nan_at_one_step_of_one_image_is_reported_by_every_sampler(sampler):
    """A model whose output is NaN in one pixel of one image at its second call: the front door raises, naming
    the non-finite values, instead of returning an image that saves as black."""
    calls = []

    def model(x, t):
        calls.append(1)
        out = 0.1 * x
        if len(calls) == 2:
            out = out.clone()
            out[1, 0, 2, 2] = float("nan")
        return out

    diffusion = GaussianDiffusion(make_schedule("cosine", 10))
    with pytest.raises(FloatingPointError, match=r"sample: \d+ of 48 values are NaN or infinite in 1 of 3 images "
                                                 r"\(rows 1\)"):
        diffcore.sample(model, n=3, steps=4, sampler=sampler, diffusion=diffusion, image_shape=(1, 4, 4), seed=0,
                        progress=False)
    calls.clear()
    images = diffcore.sample(lambda x, t: 0.1 * x, n=3, steps=4, sampler=sampler, diffusion=diffusion,
                             image_shape=(1, 4, 4), seed=0, progress=False)
    assert bool(torch.isfinite(images).all())
