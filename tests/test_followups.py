"""Follow-ups of two audits: each test failed before its fix.

- diffusers' variance_type "learned" is refused by GaussianDiffusion.from_diffusers_config itself (it was mapped to
  diffcore's LEARNED, whose extra channels are the log of the variance, not the variance);
- data_kind says what is wrong with an existing path of an unsupported kind (it said "no such file or folder");
- a model output that is not floating point is an error (it was cast silently);
- runtime.set_threads bounds the count by the CPUs this process may use (a huge count crashed torch's OpenMP);
- samplers.loop.draw_seed / prepare check ``generator`` (a wrong one crashed with an AttributeError or was ignored);
- ``diffcore interpolate --num`` and ``diffcore invert`` refuse a request whose images alone exceed the memory.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from diffcore import runtime
from diffcore.data import data_kind
from diffcore.diffusion import GaussianDiffusion, split_model_output
from diffcore.samplers import ddim_sample
from diffcore.samplers.loop import draw_seed
from diffcore.schedules import make_schedule
from helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 8
LINEAR_10 = {"num_train_timesteps": 10, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}


# ---------------------------------------------------------------------------------- diffusers' "learned" variance
@pytest.mark.parametrize("spelling", ["learned", "Learned"])
def test_diffusers_learned_variance_is_refused_by_the_process_itself(spelling):
    with pytest.raises(ValueError, match="variance_type: 'learned' is not converted.*as its log"):
        GaussianDiffusion.from_diffusers_config({**LINEAR_10, "variance_type": spelling})
    # learned_range means the same in both libraries and is kept
    kept = GaussianDiffusion.from_diffusers_config({**LINEAR_10, "variance_type": "learned_range"})
    assert kept.variance_type.name == "LEARNED_RANGE"
    torch.testing.assert_close(kept.schedule.betas, torch.linspace(1e-4, 0.02, 10, dtype=torch.float64))


# ----------------------------------------------------------------------------------- data sources of a wrong kind
def test_an_existing_file_of_an_unsupported_kind_is_not_called_missing(tmp_path):
    picture = tmp_path / "cat.png"
    picture.write_bytes(b"not really a png")
    with pytest.raises(ValueError, match=r"cat\.png', a file of an unsupported kind \(\.png\)") as caught:
        data_kind(str(picture))
    assert "no such file" not in str(caught.value)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        data_kind(str(tmp_path / "missing.png"))
    assert data_kind(str(tmp_path)) == "folder"


# ------------------------------------------------------------------------------------- non-floating model outputs
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_a_model_output_that_is_not_floating_point_is_refused(dtype):
    diffusion = GaussianDiffusion(make_schedule("cosine", 20))
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([3, 7])
    bad = torch.ones_like(x, dtype=dtype)
    for call in (lambda: diffusion.call_model(lambda x_, t_: bad, x, t),
                 lambda: diffusion.p_mean_variance(None, x, t, model_output=bad),
                 lambda: split_model_output(bad, x),
                 lambda: ddim_sample(lambda x_, t_: bad, diffusion, x_T=x, steps=2, progress=False)):
        with pytest.raises(TypeError, match=f"model output: expected a floating-point tensor.*{dtype}"):
            call()
    # a floating output of another precision is still cast to x's dtype (the value, not a reinterpretation)
    out = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = diffusion.call_model(lambda x_, t_: out, x, t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, out.float(), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------- thread count
def test_set_threads_refuses_more_threads_than_cpus(monkeypatch):
    available = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    try:
        with pytest.raises(ValueError, match=rf"^--threads: expected 1\.\.{available} .*got {available + 1}$"):
            runtime.set_threads(available + 1, name="--threads")
        with pytest.raises(ValueError, match=rf"^threads: expected 1\.\.{available} .*got 100000$"):
            runtime.set_threads(100000)
        assert torch.get_num_threads() == before  # nothing was set
        monkeypatch.setenv(runtime.THREADS_ENV, str(available + 1))
        with pytest.raises(ValueError, match=rf"^\$DIFFCORE_THREADS: expected 1\.\.{available} "):
            runtime.set_threads()
        assert runtime.set_threads(available) == available == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------------ generator
def test_draw_seed_and_the_samplers_check_the_generator():
    with pytest.raises(TypeError, match="generator: expected a torch.Generator or None, got int"):
        draw_seed(None, 7)
    with pytest.raises(TypeError, match="generator: expected a torch.Generator or None, got str"):
        draw_seed(3, "cpu")
    diffusion = GaussianDiffusion(make_schedule("cosine", 20))
    x_T = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="generator: expected a torch.Generator or None, got int"):
        ddim_sample(lambda x, t: torch.zeros_like(x), diffusion, x_T=x_T, steps=2, generator=7, progress=False)
    # a real generator supplies the seed: the same state gives the same one, as torch.randint draws it
    drawn = draw_seed(None, torch.Generator().manual_seed(5))
    assert drawn == int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(5)))


# ------------------------------------------------------------------------------- memory checks of interpolate/invert
def pretend_memory(monkeypatch, total_bytes):
    """Make the physical memory diffcore reads (os.sysconf) ``total_bytes``; other sysconf names unchanged."""
    real = os.sysconf
    fake = {"SC_PHYS_PAGES": total_bytes, "SC_PAGE_SIZE": 1}
    monkeypatch.setattr(os, "sysconf", lambda name: fake[name] if name in fake else real(name))


def test_interpolate_refuses_a_num_that_does_not_fit_in_memory(ckpt, tmp_path, capsys, monkeypatch):
    num = 3
    need = 4 * num * 1 * SIZE * SIZE  # float32 images [num, 1, SIZE, SIZE]
    out = tmp_path / "strip.png"
    argv = ["interpolate", "--checkpoint", ckpt, "--num", num, "--steps", 2, "--no-progress", "--out", out]
    pretend_memory(monkeypatch, need - 1)
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and err.count("\n") == 1, err
    assert f"--num: {num} images of shape (1, {SIZE}, {SIZE})" in err and "fewer images" in err, err
    assert not out.exists()
    pretend_memory(monkeypatch, need)  # exactly enough: runs
    code, _, err = run_cli(capsys, *argv)
    assert code == 0 and out.exists(), err


def test_invert_refuses_inputs_that_do_not_fit_in_memory(ckpt, tmp_path, capsys, monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, (2, 1, SIZE, SIZE), dtype=np.uint8)
    np.save(tmp_path / "two.npy", images)
    need = 4 * images.size
    out = tmp_path / "latents.npz"
    argv = ["invert", tmp_path / "two.npy", "--checkpoint", ckpt, "--steps", 2, "--no-progress", "--out", out]
    pretend_memory(monkeypatch, need - 1)
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and err.count("\n") == 1, err
    assert f"inputs: 2 images of shape (1, {SIZE}, {SIZE})" in err and "in parts" in err, err
    assert not out.exists()
    pretend_memory(monkeypatch, need)
    code, _, err = run_cli(capsys, *argv)
    assert code == 0 and np.load(out)["latents"].shape == (2, 1, SIZE, SIZE), err
