"""The packaged default model: it loads, samples through the front door, and its samples are garments.

"Garments" is judged by the shipped Fashion-MNIST classifier (diffcore.metrics), an independent model: on the
packaged model's samples it must be confident and see several classes, far more than on noise images.
"""
from __future__ import annotations

import pytest
import torch

import diffcore
from diffcore.metrics import load_feature_extractor
from diffcore.pretrained import default_model_path

pytestmark = [
    pytest.mark.skipif(not (default_model_path() / "manifest.json").is_file(),
                       reason="the packaged model is not installed (scripts/train_default_model.sh makes it)"),
    pytest.mark.usefixtures("one_thread"),
]


def _confidence(images: torch.Tensor) -> tuple[float, int]:
    """Mean max-softmax probability of the shipped classifier, and the number of distinct predicted classes."""
    classifier = load_feature_extractor()
    with torch.no_grad():
        probs = classifier(images.float()).softmax(-1)
    return probs.max(-1).values.mean().item(), len(set(probs.argmax(-1).tolist()))


@pytest.mark.slow
def test_front_door_samples_packaged_garments():
    images = diffcore.sample(n=32, steps=25, seed=0, progress=False)
    assert images.shape == (32, 1, 28, 28)
    assert images.min() >= -1 and images.max() <= 1
    # the seed reproduces sample b whatever the batch size, up to the U-Net's batch-dependent float rounding, which
    # deterministic DDIM keeps at that size (ancestral sampling's 25 noise injections can amplify it to ~1e-3)
    ddim = diffcore.sample(n=8, steps=25, seed=0, sampler="ddim", progress=False)
    again = diffcore.sample(n=4, steps=25, seed=0, sampler="ddim", progress=False)
    torch.testing.assert_close(again, ddim[:4], rtol=0, atol=1e-4)
    torch.testing.assert_close(diffcore.sample(n=4, steps=25, seed=0, progress=False), images[:4], rtol=0, atol=1e-2)
    confidence, classes = _confidence(images)
    noise_confidence, _ = _confidence(torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert classes >= 5, classes
    assert confidence > 0.75 and confidence > noise_confidence + 0.1, (confidence, noise_confidence)


def test_packaged_model_config_is_the_recipe():
    bundle = diffcore.pretrained.load_default()
    assert bundle.image_shape == (1, 28, 28)
    assert bundle.config.variance_type == "learned_range" and bundle.config.schedule == "cosine"
