"""Sharded generation (``first_image``) and guided sampling in batches.

Shards of a seed's image numbering, run as separate calls (or separate ``diffcore sample`` processes writing into one
folder), must give exactly the images and labels of one big run; guided sampling (classifier-free and classifier
guidance, labels passed per call through ``model_kwargs``) must give the same images for every batch size. The
reference each time is an independent computation: one call over all images, or the guidance wrappers holding the
labels of the whole batch (the pre-existing API).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffcore.guidance import classifier_free_guidance, classifier_guidance, load_classifier
from diffcore.pipelines.sample import sample
from diffcore.train import load_trained_model
from helpers import run_cli
from test_cli_guidance import NUM_CLASSES, classifier_checkpoint, diffusion_checkpoint, npz_images

pytestmark = pytest.mark.usefixtures("one_thread")

SHARDS = [(0, 3), (3, 2), (5, 4)]  # (first_image, n): images 0..8 in three calls
TOTAL = 9
STOCHASTIC = [("ancestral", None), ("ddim", 1.0), ("dpm++2m-sde", None)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    model = diffusion_checkpoint(root / "model")
    conditional = diffusion_checkpoint(root / "cond", num_classes=NUM_CLASSES)
    abar = load_trained_model(model).diffusion.alphas_cumprod
    return {"model": model, "cond": conditional, "classifier": classifier_checkpoint(root / "clf", abar)}


def run(trained, n, model=None, seed=3, **kwargs):
    """``diffcore.sample`` of ``n`` images of ``trained`` (or of ``model``, e.g. a guidance wrapper), 4 steps, fp32."""
    return sample(trained.model if model is None else model, n=n, steps=4, seed=seed, diffusion=trained.diffusion,
                  image_shape=trained.image_shape, progress=False, precision="fp32", **kwargs)


# ------------------------------------------------------------------------------------------ Python: first_image
@pytest.mark.parametrize("sampler,eta", STOCHASTIC)
@pytest.mark.parametrize("conditional", [False, True])
def test_shards_concatenated_equal_one_run(files, sampler, eta, conditional):
    trained = load_trained_model(files["cond" if conditional else "model"])
    labels = torch.tensor([4, 0, 2, 2, 1, 3, 0, 4, 1]) if conditional else None

    def kwargs(rows):
        return {"model_kwargs": {"y": labels[rows]}} if conditional else {}
    whole = run(trained, TOTAL, sampler=sampler, eta=eta, **kwargs(slice(0, TOTAL)))
    parts = [run(trained, n, sampler=sampler, eta=eta, first_image=first, batch_size=2,
                 **kwargs(slice(first, first + n))) for first, n in SHARDS]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-5, atol=1e-5)
    # the row offset matters: shard 2 from image 0 instead of 3 gives other images
    assert (run(trained, 2, sampler=sampler, eta=eta, **kwargs(slice(3, 5))) - whole[3:5]).abs().max() > 1e-2


def test_bad_first_image_is_named(files):
    trained = load_trained_model(files["model"])
    for value, error, fragment in [(-1, ValueError, "first_image: expected an int in [0, 2**32 - n] with n = 4"),
                                   (2**32 - 3, ValueError, "got 4294967293"),
                                   (True, TypeError, "first_image: expected an int >= 0"),
                                   (1.0, TypeError, "got float 1.0")]:
        with pytest.raises(error) as info:
            run(trained, 4, first_image=value)
        assert fragment in str(info.value)
    last = run(trained, 3, first_image=2**32 - 3, sampler="ddim", eta=1.0)  # the last images of the seed exist
    assert last.shape == (3, 1, 4, 4) and bool(torch.isfinite(last).all())


# -------------------------------------------------------------------------- Python: guidance labels per call
def test_guidance_wrappers_with_labels_per_call_batch_like_unguided_sampling(files):
    trained = load_trained_model(files["cond"])
    classifier = load_classifier(files["classifier"]).classifier
    abar = trained.diffusion.alphas_cumprod
    labels = torch.tensor([4, 0, 2, 2, 1])
    # reference: the wrappers holding the labels of the whole batch, one batch (the API as it was)
    held = classifier_guidance(classifier_free_guidance(trained.model, labels, 2.0, NUM_CLASSES), classifier, labels,
                               3.0, abar)
    expected = run(trained, 5, model=held, sampler="dpm++2m-sde", batch_size=5)
    per_call = classifier_guidance(classifier_free_guidance(trained.model, None, 2.0, NUM_CLASSES), classifier, None,
                                   3.0, abar)
    for batch_size in (1, 2, 5):
        got = run(trained, 5, model=per_call, sampler="dpm++2m-sde", batch_size=batch_size,
                  model_kwargs={"y": labels, "classifier_y": labels})
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    unguided = run(trained, 5, sampler="dpm++2m-sde", model_kwargs={"y": labels})
    assert (unguided - expected).abs().max() > 1e-2  # the guidance moves the images


def test_labels_per_call_errors_are_named(files):
    trained = load_trained_model(files["cond"])
    classifier = load_classifier(files["classifier"]).classifier
    x, t = torch.randn(2, 1, 4, 4), torch.tensor([3, 7])
    cfg = classifier_free_guidance(trained.model, None, 2.0, NUM_CLASSES)
    with pytest.raises(ValueError, match=r"model_kwargs: expected the labels as y= \(an int64 tensor \[2\]"):
        cfg(x, t)
    with pytest.raises(ValueError, match=r"model_kwargs\['y'\]: expected int64 labels \[2\] .* got torch.int64 "
                                         r"tensor of shape \(3,\)"):
        cfg(x, t, y=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"model_kwargs\['y'\]: expected labels in \[0, 5\] \(5 = the null class\), "
                                         r"got values in \[0, 6\]"):
        cfg(x, t, y=torch.tensor([0, 6]))
    guided = classifier_guidance(trained.model, classifier, None, 1.0, trained.diffusion.alphas_cumprod)
    with pytest.raises(ValueError, match="expected the labels as classifier_y="):
        guided(x, t, y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"model_kwargs\['classifier_y'\]: expected labels in \[0, 4\] \(the "
                                         r"classifier has 5 classes\)"):
        guided(x, t, y=torch.tensor([0, 1]), classifier_y=torch.tensor([5, 1]))
    held = classifier_guidance(trained.model, classifier, torch.tensor([0, 1]), 1.0, trained.diffusion.alphas_cumprod)
    with pytest.raises(ValueError, match="'classifier_y' are the classifier's targets, set by the guidance wrapper"):
        held(x, t, classifier_y=torch.tensor([0, 1]))


# ------------------------------------------------------------------------------------------------ the CLI
def cli_sample(capsys, checkpoint, out, *extra):
    return run_cli(capsys, "sample", "--checkpoint", checkpoint, "--steps", 4, "--seed", 5, "--sampler",
                   "dpm++2m-sde", "--precision", "fp32", "--no-progress", "--out", out, *extra)


def test_cli_png_shards_in_one_folder_give_the_files_of_one_run(files, tmp_path, capsys):
    """--class 1 2 3 cycles over the global index, so shard 3 (images 5..8) has labels 3, 1, 2, 3 like the big run.
    --batch-size 1 in both makes every image the same computation, so the PNG bytes are equal."""
    common = ("--class", 1, 2, 3, "--guidance-scale", 2, "--format", "png", "--batch-size", 1)
    code, _, err = cli_sample(capsys, files["cond"], tmp_path / "one", "--n", TOTAL, *common)
    assert code == 0, err
    for first, n in SHARDS:
        code, stdout, err = cli_sample(capsys, files["cond"], tmp_path / "shards", "--n", n, "--first-image", first,
                                       *common)
        assert code == 0, err
        assert first == 0 or f"images {first}..{first + n - 1}" in stdout
    one = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert one == [f"{i:06d}.png" for i in range(TOTAL)]
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == one
    for name in one:
        assert (tmp_path / "shards" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    # the labels of a shard are the big run's (npz arr_1)
    code, _, err = cli_sample(capsys, files["cond"], tmp_path / "s.npz", "--n", 2, "--first-image", 4,
                              "--class", 1, 2, 3, "--format", "npz")
    assert code == 0, err
    np.testing.assert_array_equal(npz_images(tmp_path / "s.npz")[1], [[1, 2, 3][i % 3] for i in (4, 5)])


def test_cli_png_never_replaces_an_existing_file(files, tmp_path, capsys):
    folder = tmp_path / "pngs"
    code, _, err = cli_sample(capsys, files["model"], folder, "--n", 3, "--format", "png")
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    (folder / "000004.png").write_bytes(b"the user's own file")
    for first, n in [(0, 3), (2, 2), (4, 1)]:  # overlaps the earlier shard or the user's file
        code, stdout, err = cli_sample(capsys, files["model"], folder, "--n", n, "--first-image", first,
                                       "--format", "png")
        assert code == 2 and "exist already" in err and "never replaces a file" in err, err
        assert err.count("\n") == 1 and stdout == ""
    assert "000002.png" in err or "000004.png" in err
    after = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert after == {**before, "000004.png": b"the user's own file"}  # nothing replaced, nothing added
    code, _, err = cli_sample(capsys, files["model"], folder, "--n", 1, "--first-image", 3, "--format", "png")
    assert code == 0, err
    assert (folder / "000003.png").exists() and (folder / "000004.png").read_bytes() == b"the user's own file"


@pytest.mark.parametrize("guidance", ["cfg", "classifier"])
def test_cli_guided_sampling_gives_the_same_images_for_every_batch_size(files, tmp_path, capsys, guidance):
    n = 5
    if guidance == "cfg":
        checkpoint, extra = files["cond"], ("--class", 4, 1, "--guidance-scale", 2.5)
        trained = load_trained_model(checkpoint)
        guided = classifier_free_guidance(trained.model, torch.tensor([4, 1, 4, 1, 4]), 2.5, NUM_CLASSES)
    else:
        checkpoint, extra = files["model"], ("--classifier", files["classifier"], "--class", 3, 0,
                                             "--classifier-scale", 4)
        trained = load_trained_model(checkpoint)
        guided = classifier_guidance(trained.model, load_classifier(files["classifier"]).classifier,
                                     torch.tensor([3, 0, 3, 0, 3]), 4.0, trained.diffusion.alphas_cumprod)
    expected = run(trained, n, model=guided, sampler="dpm++2m-sde", batch_size=n, seed=5)
    expected_u8 = ((expected + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy().astype(int)
    for batch_size in (1, 2, n):
        out = tmp_path / f"b{batch_size}.npz"
        code, _, err = cli_sample(capsys, checkpoint, out, "--n", n, "--batch-size", batch_size, "--format", "npz",
                                  *extra)
        assert code == 0, err
        images = npz_images(out)[0].astype(int)
        # one uint8 level at most: float rounding of differently batched arithmetic may flip a level
        assert np.abs(images - expected_u8).max() <= 1 and (images != expected_u8).mean() < 0.05, batch_size


def test_cli_bad_first_image_is_one_line_and_writes_nothing(files, tmp_path, capsys):
    for value, fragment in [(-1, "--first-image: expected 0..2**32 - n = 4294967292"),
                            (2**32 - 3, "got 4294967293")]:
        out = tmp_path / "never.png"
        code, stdout, err = cli_sample(capsys, files["model"], out, "--n", 4, "--first-image", value)
        assert code == 2 and fragment in err and err.count("\n") == 1, err
        assert not out.exists() and stdout == ""
