"""``precision=`` / ``compile=`` in the restore and evaluate pipelines and ``--precision`` / ``--compile`` on
``diffcore restore`` and ``diffcore eval``.

Tolerances for bf16: bfloat16 keeps 8 significant bits, unit roundoff u = 2**-8 (3.9e-3). Autocast runs the U-Net's
convolutions and linear layers in bf16, so every model output carries a relative error of a few u; the samplers add
those errors over the steps while the step arithmetic stays fp32. The bounds below are 4u of the signal's size for
pixel differences (measured on these tiny models: 1e-3 to 8e-3 mean absolute on images of RMS 0.8) and u for
bits/dim, an average of many terms (measured 1.4e-4 relative). Each bf16 test also checks that the result differs
from fp32, i.e. that bf16 really ran.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import diffcore.pipelines.evaluate as evaluate_pipeline
import diffcore.pipelines.restore as restore_pipeline
from diffcore import runtime
from diffcore.data import synthetic_images
from diffcore.inverse import dps_sample, make_operator, naive_inpaint_sample
from diffcore.pipelines.evaluate import bits_per_dim, generate
from diffcore.pipelines.restore import AutocastModel, make_measurement_noise, restore
from diffcore.pipelines.sample import sample
from diffcore.train import load_trained_model
from helpers import run_cli, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

U = 2.0 ** -8  #: bf16 unit roundoff


@pytest.fixture(autouse=True)
def amx_cpu(monkeypatch):
    """Pretend the CPU runs bf16 fast (no "bf16 is slow here" warning; resolve_precision returns bf16 either way)."""
    monkeypatch.setenv(runtime.FEATURES_ENV, "amx,avx512_bf16,avx512,avx2")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    return {"restore": load_trained_model(tiny_checkpoint(root / "c8", 8, num_timesteps=20)),
            "eval": load_trained_model(tiny_checkpoint(root / "c28", 28, num_timesteps=10)), "root": root}


def clean_image():
    return synthetic_images(1, 8, 1, seed=3)[0].float() / 127.5 - 1.0  # [1, 1, 8, 8] in [-1, 1]


def relative_mean_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().mean() / expected.pow(2).mean().sqrt())


@pytest.mark.parametrize("task", ["inpaint-box", "deblur-gauss", "ct"])
def test_restore_fp32_is_the_plain_dps_recipe_bit_for_bit(models, task):
    """precision="fp32" leaves the model unwrapped: the result is dps_sample's (and the baseline's) as before."""
    trained = models["restore"]
    x = clean_image()
    result = restore(trained.model, trained.diffusion, x, task, steps=10, seed=1, progress=False, precision="fp32")
    operator = make_operator(task, (1, 8, 8))
    noise = make_measurement_noise(operator, "gaussian", sigma_y=0.05)
    y = noise(operator(x.double()), seed=1).float()
    process = trained.diffusion.respaced(10, "even")
    loop = dict(sampler="ddpm", eta=0.0, clip_denoised=True, seed=1, progress=False)
    direct = dps_sample(trained.model, process, operator, y, zeta=1.0 / operator.spectral_norm(), noise_model=noise,
                        **loop)
    assert torch.equal(result.restored, direct.sample.clamp(-1, 1))
    assert torch.equal(result.residual_norms, direct.residual_norms)
    if task == "inpaint-box":
        assert torch.equal(result.baseline, naive_inpaint_sample(trained.model, process, operator, y,
                                                                 **loop).clamp(-1, 1))
    assert result.settings["precision"] == "fp32" and result.settings["dtype"] == "float32"


@pytest.mark.parametrize("task", ["inpaint-box", "deblur-gauss", "ct"])
def test_restore_bf16_stays_close_to_fp32(models, task):
    trained = models["restore"]
    x = clean_image()
    fp32 = restore(trained.model, trained.diffusion, x, task, steps=10, seed=1, progress=False)
    bf16 = restore(trained.model, trained.diffusion, x, task, steps=10, seed=1, progress=False, precision="bf16")
    assert bf16.settings["dtype"] == "bfloat16" and bf16.restored.dtype == torch.float32
    assert torch.isfinite(bf16.restored).all() and not torch.equal(bf16.restored, fp32.restored)
    assert relative_mean_error(bf16.restored, fp32.restored) <= 4 * U
    norms = (bf16.residual_norms - fp32.residual_norms).abs() / fp32.residual_norms
    assert float(norms.max()) <= 8 * U  # ||y - A(x0_hat)||: the operator itself runs in fp32


def test_autocast_covers_the_model_only_and_the_dps_gradient_stays_close(models):
    """One DPS guidance gradient grad_x ||y - A(x0_hat(x))|| through the bf16 model against the fp32 one."""
    trained = models["restore"]
    diffusion, model = trained.diffusion, trained.model
    seen = []

    def spy(x, t, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), x.dtype))
        return model(x, t, **kwargs)

    operator = make_operator("deblur-gauss", (1, 8, 8))
    y = operator(clean_image())
    torch.manual_seed(0)
    x_t = torch.randn(2, 1, 8, 8)
    t = torch.tensor([12, 5])

    def gradient(net):
        x_in = x_t.clone().requires_grad_(True)
        prediction, _ = diffusion.split_output(diffusion.call_model(net, x_in, t), 1)
        x0_hat, _ = diffusion.predict_x0_eps(prediction, x_in, t)
        residual = operator(x0_hat)
        assert residual.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
        return torch.autograd.grad((y - residual).flatten(1).norm(dim=1).sum(), x_in)[0]

    exact = gradient(model)
    low = gradient(AutocastModel(spy, torch.bfloat16, "cpu"))
    assert seen == [(True, torch.float32)]
    assert low.dtype == torch.float32 and not torch.equal(low, exact)
    cosine = torch.nn.functional.cosine_similarity(low.flatten(), exact.flatten(), dim=0)
    assert cosine > 1 - 4 * U
    assert float((low - exact).norm() / exact.norm()) <= 8 * U


def aot_eager(monkeypatch, tmp_path, module):
    """Make ``module.compile_model`` compile with the aot_eager backend (AOTAutograd traces forward and backward,
    as inductor does, without generating code: seconds instead of minutes); the cache settings stay test-local."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    calls = []

    def compiled(model, **kwargs):
        calls.append(model)
        return runtime.compile_model(model, backend="aot_eager", cache=tmp_path / "inductor", **kwargs)

    monkeypatch.setattr(module, "compile_model", compiled)
    return calls


@pytest.mark.slow  # several seconds; CI runs the slow tests too
def test_restore_compiled_serves_dps(models, monkeypatch, tmp_path):
    trained = models["restore"]
    calls = aot_eager(monkeypatch, tmp_path, restore_pipeline)
    x = clean_image()
    eager = restore(trained.model, trained.diffusion, x, "inpaint-box", steps=4, seed=2, progress=False)
    compiled = restore(trained.model, trained.diffusion, x, "inpaint-box", steps=4, seed=2, progress=False,
                       compile=True)
    torch._dynamo.reset()
    assert calls == [trained.model] and compiled.settings["compile"] is True
    torch.testing.assert_close(compiled.restored, eager.restored, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled.residual_norms, eager.residual_norms, rtol=1e-5, atol=1e-6)


def test_generate_and_bits_per_dim_precision(models):
    trained = models["eval"]
    args = (trained.model, trained.diffusion, trained.image_shape)
    fp32 = generate(*args, 6, steps=5, batch_size=4, progress=False, precision="fp32")
    direct = torch.cat([sample(trained.model, n=count, sampler="ddim", steps=5, seed=k, diffusion=trained.diffusion,
                               image_shape=trained.image_shape, progress=False, precision="fp32")
                        for k, count in enumerate((4, 2))])
    assert torch.equal(fp32, direct)  # the samples as before: diffcore.sample per batch, fp32
    bf16 = generate(*args, 6, steps=5, batch_size=4, progress=False, precision="bf16")
    assert torch.isfinite(bf16).all() and not torch.equal(bf16, fp32)
    assert relative_mean_error(bf16, fp32) <= 4 * U
    real = synthetic_images(30, 28, 1, seed=5)[0]
    bpd = {p: bits_per_dim(*args[:2], real, trained.image_shape, batches=1, batch_size=3, progress=False, precision=p)
           for p in ("fp32", "bf16")}
    assert bpd["fp32"].bpd != bpd["bf16"].bpd and abs(bpd["bf16"].bpd - bpd["fp32"].bpd) <= U * bpd["fp32"].bpd


@pytest.mark.slow  # several seconds; CI runs the slow tests too
def test_evaluate_compiles_once(models, monkeypatch, tmp_path):
    trained = models["eval"]
    calls = aot_eager(monkeypatch, tmp_path, evaluate_pipeline)
    real = synthetic_images(30, 28, 1, seed=5)[0]
    kwargs = dict(n=4, steps=2, batch_size=2, real=real, bpd_batches=1, bpd_batch_size=2, progress=False)
    eager = evaluate_pipeline.evaluate_model(trained.model, trained.diffusion, trained.image_shape, **kwargs)
    compiled = evaluate_pipeline.evaluate_model(trained.model, trained.diffusion, trained.image_shape, compile=True,
                                                **kwargs)
    torch._dynamo.reset()
    assert calls == [trained.model]  # once for the two sampling batches and the bits/dim
    assert compiled.settings["compile"] is True and eager.settings["compile"] is False
    assert compiled.metrics["fid"] == pytest.approx(eager.metrics["fid"], rel=1e-4)
    assert compiled.bpd.bpd == pytest.approx(eager.bpd.bpd, rel=1e-5)


def test_bad_precision_and_compile_values_are_named(models):
    trained = models["restore"]
    x = clean_image()
    with pytest.raises(ValueError, match="precision: expected one of fp32, bf16, fp16, auto, got 'half'"):
        restore(trained.model, trained.diffusion, x, "ct", steps=2, progress=False, precision="half")
    with pytest.raises(ValueError, match="precision: 'fp16' runs on GPUs only"):
        restore(trained.model, trained.diffusion, x, "ct", steps=2, progress=False, precision="fp16")
    with pytest.raises(TypeError, match="compile: expected a bool, got str"):
        restore(trained.model, trained.diffusion, x, "ct", steps=2, progress=False, compile="yes")
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        restore(lambda x, t: trained.model(x, t), trained.diffusion, x, "ct", steps=2, progress=False, compile=True)
    ev = models["eval"]
    with pytest.raises(ValueError, match="precision: expected one of"):
        generate(ev.model, ev.diffusion, ev.image_shape, 2, steps=2, progress=False, precision="float32")
    with pytest.raises(TypeError, match="compile: expected a bool"):
        evaluate_pipeline.evaluate_model(ev.model, ev.diffusion, ev.image_shape, n=2, compile=1)


def test_cli_restore_and_eval_take_precision(models, tmp_path, capsys):
    from PIL import Image

    root = models["root"]
    c16 = tiny_checkpoint(tmp_path / "c16", 16, num_timesteps=10)  # the restore command's SSIM needs >= 11 px
    png = tmp_path / "clean.png"
    Image.fromarray(synthetic_images(1, 16, 1, seed=3)[0][0, 0].numpy()).save(png)
    code, out, err = run_cli(capsys, "restore", "--checkpoint", c16, "--task", "deblur-gauss", "--input", png,
                             "--out", tmp_path / "r", "--steps", 4, "--precision", "bf16", "--no-progress")
    assert code == 0, err
    assert "bfloat16" in out
    report = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert report["precision"] == "bf16" and report["dtype"] == "bfloat16" and report["compile"] is False
    real = tmp_path / "real.npy"
    np.save(real, synthetic_images(30, 28, 1, seed=5)[0][:, 0].numpy())
    code, _, err = run_cli(capsys, "eval", "--checkpoint", root / "c28", "--n", 4, "--steps", 2, "--batch-size", 2,
                           "--real", real, "--precision", "bf16", "--out", tmp_path / "m.json", "--no-progress")
    assert code == 0, err
    settings = json.loads((tmp_path / "m.json").read_text())["settings"]
    assert settings["precision"] == "bf16" and settings["dtype"] == "bfloat16"
    for command, extra in (("restore", ("--checkpoint", c16, "--task", "ct", "--input", png, "--out",
                                        tmp_path / "bad")),
                           ("eval", ("--checkpoint", root / "c28", "--real", real, "--n", 4, "--out",
                                     tmp_path / "bad.json"))):
        code, _, err = run_cli(capsys, command, "--precision", "fp16", "--no-progress", *extra)
        assert code == 2 and "'fp16' runs on GPUs only" in err and err.count("\n") == 1
        assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.json").exists()
