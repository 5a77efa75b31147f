"""A quality figure for generated digits: how many does a classifier trained on real MNIST label confidently?

The classifier is a small scikit-learn MLP fitted on the embedded mnist_5k digits minus a fixed held-out set of 256,
which serves as the real-image baseline. Samples larger than 28 x 28 (32 x 32 from models trained on padded MNIST)
are center-cropped to 28.
Classifiers are over-confident far from their data (pure noise would get "confident" labels), so the MLP also learns
an eleventh "not a digit" class from pixel-shuffled digits, blotches and noise; an image labelled that way never
counts as confident. (Sloppy but readable digits are not junk: they simply get lower confidence.)
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from runtime.errors import DDPMError
from evaluation.fid import FeatureStats
from evaluation.frechet import frechet_from_stats, gaussian_stats
from train.data import mnist_arrays

HELD_OUT = 256
CONFIDENT = 0.9
NOT_A_DIGIT = 10


@functools.lru_cache(maxsize=1)
def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, held-out images, held-out labels); the mnist file is sorted by label, so
    the split comes from a fixed permutation."""
    digits, labels = mnist_arrays()
    order = np.random.default_rng(0).permutation(len(digits))
    train, held = order[:-HELD_OUT], order[-HELD_OUT:]
    return digits[train], labels[train], digits[held], labels[held]


def _non_digits(digits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Examples of what a failed sampler draws: pixel-shuffled digits (ink without strokes), blotches, noise."""
    n = len(digits) // 8
    shuffled = rng.permuted(digits[rng.integers(len(digits), size=n)].reshape(n, -1), axis=1).reshape(n, 28, 28)
    coarse = rng.uniform(0, 255, (n, 7, 7)).repeat(4, axis=1).repeat(4, axis=2)
    white = rng.uniform(0, 255, (n, 28, 28)) * (rng.uniform(size=(n, 1, 1)) < 0.5)
    return np.concatenate([shuffled, coarse, white])


@functools.lru_cache(maxsize=1)
def _classifier():
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    images, labels, _, _ = _split()
    junk = _non_digits(images, np.random.default_rng(1))
    x = np.concatenate([images.astype(np.float64), junk]).reshape(-1, 28 * 28) / 255.0
    y = np.concatenate([labels, np.full(len(junk), NOT_A_DIGIT)])
    clf = MLPClassifier(hidden_layer_sizes=(128,), alpha=1e-3, max_iter=60, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # 60 epochs are plenty for a ranking figure
        clf.fit(x, y)
    return clf


def held_out_real() -> tuple[np.ndarray, np.ndarray]:
    """The 256 real digits the classifier never saw, as N x 28 x 28 x 1 uint8, and their labels."""
    _, _, images, labels = _split()
    return images[..., None], labels


def _as_28x28(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DDPMError(f"classify wants N x H x W x C uint8 images (C = 1 or 3), got {images.dtype} "
                        f"{images.shape}")
    gray = images.astype(np.float64).mean(axis=-1)
    h, w = gray.shape[1:]
    if h < 28 or w < 28:
        raise DDPMError(f"images must be at least 28 x 28 to classify as digits, got {h} x {w}")
    top, left = (h - 28) // 2, (w - 28) // 2
    return gray[:, top : top + 28, left : left + 28]


def classify(images_uint8_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels (0-9, or 10 = not a digit) and their probabilities for N x H x W x C uint8 images (32 x 32 are
    cropped to 28 x 28)."""
    x = _as_28x28(images_uint8_nhwc)
    probs = _classifier().predict_proba(x.reshape(len(x), -1) / 255.0)
    return probs.argmax(axis=1), probs.max(axis=1)


def features(images_uint8_nhwc: np.ndarray) -> np.ndarray:
    """The classifier's hidden-layer activations (N x 128, ReLU), the feature space of `digit_frechet`."""
    x = _as_28x28(images_uint8_nhwc).reshape(len(images_uint8_nhwc), -1) / 255.0
    clf = _classifier()
    return np.maximum(x @ clf.coefs_[0] + clf.intercepts_[0], 0.0)


@functools.lru_cache(maxsize=1)
def _reference_stats() -> tuple[np.ndarray, np.ndarray]:
    digits, _ = mnist_arrays()
    return gaussian_stats(features(digits[..., None]))


def digit_frechet(images_uint8_nhwc: np.ndarray) -> float:
    """Frechet distance between the images and all 5,000 real digits in the classifier's features (an FID for
    digits). Small samples carry a bias of their own, so compare figures at equal N."""
    return frechet_from_stats(*gaussian_stats(features(images_uint8_nhwc)), *_reference_stats())


@dataclass
class DigitQuality:
    """Share of confidently classified images and how they spread over the ten classes."""

    n: int
    confident_fraction: float
    histogram: np.ndarray  # counts of predicted labels 0-9, then "not a digit"

    @classmethod
    def of(cls, images_uint8_nhwc: np.ndarray) -> "DigitQuality":
        labels, conf = classify(images_uint8_nhwc)
        confident = (conf >= CONFIDENT) & (labels != NOT_A_DIGIT)
        return cls(len(labels), float(np.mean(confident)), np.bincount(labels, minlength=NOT_A_DIGIT + 1))


def digit_scores(batches: Iterable[np.ndarray]) -> tuple[DigitQuality, float]:
    """`DigitQuality.of` and `digit_frechet` of all images of uint8 N x H x W x C batches, one batch in memory at a
    time: labels count per image and the Frechet statistics add up (`evaluation.fid.FeatureStats`)."""
    stats, histogram, confident = FeatureStats(), np.zeros(NOT_A_DIGIT + 1, np.int64), 0
    for batch in batches:
        labels, conf = classify(batch)
        histogram += np.bincount(labels, minlength=NOT_A_DIGIT + 1)
        confident += int(np.sum((conf >= CONFIDENT) & (labels != NOT_A_DIGIT)))
        stats.add(features(batch))
    mu, cov = stats.mean_cov()
    return DigitQuality(stats.n, confident / stats.n, histogram), frechet_from_stats(mu, cov, *_reference_stats())
