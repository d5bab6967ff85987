"""Sample-quality metrics: FID, KID, improved precision/recall, and the real-against-real floor.

Image-level numbers (:func:`score_samples`) are measured in the feature space of a small Fashion-MNIST classifier that
diffcore trains deterministically and ships (``diffcore/assets/fmnist_classifier.safetensors``), because Inception
weights cannot be had offline. They compare **within this project only**, at equal sample counts; they are not
the Inception FID/KID of the papers. The feature-level functions work on any features.
"""
from __future__ import annotations

from .classifier import (FashionMNISTClassifier, extract_features, load_feature_extractor, prepare_images)
from .scores import Metrics, compute_metrics, real_floor, score_samples, split_real
from .frechet import GaussianStats, fid_from_features, frechet_distance, gaussian_stats
from .kid import KIDResult, kid_from_features, mmd2_unbiased, polynomial_kernel
from .precision_recall import PrecisionRecall, fraction_inside, knn_radii_sq, precision_recall

__all__ = [
    "FashionMNISTClassifier", "extract_features", "load_feature_extractor", "prepare_images",
    "Metrics", "compute_metrics", "real_floor", "score_samples", "split_real",
    "GaussianStats", "fid_from_features", "frechet_distance", "gaussian_stats",
    "KIDResult", "kid_from_features", "mmd2_unbiased", "polynomial_kernel",
    "PrecisionRecall", "fraction_inside", "knn_radii_sq", "precision_recall",
]
