"""The Fashion-MNIST classifier whose penultimate layer is diffcore's feature space for FID, KID and precision/recall.

Standard FID uses Inception-v3 features, whose weights cannot be had offline. diffcore instead trains a small CNN on
Fashion-MNIST deterministically (``python -m reproduction.train_classifier``) and ships its weights in
``diffcore/assets/fmnist_classifier.safetensors``. Numbers measured in this feature space compare **within the
project only**: they are not Inception FID/KID and must not be put beside published values.

Features are the 128-d output of the penultimate linear layer, taken *before* its ReLU (so no unit is constant
zero), in float32; the metrics convert them to float64.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

#: Value of the ``format`` metadata key of a weights file this module can load.
WEIGHTS_FORMAT = "diffcore-fmnist-classifier-v1"
#: Dimension of the feature vectors.
FEATURE_DIM = 128
#: Number of Fashion-MNIST classes.
NUM_CLASSES = 10
#: File name of the shipped weights inside the package's ``assets`` folder.
ASSET_NAME = "fmnist_classifier.safetensors"
#: Tolerance on the [-1, 1] range of float images (values this far out are a bug upstream, not roundoff).
RANGE_TOLERANCE = 1e-3


def _conv_block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.MaxPool2d(2)]


class FashionMNISTClassifier(nn.Module):
    """Small CNN: three conv-BN-ReLU-maxpool stages (32, 64, 128 channels; 28 -> 14 -> 7 -> 3), then
    Linear(1152, 128) -> ReLU -> Dropout(0.3) -> Linear(128, 10). About 0.24 M parameters (1 MB in float32).

    Input: float32 ``[B, 1, 28, 28]`` images in [-1, 1] (pixel / 127.5 - 1).
    ``forward`` gives logits ``[B, 10]``; ``features`` gives the 128-d pre-activation of the penultimate layer.
    """

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(*_conv_block(1, 32), *_conv_block(32, 64), *_conv_block(64, 128), nn.Flatten())
        self.embed = nn.Linear(128 * 3 * 3, FEATURE_DIM)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.3), nn.Linear(FEATURE_DIM, NUM_CLASSES))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` float ``[B, 1, 28, 28]`` in [-1, 1] -> features float ``[B, 128]`` (pre-ReLU embedding)."""
        return self.embed(self.trunk(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` float ``[B, 1, 28, 28]`` in [-1, 1] -> class logits ``[B, 10]``."""
        return self.head(self.features(x))


def prepare_images(name: str, images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Check and convert images to the classifier's input: float32 ``[N, 1, 28, 28]`` in [-1, 1], same device.

    Accepts uint8 pixels (0..255, converted by ``x / 127.5 - 1``) or floats already in [-1, 1] (values within
    ``RANGE_TOLERANCE`` outside are clamped; further out is an error: clamp or rescale first), shaped
    ``[N, 1, 28, 28]`` or ``[N, 28, 28]``; numpy arrays or tensors. ``name`` is used in error messages.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or numpy array of images, got {type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        raise ValueError(f"{name}: expected images of shape [N, 1, 28, 28] or [N, 28, 28], got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one image, got an empty batch")
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / 127.5 - 1.0
    if not images.is_floating_point():
        raise TypeError(f"{name}: expected uint8 pixels or floats in [-1, 1], got dtype {images.dtype}")
    images = images.to(torch.float32)
    low, high = float(images.min()), float(images.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError(f"{name}: images contain NaN or infinite values")
    if low < -1.0 - RANGE_TOLERANCE or high > 1.0 + RANGE_TOLERANCE:
        raise ValueError(f"{name}: expected float images in [-1, 1], got values in [{low:.4g}, {high:.4g}] "
                         "(clamp with x.clamp(-1, 1) or rescale pixels by x / 127.5 - 1)")
    return images.clamp(-1.0, 1.0)


@torch.no_grad()
def extract_features(images: torch.Tensor | np.ndarray, extractor: FashionMNISTClassifier | None = None, *,
                     batch_size: int = 500, progress: bool = False) -> torch.Tensor:
    """Features of ``images`` (see :func:`prepare_images` for accepted forms) -> float64 CPU tensor ``[N, 128]``.

    Runs ``extractor`` (default: :func:`load_feature_extractor`) in eval mode on the extractor's device (images
    are moved there batch by batch), in batches of ``batch_size``; ``progress`` shows a tqdm bar.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    x = prepare_images("images", images)
    model = extractor if extractor is not None else load_feature_extractor()
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        out = [model.features(x[i:i + batch_size].to(device)).to("cpu", torch.float64)
               for i in tqdm(range(0, x.shape[0], batch_size), desc="features", disable=not progress, leave=False)]
    finally:
        model.train(was_training)
    return torch.cat(out)


def default_weights_path() -> Path:
    """Path of the shipped weights, ``diffcore/assets/fmnist_classifier.safetensors`` inside the package."""
    return Path(str(resources.files("diffcore").joinpath("assets", ASSET_NAME)))


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over the tensors of ``state`` in sorted name order (name, dtype, shape and raw bytes)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_weights(model: FashionMNISTClassifier, path: str | os.PathLike, metadata: dict[str, Any]) -> None:
    """Write ``model``'s weights to ``path`` (safetensors, atomically) with ``metadata`` (values become strings),
    plus ``format`` and ``weights_sha256`` (checked on load to detect corruption)."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta.update(format=WEIGHTS_FORMAT, weights_sha256=weights_digest(state))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata=meta)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a shipped asset must be readable by everyone
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_weights(path: str | os.PathLike | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read and verify a weights file (default: the shipped one) -> (state dict, metadata).

    Raises FileNotFoundError when it is missing and ValueError when it is not a valid, intact diffcore classifier
    file (unreadable, wrong ``format``, or tensors whose SHA-256 differs from the recorded one).
    """
    from safetensors import safe_open

    path = Path(path) if path is not None else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"feature-extractor weights not found at {path}; they ship with diffcore (diffcore/assets/{ASSET_NAME}) "
            f"and can be rebuilt with `python -m reproduction.train_classifier --out {path}`")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncated or garbled files
        raise ValueError(f"feature-extractor weights at {path} are corrupt or not a safetensors file: {exc}") from exc
    if meta.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"feature-extractor weights at {path}: expected metadata format {WEIGHTS_FORMAT!r}, "
                         f"got {meta.get('format')!r}")
    if meta.get("weights_sha256") != weights_digest(state):
        raise ValueError(f"feature-extractor weights at {path} are corrupt: their SHA-256 does not match the one "
                         "recorded when they were written")
    return state, meta


def load_feature_extractor(path: str | os.PathLike | None = None, *,
                           device: torch.device | str = "cpu") -> FashionMNISTClassifier:
    """The trained classifier (default: the weights shipped in the package; nothing is downloaded), in eval mode
    on ``device``. Its metadata (test accuracy, training command, ...) is in ``model.metadata`` (dict of str).

    Raises FileNotFoundError for a missing file, ValueError for a corrupt or incompatible one.
    """
    state, meta = read_weights(path)
    model = FashionMNISTClassifier()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"feature-extractor weights at {path or default_weights_path()} do not fit "
                         f"FashionMNISTClassifier: {exc}") from exc
    model.metadata = meta
    return model.to(device).eval()
