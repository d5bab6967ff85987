"""Noisy-classifier checkpoints: how diffcore writes a :class:`~diffcore.guidance.NoisyClassifier` and reads it back
for classifier guidance (``diffcore sample --classifier PATH``).

    losses = train_noisy_classifier(classifier, images, labels, diffusion.alphas_cumprod)
    save_classifier("clf/", classifier, diffusion.alphas_cumprod)
    loaded = load_classifier("clf/", device="cpu")
    check_classifier_fits(loaded, diffusion, image_shape)      # names any mismatch with the diffusion model
    guided = classifier_guidance(model, loaded.classifier, y, 2.0, diffusion.alphas_cumprod)

The file format is a diffcore checkpoint directory (:mod:`diffcore.checkpoint`: written atomically, every file's
SHA-256 verified on load, no pickle): ``model.safetensors`` holds the classifier's weights, ``config.json`` is
``{"kind": "noisy-classifier", "version": 1, "architecture": A, "classifier": <A's config>.to_dict(),
"image_shape": [C, H, W], "num_timesteps": T}`` and the training state holds ``alphas_cumprod``, the float64 abar
table ``[T]`` of the process the classifier was trained on, so that a classifier is never paired with another noise
schedule unnoticed. The architecture A is ``"noisy-classifier"`` (diffcore's :class:`NoisyClassifier` with a
``UNetConfig``; also when the key is absent, as in the first checkpoints) or ``"adm-encoder"`` (guided-diffusion's
classifier network, :class:`~diffcore.unet.encoder.EncoderClassifier` with an ``EncoderConfig``, as ``diffcore
convert --from adm-classifier`` writes it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from .. import checkpoint as ck
from ..unet.config import UNetConfig
from ..unet.encoder import EncoderClassifier, EncoderConfig
from .noisy_classifier import NoisyClassifier

__all__ = ["CLASSIFIER_KIND", "LoadedClassifier", "save_classifier", "load_classifier", "check_classifier_fits"]

CLASSIFIER_KIND = "noisy-classifier"  #: ``config.json["kind"]`` of a noisy-classifier checkpoint
_VERSION = 1
#: ``config.json["architecture"]`` -> (network class, its config class); absent means "noisy-classifier"
ARCHITECTURES = {"noisy-classifier": (NoisyClassifier, UNetConfig), "adm-encoder": (EncoderClassifier, EncoderConfig)}
#: a classifier network a checkpoint can hold
SavedClassifier = Union[NoisyClassifier, EncoderClassifier]
#: largest |abar difference| between the classifier's and the diffusion model's tables that counts as the same schedule
ABAR_TOLERANCE = 1e-9


@dataclass(frozen=True)
class LoadedClassifier:
    """A noisy classifier read by :func:`load_classifier`: ``classifier`` (eval mode, no parameter gradients, on the
    requested device), ``alphas_cumprod`` (float64 ``[T]`` on the CPU: the process it was trained on),
    ``image_shape`` ``(C, H, W)`` it was trained at, ``path`` and ``step``."""

    classifier: SavedClassifier
    alphas_cumprod: torch.Tensor
    image_shape: tuple[int, int, int]
    path: Path
    step: int

    @property
    def num_classes(self) -> int:
        """K, the number of classes (labels 0..K-1)."""
        return self.classifier.num_classes

    @property
    def num_timesteps(self) -> int:
        """T of the process the classifier was trained on."""
        return int(self.alphas_cumprod.numel())


def _check_abar(alphas_cumprod: Any, name: str = "alphas_cumprod") -> torch.Tensor:
    if not isinstance(alphas_cumprod, torch.Tensor) or alphas_cumprod.dtype != torch.float64 \
            or alphas_cumprod.dim() != 1 or alphas_cumprod.numel() < 1:
        got = (f"a {alphas_cumprod.dtype} tensor of shape {tuple(alphas_cumprod.shape)}"
               if isinstance(alphas_cumprod, torch.Tensor) else type(alphas_cumprod).__name__)
        raise TypeError(f"{name}: expected the 1-D float64 abar table [T] of the diffusion, got {got}")
    return alphas_cumprod


def save_classifier(path: "str | os.PathLike", classifier: SavedClassifier, alphas_cumprod: torch.Tensor, *,
                    image_shape: Optional[Sequence[int]] = None, step: int = 0, overwrite: bool = False) -> Path:
    """Write ``classifier`` as a noisy-classifier checkpoint directory at ``path`` (atomically; see the module notes).

    Args:
        classifier: a :class:`NoisyClassifier` or an :class:`~diffcore.unet.encoder.EncoderClassifier` (its config
            and weights are saved).
        alphas_cumprod: float64 ``[T]`` abar of the (original, not respaced) process it was trained on.
        image_shape: ``(C, H, W)`` it was trained at (default ``(in_channels, image_size, image_size)``).
        step: training steps done (recorded). overwrite: replace an existing diffcore checkpoint at ``path``
            (anything else there is refused and left untouched, :func:`diffcore.checkpoint.save_checkpoint`).
    Returns the path written.
    """
    architecture = next((name for name, (cls, _) in ARCHITECTURES.items() if type(classifier) is cls), None)
    if architecture is None:
        raise TypeError(f"classifier: expected a NoisyClassifier or an EncoderClassifier, got "
                        f"{type(classifier).__name__}")
    abar = _check_abar(alphas_cumprod).detach().to("cpu")
    cfg = classifier.config
    shape = tuple(int(s) for s in image_shape) if image_shape is not None else \
        (cfg.in_channels, cfg.image_size, cfg.image_size)
    if len(shape) != 3 or shape[0] != cfg.in_channels or min(shape) < 1:
        raise ValueError(f"image_shape: expected (C, H, W) with C = {cfg.in_channels} (the classifier's "
                         f"in_channels), got {shape}")
    config = {"kind": CLASSIFIER_KIND, "version": _VERSION, "architecture": architecture,
              "classifier": cfg.to_dict(), "image_shape": list(shape), "num_timesteps": int(abar.numel())}
    return ck.save_checkpoint(path, model=classifier.state_dict(), config=config, step=step,
                              state={"alphas_cumprod": abar}, overwrite=overwrite)


def _config_field(config: Mapping[str, Any], name: str, where: str) -> Any:
    if name not in config:
        raise ck.CheckpointError(f"{where}: config.json lacks {name!r}")
    return config[name]


def load_classifier(path: "str | os.PathLike", device: "torch.device | str" = "cpu") -> LoadedClassifier:
    """Read a checkpoint written by :func:`save_classifier` (every file verified against its SHA-256).

    Returns a :class:`LoadedClassifier` on ``device``. Raises :class:`~diffcore.checkpoint.CheckpointError` for
    anything else, with one line saying what the path is instead: a missing path, a folder that is not a diffcore
    checkpoint, a diffusion-model checkpoint, a damaged one, or weights that do not fit the stored config.
    """
    path = Path(path)
    where = f"classifier {path}"
    if not path.exists():
        raise ck.CheckpointError(f"{where}: no such file or folder")
    if not ck.is_checkpoint(path):
        what = "a file" if path.is_file() else "a folder without a diffcore checkpoint (manifest.json)"
        raise ck.CheckpointError(f"{where}: expected a noisy-classifier checkpoint folder written by "
                                 f"diffcore.guidance.save_classifier, got {what}")
    loaded = ck.load_checkpoint(path, load_state=True)
    config = loaded.config
    if config.get("kind") != CLASSIFIER_KIND:
        what = ("a diffusion-model checkpoint" if "model" in config and "num_timesteps" in config
                else f"a checkpoint of kind {config.get('kind')!r}")
        raise ck.CheckpointError(f"{where}: expected a noisy-classifier checkpoint (config kind "
                                 f"{CLASSIFIER_KIND!r}, written by diffcore.guidance.save_classifier), got {what}")
    version = _config_field(config, "version", where)
    if version != _VERSION:
        raise ck.CheckpointError(f"{where}: noisy-classifier format version {version!r} is not supported "
                                 f"(this diffcore reads version {_VERSION})")
    architecture = config.get("architecture", "noisy-classifier")
    if architecture not in ARCHITECTURES:
        raise ck.CheckpointError(f"{where}: unknown classifier architecture {architecture!r} (this diffcore reads "
                                 f"{', '.join(ARCHITECTURES)})")
    network, config_class = ARCHITECTURES[architecture]
    try:
        cfg = config_class.from_dict(_config_field(config, "classifier", where))
        classifier = network(cfg)
    except (TypeError, ValueError) as error:
        raise ck.CheckpointError(f"{where}: invalid classifier config: {error}") from None
    shape = _config_field(config, "image_shape", where)
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and s >= 1 for s in shape)):
        raise ck.CheckpointError(f"{where}: config.json image_shape must be [C, H, W], got {shape!r}")
    abar = loaded.state.get("alphas_cumprod")
    try:
        abar = _check_abar(abar, f"{where}: alphas_cumprod")
    except TypeError as error:
        raise ck.CheckpointError(str(error)) from None
    if abar.numel() != _config_field(config, "num_timesteps", where):
        raise ck.CheckpointError(f"{where}: num_timesteps {config['num_timesteps']} differs from its abar table's "
                                 f"length {abar.numel()}")
    ck.load_state_strict(classifier, loaded.model, what=where)
    classifier = classifier.to(device).eval().requires_grad_(False)
    return LoadedClassifier(classifier, abar, tuple(shape), loaded.path, loaded.step)


def check_classifier_fits(loaded: LoadedClassifier, diffusion: Any, image_shape: Sequence[int]) -> None:
    """Raise ValueError naming the mismatch when ``loaded`` cannot guide a model of ``diffusion`` (the original,
    not respaced, process) making images of ``image_shape`` ``(C, H, W)``: another T, another noise schedule
    (abar tables differing by more than 1e-9), or another image shape."""
    T = int(diffusion.num_timesteps)
    if loaded.num_timesteps != T:
        raise ValueError(f"classifier {loaded.path}: trained on T = {loaded.num_timesteps} timesteps, the "
                         f"diffusion model has T = {T}")
    model_abar = diffusion.alphas_cumprod.detach().to("cpu", torch.float64)
    gap = float((model_abar - loaded.alphas_cumprod).abs().max())
    if not gap <= ABAR_TOLERANCE:
        raise ValueError(f"classifier {loaded.path}: trained on another noise schedule than the diffusion model's "
                         f"(abar differs by up to {gap:.3g}; same T = {T})")
    shape = tuple(int(s) for s in image_shape)
    if shape != loaded.image_shape:
        raise ValueError(f"classifier {loaded.path}: trained on {'x'.join(map(str, loaded.image_shape))} images, "
                         f"the diffusion model makes {'x'.join(map(str, shape))}")
