"""Evaluating a trained model: sample quality (FID, KID, precision, recall, with the real-against-real floor) and
bits/dim on held-out images; the work behind ``diffcore eval``.

    trained = load_trained_model("runs/fmnist")
    report = evaluate_model(trained.model, trained.diffusion, trained.image_shape, n=1000, steps=50)
    print(format_report(report)); report.to_dict()

Quality is measured by :func:`diffcore.metrics.score_samples` in the feature space of diffcore's shipped Fashion-MNIST
classifier, not Inception: the numbers compare **within this project only**, and only at equal sample counts (FID
and KID are biased by the count; the floor, two disjoint halves of the real images at the same count, is what a
perfect generator would score). Models trained with ``pad_to`` (e.g. 28 -> 32) are cropped back to 28 x 28.

``precision=`` and ``compile=`` mean what they mean in :func:`diffcore.sample` and apply to every model call (the
samples and the bits/dim); the scoring classifier always runs in float32. The model is compiled once per call.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..runtime import DEFAULT_PRECISION, Precision, compile_model, precision_context, resolve_precision
from ..samplers import SamplerName

__all__ = ["EvalReport", "BpdSummary", "load_real_images", "generate", "to_classifier_input", "bits_per_dim",
           "evaluate_model", "format_report"]

CLASSIFIER_SHAPE = (1, 28, 28)


@dataclass(frozen=True)
class BpdSummary:
    """Negative log-likelihood bound on held-out images in bits per dimension (images in [-1, 1], 256 bins):
    ``bpd`` the mean over ``num_images`` of the per-image bound, ``bpd_sem`` its standard error, ``prior_bpd``
    and ``decoder_bpd`` the means of the bound's prior (KL at T) and decoder (t = 0) terms, from ``batches``
    batches of ``batch_size`` (one model call per timestep and batch)."""

    bpd: float
    bpd_sem: Optional[float]
    prior_bpd: float
    decoder_bpd: float
    num_images: int
    batches: int
    batch_size: int


@dataclass(frozen=True)
class EvalReport:
    """What :func:`evaluate_model` measured. ``metrics``: FID, KID (mean, std), precision, recall of the samples
    against real images, ``floor``: the same for real held-out images (both with ``num_samples`` images per set,
    classifier features); ``bpd``: :class:`BpdSummary` or None; ``settings``: how the samples were drawn;
    ``seconds``: wall time of sampling, scoring and bpd."""

    metrics: dict[str, float]
    floor: dict[str, float]
    num_samples: int
    bpd: Optional[BpdSummary]
    settings: dict[str, Any]
    seconds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary (``bpd`` as a dictionary or None)."""
        out = asdict(self)
        out["note"] = ("FID/KID/precision/recall in the feature space of diffcore's Fashion-MNIST classifier (not "
                       "Inception): compare within this project only, at equal sample counts; 'floor' is real "
                       "held-out images scored the same way")
        return out


def load_real_images(source: str = "fashion_mnist") -> torch.Tensor:
    """The held-out real images: uint8 ``[N, C, H, W]``. ``"fashion_mnist"`` is the Fashion-MNIST test split (10000
    images, from Debian's dataset-fashion-mnist package; see :func:`diffcore.data.load_fashion_mnist`); otherwise a
    folder of (Fashion-)MNIST IDX files (its test split) or a .npy/.npz array
    (see :func:`diffcore.data.open_dataset`)."""
    from ..data import open_dataset

    return open_dataset(source, split="test").images


def _pad_offsets(image_shape: Sequence[int]) -> tuple[int, int]:
    """(top, left) of the 28 x 28 Fashion-MNIST image inside a padded single-channel model image."""
    c, h, w = (int(s) for s in image_shape)
    if c != 1 or h < 28 or w < 28:
        raise ValueError(f"image_shape: the evaluation compares with 1x28x28 Fashion-MNIST images (in the shipped "
                         f"classifier's feature space); the model makes {c}x{h}x{w} images")
    return (h - 28) // 2, (w - 28) // 2


def to_classifier_input(images: torch.Tensor) -> torch.Tensor:
    """Model images ``[N, 1, H, W]`` (H, W >= 28; larger when trained with ``pad_to``) -> the centred
    ``[N, 1, 28, 28]`` crop (ImageDataset pads symmetrically, so this undoes it)."""
    top, left = _pad_offsets(images.shape[1:])
    return images[:, :, top:top + 28, left:left + 28]


@torch.no_grad()
def generate(model, diffusion, image_shape: Sequence[int], n: int, *, steps: int = 50, eta: float = 0.0,
             sampler: SamplerName = "ddim", seed: int = 0, batch_size: int = 250,
             device: "torch.device | str | None" = None, progress: bool = True,
             skip_type: "str | None" = None, precision: Precision = DEFAULT_PRECISION,
             compile: bool = False) -> torch.Tensor:
    """``n`` samples as float32 ``[n, C, H, W]`` in [-1, 1] on the CPU, in batches of ``batch_size``: batch k is
    :func:`diffcore.sample` with seed ``seed + k`` (so the images depend on ``batch_size``); ``sampler`` "ddim"
    (``steps`` DDIM steps, ``eta``) or "ddpm" (ancestral on a process respaced to ``steps``), clip_denoised;
    ``skip_type`` the timestep spacing (default: :func:`diffcore.sample`'s, "uniform" for DDIM when steps divides
    T, "even" otherwise); ``precision`` and ``compile`` as in :func:`diffcore.sample` (the model is compiled once
    for all batches)."""
    from .sample import sample

    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"sampler: expected 'ddim' or 'ddpm', got {sampler!r}")
    if sampler == "ddpm" and eta != 0.0:
        raise ValueError(f"eta: applies to the ddim sampler only, got eta={eta} with sampler 'ddpm'")
    for name, value in (("n", n), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    _check_compile(compile)
    runner = compile_model(model) if compile else model
    parts = []
    starts = range(0, n, batch_size)
    for k, start in enumerate(tqdm(starts, desc="sampling", unit="batch", disable=not progress)):
        count = min(batch_size, n - start)
        images = sample(runner, n=count, sampler="ddim" if sampler == "ddim" else "ancestral", steps=steps,
                        eta=eta if sampler == "ddim" else None, seed=seed + k, device=device, diffusion=diffusion,
                        image_shape=image_shape, progress=False, skip_type=skip_type, clip_denoised=True,
                        precision=precision)
        parts.append(images.float().cpu())
    return torch.cat(parts)


@torch.no_grad()
def bits_per_dim(model, diffusion, real: torch.Tensor, image_shape: Sequence[int], *, batches: int,
                 batch_size: int = 64, seed: int = 0, device: "torch.device | str | None" = None,
                 progress: bool = True, precision: Precision = DEFAULT_PRECISION, compile: bool = False) -> BpdSummary:
    """The variational bound in bits/dim (:meth:`GaussianDiffusion.calc_bpd_loop`, all T timesteps) on
    ``batches`` batches of ``batch_size`` real images (uint8 ``[N, 1, 28, 28]``) drawn without replacement by a
    numpy Generator(seed), padded to ``image_shape`` as in training; x_t noise from torch generators seeded
    ``seed + k`` on ``device``. ``precision``: the model's calls run under autocast to
    :func:`diffcore.runtime.resolve_precision`'s dtype (the bound's terms are computed in float32 from its outputs);
    ``compile``: through :func:`diffcore.runtime.compile_model`."""
    from ..data import ImageDataset

    for name, value in (("batches", batches), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    if batches * batch_size > real.shape[0]:
        raise ValueError(f"batches: {batches} batches of {batch_size} need {batches * batch_size} real images, "
                         f"there are {real.shape[0]}")
    if tuple(real.shape[1:]) != CLASSIFIER_SHAPE:
        raise ValueError(f"real: expected uint8 images [N, 1, 28, 28], got {tuple(real.shape)}")
    size = int(image_shape[-1])
    _pad_offsets(image_shape)
    dataset = ImageDataset(real, pad_to=size if size != 28 else None)
    device = torch.device(device) if device is not None else diffusion.device
    dtype = resolve_precision(precision, device)
    _check_compile(compile)
    runner = compile_model(model) if compile else model
    diffusion = diffusion.to(device)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(real.shape[0])[:batches * batch_size])
    totals, priors, decoders = [], [], []
    for k in tqdm(range(batches), desc="bits/dim", unit="batch", disable=not progress):
        x0, _ = dataset.batch(order[k * batch_size:(k + 1) * batch_size])
        generator = torch.Generator(device=device).manual_seed(seed + k)
        with precision_context(dtype, device):
            result = diffusion.calc_bpd_loop(runner, x0.to(device), generator=generator, progress=False)
        totals.append(result.total_bpd.double().cpu())
        priors.append(result.prior_bpd.double().cpu())
        decoders.append(result.decoder_bpd.double().cpu())
    total = torch.cat(totals)
    sem = float(total.std() / math.sqrt(total.numel())) if total.numel() > 1 else None
    return BpdSummary(bpd=float(total.mean()), bpd_sem=sem, prior_bpd=float(torch.cat(priors).mean()),
                      decoder_bpd=float(torch.cat(decoders).mean()), num_images=int(total.numel()),
                      batches=batches, batch_size=batch_size)


def _check_compile(compile: Any) -> None:
    if not isinstance(compile, bool):
        raise TypeError(f"compile: expected a bool, got {type(compile).__name__}")


def _metrics_dict(m) -> dict[str, float]:
    return {"fid": m.fid, "kid_mean": m.kid_mean, "kid_std": m.kid_std, "precision": m.precision,
            "recall": m.recall}


def evaluate_model(model, diffusion, image_shape: Sequence[int], *, n: int = 1000, steps: int = 50,
                   eta: float = 0.0, sampler: SamplerName = "ddim", seed: int = 0, batch_size: int = 250,
                   real: Optional[torch.Tensor] = None, bpd_batches: int = 0, bpd_batch_size: int = 64,
                   device: "torch.device | str | None" = None, progress: bool = True,
                   precision: Precision = DEFAULT_PRECISION, compile: bool = False) -> EvalReport:
    """Sample ``n`` images (:func:`generate`) and score them against ``real`` (uint8 ``[N, 1, 28, 28]``, default
    the Fashion-MNIST test split; needs N >= 2n) with :func:`diffcore.metrics.score_samples` (``with_floor``, split by
    ``seed``); with ``bpd_batches`` > 0 also :func:`bits_per_dim` on that many batches. ``precision`` and
    ``compile`` as in :func:`diffcore.sample`, for the samples and the bits/dim (compiled once). Returns an
    :class:`EvalReport` (its settings record precision, the dtype it resolved to, and compile)."""
    import time

    from ..metrics import score_samples

    _pad_offsets(image_shape)
    _check_compile(compile)
    dtype = resolve_precision(precision, device if device is not None else diffusion.device)
    compiled = compile
    if compile:
        model = compile_model(model)
    if real is None:
        real = load_real_images()
    if real.shape[0] < 2 * n:
        raise ValueError(f"n: the real-against-real floor needs 2n = {2 * n} real images, there are {real.shape[0]} "
                         f"(use n <= {real.shape[0] // 2})")
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    images = generate(model, diffusion, image_shape, n, steps=steps, eta=eta, sampler=sampler, seed=seed,
                      batch_size=batch_size, device=device, progress=progress, precision=precision)
    seconds["sampling"] = time.perf_counter() - started
    started = time.perf_counter()
    scores = score_samples(to_classifier_input(images), real, with_floor=True, seed=seed, progress=progress)
    seconds["scoring"] = time.perf_counter() - started
    bpd = None
    if bpd_batches:
        started = time.perf_counter()
        bpd = bits_per_dim(model, diffusion, real, image_shape, batches=bpd_batches, batch_size=bpd_batch_size,
                           seed=seed, device=device, progress=progress, precision=precision)
        seconds["bpd"] = time.perf_counter() - started
    settings = {"sampler": sampler, "steps": steps, "eta": eta if sampler == "ddim" else None, "seed": seed,
                "batch_size": batch_size, "num_timesteps": diffusion.num_timesteps, "image_shape": list(image_shape),
                "num_real": int(real.shape[0]), "k": scores.k, "precision": precision,
                "dtype": str(dtype).replace("torch.", ""), "compile": compiled}
    return EvalReport(metrics=_metrics_dict(scores), floor=_metrics_dict(scores.floor), num_samples=n, bpd=bpd,
                      settings=settings, seconds=seconds)


def format_report(report: EvalReport) -> str:
    """A plain-text table: each metric for the model and for the real floor, then bits/dim if measured."""
    rows = [("FID", "fid"), ("KID", "kid_mean"), ("precision", "precision"), ("recall", "recall")]
    lines = [f"{'metric':<12}{'model':>12}{'real floor':>12}   (n = {report.num_samples} each; classifier "
             f"features, within-project only)"]
    for label, key in rows:
        lines.append(f"{label:<12}{report.metrics[key]:>12.5g}{report.floor[key]:>12.5g}")
    if report.bpd is not None:
        b = report.bpd
        sem = "" if b.bpd_sem is None else f"+- {b.bpd_sem:.4f}, "
        lines.append(f"{'bits/dim':<12}{b.bpd:>12.4f}{'':>12}   ({sem}{b.num_images} test images; "
                     f"prior {b.prior_bpd:.2e}, decoder {b.decoder_bpd:.4f})")
    return "\n".join(lines)
