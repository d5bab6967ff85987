"""Classifier guidance from the command line: ``diffcore sample --classifier PATH --class K --classifier-scale s``.

A tiny noisy classifier with seeded random weights is written the way diffcore writes one
(:func:`diffcore.guidance.save_classifier`); the CLI's samples are compared with the Python API's, the guidance
formula with a hand computation of one DDIM step, scale 0 with unguided sampling, and bad input with one-line errors
that write nothing.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffcore import checkpoint as ck
from diffcore.guidance import (NoisyClassifier, classifier_free_guidance, classifier_guidance, load_classifier,
                               save_classifier)
from diffcore.pipelines.sample import sample
from diffcore.samplers import SAMPLERS, run_sampler
from diffcore.samplers.loop import initial_noise
from diffcore.train import TrainConfig, load_trained_model
from diffcore.unet import UNet, UNetConfig
from helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES = 5  # of the classifier


def seeded(build, seed: int) -> torch.nn.Module:
    """``build()`` under ``torch.manual_seed(seed)``, every parameter then moved by 0.05 N(0, 1), so that no layer
    keeps ADM's zero init."""
    torch.manual_seed(seed)
    module = build()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module


def diffusion_checkpoint(path, *, num_classes=None, image_size=4, num_timesteps=10, schedule="cosine"):
    """A tiny fixed-variance eps U-Net (class-conditional when ``num_classes``) saved as a diffcore checkpoint."""
    config = UNetConfig(in_channels=1, model_channels=8, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(),
                        image_size=image_size, num_classes=num_classes, num_heads=1)
    model = seeded(lambda: UNet(config), seed=0)
    train = TrainConfig(data="synthetic", model=config, num_timesteps=num_timesteps, schedule=schedule,
                        variance_type="fixed_small")
    ck.save_checkpoint(path, model=model.state_dict(), config=train.to_dict(), step=1)
    return path


def classifier_checkpoint(path, alphas_cumprod, *, image_size=4, seed=1):
    """A NoisyClassifier with seeded random weights, saved with diffcore.guidance.save_classifier."""
    config = UNetConfig(in_channels=1, model_channels=8, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(),
                        image_size=image_size, num_classes=NUM_CLASSES)
    save_classifier(path, seeded(lambda: NoisyClassifier(config), seed), alphas_cumprod)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("guidance")
    model = diffusion_checkpoint(root / "model")
    abar = load_trained_model(model).diffusion.alphas_cumprod
    return {"root": root, "model": model, "classifier": classifier_checkpoint(root / "clf", abar)}


def npz_images(path):
    with np.load(path) as archive:
        return archive["arr_0"], archive["arr_1"] if "arr_1" in archive.files else None


def to_u8(images):
    return ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_save_and_load_classifier_round_trip(files):
    loaded = load_classifier(files["classifier"])
    trained = load_trained_model(files["model"])
    assert loaded.num_classes == NUM_CLASSES and loaded.num_timesteps == 10 and loaded.image_shape == (1, 4, 4)
    assert torch.equal(loaded.alphas_cumprod, trained.diffusion.alphas_cumprod.cpu())
    assert not loaded.classifier.training and not any(p.requires_grad for p in loaded.classifier.parameters())
    again = seeded(lambda: NoisyClassifier(loaded.classifier.config), seed=1)  # the same seeded weights, rebuilt
    x, t = torch.randn(3, 1, 4, 4), torch.tensor([0, 4, 9])
    torch.testing.assert_close(loaded.classifier(x, t), again.eval()(x, t), rtol=0, atol=0)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_cli_classifier_guidance_equals_the_python_api(files, tmp_path, capsys, sampler):
    trained = load_trained_model(files["model"])
    classifier = load_classifier(files["classifier"]).classifier
    labels = torch.tensor([3, 1, 3, 1, 3])
    guided = classifier_guidance(trained.model, classifier, labels, 4.0, trained.diffusion.alphas_cumprod)
    expected = sample(guided, n=5, sampler=sampler, steps=4, seed=7, diffusion=trained.diffusion,
                      image_shape=trained.image_shape, progress=False, batch_size=5)
    unguided = sample(trained.model, n=5, sampler=sampler, steps=4, seed=7, diffusion=trained.diffusion,
                      image_shape=trained.image_shape, progress=False, batch_size=5)
    assert (to_u8(expected).astype(int) != to_u8(unguided)).any()  # the guidance moves some pixel by a level
    out = tmp_path / "s.npz"
    code, stdout, err = run_cli(capsys, "sample", "--checkpoint", files["model"], "--classifier", files["classifier"],
                                "--class", 3, 1, "--classifier-scale", 4, "--sampler", sampler, "--n", 5, "--steps",
                                4, "--seed", 7, "--format", "npz", "--out", out, "--no-progress")
    assert code == 0, err
    assert "classifier guidance scale 4.0" in stdout
    images, written_labels = npz_images(out)
    np.testing.assert_array_equal(images, to_u8(expected))
    np.testing.assert_array_equal(written_labels, labels.numpy())


def test_guided_ddim_step_equals_the_formula_by_hand(files):
    """One DDIM step from x_T at t = T-1 (eta 0) lands on x0_hat; with eps~ = eps - sqrt(1-abar) s grad log p(y|x):
    x0_hat = (x_T - sqrt(1-abar) eps~) / sqrt(abar), the gradient taken here with torch.autograd on the classifier."""
    trained = load_trained_model(files["model"])
    classifier = load_classifier(files["classifier"]).classifier
    labels, scale, seed = torch.tensor([0, 2, 4, 1]), 3.0, 11
    abar_table = trained.diffusion.alphas_cumprod
    guided = classifier_guidance(trained.model, classifier, labels, scale, abar_table)
    got = run_sampler("ddim", guided, trained.diffusion, (4, 1, 4, 4), steps=1, schedule="trailing", seed=seed,
                      progress=False).sample
    x_T = initial_noise((4, 1, 4, 4), seed).double()
    t = torch.full((4,), 9)
    x_in = x_T.float().requires_grad_(True)
    log_p = torch.log_softmax(classifier(x_in, t), dim=1)[torch.arange(4), labels].sum()
    grad = torch.autograd.grad(log_p, x_in)[0].double()
    with torch.no_grad():
        eps = trained.model(x_T.float(), t).double()
    abar = abar_table[9].item()
    eps_guided = eps - (1 - abar) ** 0.5 * scale * grad
    expected = (x_T - (1 - abar) ** 0.5 * eps_guided) / abar ** 0.5
    assert (grad.abs().max() * scale * (1 - abar) / abar ** 0.5) > 1e-2  # the shift is far above the tolerance
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_scale_zero_gives_the_unguided_samples(files, tmp_path, capsys):
    common = ("sample", "--checkpoint", files["model"], "--n", 4, "--steps", 5, "--seed", 2, "--sampler", "ddim",
              "--eta", 0.5, "--format", "npz", "--no-progress")
    code, _, err = run_cli(capsys, *common, "--out", tmp_path / "plain.npz")
    assert code == 0, err
    code, _, err = run_cli(capsys, *common, "--classifier", files["classifier"], "--class", 2,
                           "--classifier-scale", 0, "--out", tmp_path / "zero.npz")
    assert code == 0, err
    plain, _ = npz_images(tmp_path / "plain.npz")
    zero, labels = npz_images(tmp_path / "zero.npz")
    np.testing.assert_array_equal(zero, plain)
    np.testing.assert_array_equal(labels, [2, 2, 2, 2])


def test_classifier_and_classifier_free_guidance_compose(files, tmp_path, capsys):
    """A class-conditional model: --guidance-scale wraps it for CFG, --classifier guides the result; the labels go
    to both."""
    model_path = diffusion_checkpoint(tmp_path / "cond", num_classes=NUM_CLASSES)
    trained = load_trained_model(model_path)
    classifier = load_classifier(files["classifier"]).classifier
    labels = torch.tensor([4, 0, 4])
    cfg = classifier_free_guidance(trained.model, labels, 2.0, null_class=NUM_CLASSES)
    guided = classifier_guidance(cfg, classifier, labels, 2.5, trained.diffusion.alphas_cumprod)
    expected = sample(guided, n=3, sampler="dpm++2m", steps=4, seed=5, diffusion=trained.diffusion,
                      image_shape=trained.image_shape, progress=False)
    code, _, err = run_cli(capsys, "sample", "--checkpoint", model_path, "--classifier", files["classifier"],
                           "--class", 4, 0, "--classifier-scale", 2.5, "--guidance-scale", 2, "--sampler", "dpm++2m",
                           "--n", 3, "--steps", 4, "--seed", 5, "--format", "npz", "--out", tmp_path / "s.npz",
                           "--no-progress")
    assert code == 0, err
    np.testing.assert_array_equal(npz_images(tmp_path / "s.npz")[0], to_u8(expected))
    # without --guidance-scale the labels condition the model (y=) and target the classifier
    direct = classifier_guidance(trained.model, classifier, labels, 2.5, trained.diffusion.alphas_cumprod)
    expected = sample(direct, n=3, sampler="ddim", steps=4, seed=5, diffusion=trained.diffusion,
                      image_shape=trained.image_shape, progress=False, model_kwargs={"y": labels})
    code, _, err = run_cli(capsys, "sample", "--checkpoint", model_path, "--classifier", files["classifier"],
                           "--class", 4, 0, "--classifier-scale", 2.5, "--sampler", "ddim", "--n", 3, "--steps", 4,
                           "--seed", 5, "--format", "npz", "--out", tmp_path / "d.npz", "--no-progress")
    assert code == 0, err
    np.testing.assert_array_equal(npz_images(tmp_path / "d.npz")[0], to_u8(expected))
    # the model's null class is no target for the classifier
    code, _, err = run_cli(capsys, "sample", "--checkpoint", model_path, "--classifier", files["classifier"],
                           "--class", NUM_CLASSES, "--n", 2, "--steps", 2, "--out", tmp_path / "n.png",
                           "--no-progress")
    assert code == 2 and "--class: expected labels in 0..4" in err


def test_the_grid_is_written(files, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code, _, err = run_cli(capsys, "sample", "--checkpoint", files["model"], "--classifier", files["classifier"],
                           "--class", 3, "--n", 4, "--steps", 3, "--out", out, "--no-progress")
    assert code == 0, err
    from PIL import Image

    with Image.open(out) as grid:  # 2 x 2 grid of 4 px images with 2 px padding
        assert grid.size == (14, 14)


def bad_cases(files, root):
    """(extra argv, expected fragment of the error) of each bad input; the model is files["model"]."""
    other = root / "others"
    abar20 = load_trained_model(diffusion_checkpoint(other / "t20", num_timesteps=20)).diffusion.alphas_cumprod
    scaled = load_trained_model(diffusion_checkpoint(other / "sl", schedule="scaled_linear")).diffusion.alphas_cumprod
    own = load_trained_model(files["model"]).diffusion.alphas_cumprod
    junk = other / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    clf = files["classifier"]
    return [
        (("--classifier", clf), "--classifier: needs --class"),
        (("--classifier", junk, "--class", 1), "expected a noisy-classifier checkpoint folder"),
        (("--classifier", other / "missing", "--class", 1), "no such file or folder"),
        (("--classifier", files["model"], "--class", 1), "got a diffusion-model checkpoint"),
        (("--classifier", classifier_checkpoint(other / "c8", own, image_size=8), "--class", 1),
         "trained on 1x8x8 images, the diffusion model makes 1x4x4"),
        (("--classifier", classifier_checkpoint(other / "c20", abar20), "--class", 1),
         "trained on T = 20 timesteps, the diffusion model has T = 10"),
        (("--classifier", classifier_checkpoint(other / "csl", scaled), "--class", 1), "another noise schedule"),
        (("--classifier", clf, "--class", 1, "--classifier-scale", "nan"), "--classifier-scale: expected a finite"),
        (("--classifier", clf, "--class", 1, "--classifier-scale", "inf"), "--classifier-scale: expected a finite"),
        (("--classifier", clf, "--class", 1, "--classifier-scale", -1), "--classifier-scale: expected a finite"),
        (("--classifier-scale", 2), "--classifier-scale: applies with --classifier"),
        (("--classifier", clf, "--class", NUM_CLASSES), "the classifier has 5 classes"),
        (("--class", 1), "--class: the model is not class-conditional"),
        (("--classifier", clf, "--class", 1, "--batch-size", 0), "--batch-size: expected >= 1, got 0"),
    ]


def test_bad_input_is_one_line_and_writes_nothing(files, tmp_path, capsys):
    for extra, fragment in bad_cases(files, tmp_path):
        out = tmp_path / "never.png"
        code, stdout, err = run_cli(capsys, "sample", "--checkpoint", files["model"], "--n", 4, "--steps", 2,
                                    "--out", out, "--no-progress", *extra)
        assert code == 2, (extra, err)
        assert fragment in err, (extra, err)
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert not out.exists() and stdout == ""


def test_a_classifier_given_as_the_model_is_named(files, tmp_path, capsys):
    out = tmp_path / "never.png"
    code, stdout, err = run_cli(capsys, "sample", "--checkpoint", files["classifier"], "--n", 2, "--steps", 2,
                                "--out", out, "--no-progress")
    assert code != 0 and "got a 'noisy-classifier' checkpoint" in err and "pass it as --classifier" in err, err
    assert err.count("\n") == 1 and not out.exists()


@pytest.mark.slow  # compiles; CI runs the slow tests too
def test_classifier_guidance_with_compile_and_bf16(files, tmp_path, capsys, monkeypatch):
    """--compile compiles the diffusion network inside the guidance wrapper (aot_eager here: seconds, not minutes);
    --precision bf16 runs the model and the classifier's gradient under autocast."""
    from diffcore import runtime

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv(runtime.FEATURES_ENV, "amx,avx512_bf16,avx512,avx2")
    compiled, compile_model = [], runtime.compile_model

    def aot_eager(model, **kwargs):
        compiled.append(model)
        return compile_model(model, backend="aot_eager", cache=tmp_path / "inductor", **kwargs)

    monkeypatch.setattr(runtime, "compile_model", aot_eager)
    common = ("sample", "--checkpoint", files["model"], "--classifier", files["classifier"], "--class", 2, 4,
              "--classifier-scale", 3, "--n", 4, "--steps", 4, "--seed", 9, "--format", "npz", "--no-progress")
    outputs = {}
    for name, extra in (("eager", ("--precision", "fp32")), ("compiled", ("--compile", "--precision", "fp32")),
                        ("bf16", ("--precision", "bf16"))):
        code, _, err = run_cli(capsys, *common, *extra, "--out", tmp_path / f"{name}.npz")
        assert code == 0, err
        outputs[name] = npz_images(tmp_path / f"{name}.npz")[0].astype(int)
    torch._dynamo.reset()
    assert len(compiled) == 1 and isinstance(compiled[0], UNet)
    assert np.abs(outputs["compiled"] - outputs["eager"]).max() <= 1  # a rounding apart at most (uint8 levels)
    # bf16: unit roundoff 2**-8 of a [-1, 1] image is half a uint8 level; a mean of 2 levels bounds it with margin
    assert (outputs["bf16"] != outputs["eager"]).any() and np.abs(outputs["bf16"] - outputs["eager"]).mean() <= 2.0
