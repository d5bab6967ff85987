"""What every stage of the reproduction shares: settings, folders, the stored results, the real test images and a
scorer whose reference features are computed once."""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from diffcore.outputs import atomic_write_text
from diffcore.metrics import compute_metrics, extract_features, load_feature_extractor
from diffcore.metrics.frechet import fid_from_features
from diffcore.metrics import split_real
from reproduction.settings import ReproSettings


def machine_description() -> dict[str, Any]:
    """Where the numbers were measured: CPU model, core count, torch threads and version."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


class ResultStore:
    """Stage results as JSON files ``results/<stage>.json`` under the report folder, written atomically. A stored
    result carries the fingerprint of the settings it was computed with; :meth:`load` returns it only while the
    fingerprint matches (so a changed setting reruns the stage)."""

    def __init__(self, folder: "str | os.PathLike"):
        self.folder = Path(folder)

    def path(self, stage: str) -> Path:
        return self.folder / f"{stage}.json"

    def load(self, stage: str, fingerprint: Optional[str] = None) -> Optional[dict[str, Any]]:
        path = self.path(stage)
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        if fingerprint is not None and record.get("fingerprint") != fingerprint:
            return None
        return record

    def save(self, stage: str, fingerprint: str, data: dict[str, Any], seconds: float) -> dict[str, Any]:
        record = {"stage": stage, "fingerprint": fingerprint, "seconds": round(seconds, 1),
                  "machine": machine_description(), "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "data": data}
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path(stage), json.dumps(record, indent=1) + "\n")
        return record


def metrics_dict(m) -> dict[str, float]:
    """The numbers of a :class:`diffcore.metrics.Metrics` as a plain dictionary."""
    return {"fid": float(m.fid), "kid": float(m.kid_mean), "precision": float(m.precision),
            "recall": float(m.recall), "n": int(m.num_generated)}


class Scorer:
    """FID, KID, precision and recall against a fixed reference set of real test images.

    The Fashion-MNIST test split (uint8 ``[10000, 1, 28, 28]``) is split once (seed) into a reference set of
    ``num_reference`` images and a disjoint held-out pool; the held-out pool's first images serve as ground truth
    for restoration and inversion and as the real-against-real floor, so the floor of n images is exactly what a
    perfect generator of n images would score against the same reference.
    """

    def __init__(self, real: torch.Tensor, num_reference: int, seed: int):
        self.real = real
        self.reference_index, _ = split_real(real.shape[0], num_reference, seed=seed)
        self.held_out_index = np.random.default_rng(seed + 1).permutation(
            np.setdiff1d(np.arange(real.shape[0]), self.reference_index))
        self.extractor = load_feature_extractor()
        self.reference_features = extract_features(real[torch.as_tensor(self.reference_index)], self.extractor)
        self._floors: dict[int, dict[str, float]] = {}

    def held_out(self, n: int) -> torch.Tensor:
        """The first ``n`` held-out real images as float32 ``[n, 1, 28, 28]`` in [-1, 1]."""
        if n > len(self.held_out_index):
            raise ValueError(f"n: at most {len(self.held_out_index)} held-out images, asked for {n}")
        pixels = self.real[torch.as_tensor(self.held_out_index[:n])]
        return pixels.float() / 127.5 - 1.0

    def score(self, images: torch.Tensor, seed: int = 0) -> dict[str, float]:
        """Metrics of images ``[n, 1, 28, 28]`` in [-1, 1] against the reference set."""
        features = extract_features(images.clamp(-1, 1), self.extractor)
        return metrics_dict(compute_metrics(features, self.reference_features, kid_subset_size=1000, seed=seed))

    def fid_spread(self, n: int) -> dict[str, float]:
        """FID of every disjoint set of ``n`` held-out real images against the reference set: mean, standard
        deviation and count of sets. The spread is the sampling noise of an FID at that count (for real images;
        generated sets scatter similarly), so FID differences within about two standard deviations are ties."""
        sets = len(self.held_out_index) // n
        pixels = self.real[torch.as_tensor(self.held_out_index[:sets * n])].float() / 127.5 - 1.0
        features = extract_features(pixels, self.extractor)
        values = torch.tensor([fid_from_features(features[k * n:(k + 1) * n], self.reference_features)
                               for k in range(sets)], dtype=torch.float64)
        return {"mean": float(values.mean()), "std": float(values.std()), "sets": sets, "n": n}

    def floor(self, n: int) -> dict[str, float]:
        """The same metrics of the first ``n`` held-out real images (the floor at that count)."""
        if n not in self._floors:
            self._floors[n] = self.score(self.held_out(n))
        return self._floors[n]


@dataclass
class Context:
    """One reproduction run: ``settings``, the report folder ``out_dir`` (results/ and figures), ``work_dir`` for
    trained models, whether to show progress bars and whether to recompute stored stages (``force``)."""

    settings: ReproSettings
    out_dir: Path
    work_dir: Path
    progress: bool = True
    force: bool = False
    _scorer: Optional[Scorer] = field(default=None, repr=False)
    _real: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def store(self) -> ResultStore:
        return ResultStore(self.out_dir / "results")

    @property
    def figures(self) -> Path:
        path = self.out_dir / "figures"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def real(self) -> torch.Tensor:
        """The Fashion-MNIST test split, uint8 ``[10000, 1, 28, 28]``."""
        if self._real is None:
            from diffcore.pipelines.evaluate import load_real_images

            self._real = load_real_images()
        return self._real

    @property
    def scorer(self) -> Scorer:
        if self._scorer is None:
            self._scorer = Scorer(self.real, self.settings.num_samples, self.settings.seed)
        return self._scorer

    def packaged_model(self):
        """The packaged default model (``diffcore.pretrained.load_default()``) on the CPU."""
        from diffcore.pretrained import load_default

        return load_default()
