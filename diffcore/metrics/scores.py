"""All sample-quality metrics at once, on features or on images, with the real-against-real floor.

The image-level :func:`score_samples` embeds images with diffcore's shipped Fashion-MNIST classifier (not Inception), so
its FID/KID/precision/recall compare **within the project only**, at equal sample counts: FID and KID are biased
by the number of samples and precision/recall depend on the set sizes. The floor (two disjoint halves of the real
set, each of the generated set's count) is what a perfect generator would score at that count.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch

from .checks import as_features, positive_int, same_dim
from .classifier import FashionMNISTClassifier, extract_features, load_feature_extractor, prepare_images
from .frechet import fid_from_features
from .kid import kid_from_features
from .precision_recall import precision_recall


@dataclass(frozen=True)
class Metrics:
    """Sample-quality metrics of a generated set against a real one, in the classifier's feature space.

    ``fid``: Frechet distance (squared feature units, >= 0); ``kid_mean``/``kid_std``: KID over subsets
    (dimensionless); ``precision``/``recall``: fractions in [0, 1] with ``k`` nearest neighbours; ``num_generated``
    and ``num_real``: sample counts used; ``floor``: the same metrics for real held-out images against the same
    reference (None unless asked for). Within-project numbers only: not Inception FID/KID.
    """

    fid: float
    kid_mean: float
    kid_std: float
    precision: float
    recall: float
    num_generated: int
    num_real: int
    k: int
    floor: Optional["Metrics"] = None


def compute_metrics(generated: np.ndarray | torch.Tensor, real: np.ndarray | torch.Tensor, *, k: int = 3,
                    kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0,
                    batch_size: int = 1024) -> Metrics:
    """FID, KID, precision and recall of ``generated`` features ``[N, D]`` against ``real`` features ``[M, D]``
    (N, M > k and >= 2). ``seed`` draws the KID subsets; ``batch_size`` bounds the distance blocks."""
    g = as_features("generated", generated, min_rows=2)
    r = as_features("real", real, min_rows=2)
    same_dim("generated", g, "real", r)
    kid = kid_from_features(g, r, num_subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    pr = precision_recall(g, r, k=k, batch_size=batch_size)
    return Metrics(fid=fid_from_features(g, r), kid_mean=kid.mean, kid_std=kid.std, precision=pr.precision,
                   recall=pr.recall, num_generated=g.shape[0], num_real=r.shape[0], k=pr.k)


def split_real(num_real: int, num_samples: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint random index sets of ``num_samples`` each from ``range(num_real)`` -> (reference, held_out),
    int64 ``[num_samples]`` each (numpy Generator(seed)). Needs ``2 * num_samples <= num_real``."""
    num_real = positive_int("num_real", num_real)
    num_samples = positive_int("num_samples", num_samples)
    if 2 * num_samples > num_real:
        raise ValueError(f"num_samples: the floor needs two disjoint halves of {num_samples} real samples, i.e. "
                         f"{2 * num_samples}, but the real set has only {num_real}")
    perm = np.random.default_rng(seed).permutation(num_real)
    return perm[:num_samples], perm[num_samples:2 * num_samples]


def real_floor(real: np.ndarray | torch.Tensor, num_samples: int, *, seed: int = 0, k: int = 3,
               kid_subsets: int = 100, kid_subset_size: int = 1000, batch_size: int = 1024) -> Metrics:
    """Real-against-real floor on features: split ``real`` ``[M, D]`` into two disjoint random halves of
    ``num_samples`` (the generated set's count; 2 * num_samples <= M) and score the held-out half against the
    reference half with :func:`compute_metrics` (same options; ``seed`` picks the split and the KID subsets).
    """
    r = as_features("real", real, min_rows=2)
    reference, held_out = split_real(r.shape[0], num_samples, seed=seed)
    return compute_metrics(r[held_out], r[reference], k=k, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                           seed=seed, batch_size=batch_size)


def score_samples(generated: torch.Tensor | np.ndarray, real: torch.Tensor | np.ndarray, *,
             extractor: FashionMNISTClassifier | None = None, with_floor: bool = False, seed: int = 0, k: int = 3,
             kid_subsets: int = 100, kid_subset_size: int = 1000, batch_size: int = 500,
             progress: bool = False) -> Metrics:
    """Score ``generated`` images against ``real`` images in the shipped classifier's feature space.

    Images: float ``[N, 1, 28, 28]`` in [-1, 1] (or uint8 pixels, or ``[N, 28, 28]``; see
    ``classifier.prepare_images``). ``extractor`` defaults to :func:`load_feature_extractor` (the shipped weights).

    Without ``with_floor`` all of ``real`` is the reference. With ``with_floor``, ``real`` must hold at least 2N
    images: two disjoint random halves of N are drawn (``seed``); generated images are scored against the first
    (the reference) and ``floor`` holds the second half's scores against the same reference, so both use the same
    counts. These numbers compare within diffcore only: the features are not Inception's. Read precision together
    with FID and recall: far out-of-distribution images (uniform noise) map inside the real k-NN manifold in this
    feature space and can score a high precision while their FID is huge and their recall ~0.
    """
    gen = prepare_images("generated", generated)
    ref = prepare_images("real", real)
    model = extractor if extractor is not None else load_feature_extractor(device=gen.device)
    options = dict(k=k, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, seed=seed)
    gen_features = extract_features(gen, model, batch_size=batch_size, progress=progress)
    if not with_floor:
        return compute_metrics(gen_features, extract_features(ref, model, batch_size=batch_size, progress=progress),
                               **options)
    reference, held_out = split_real(ref.shape[0], gen.shape[0], seed=seed)
    both = extract_features(ref[torch.as_tensor(np.concatenate([reference, held_out]))], model,
                            batch_size=batch_size, progress=progress)
    ref_features, held_features = both[:len(reference)], both[len(reference):]
    result = compute_metrics(gen_features, ref_features, **options)
    return replace(result, floor=compute_metrics(held_features, ref_features, **options))
