"""Recognise photos that are none of the model's classes ("out of scope").

A classifier trained on ten garment classes gives every input one of them, often with high
confidence: a belt becomes a Bag at 0.98. Confidence alone cannot tell "unsure between two
garments" from "not a garment at all". This module scores how far an input lies from the
training distribution and turns that score into a decision with a threshold fitted on
in-scope images only (a percentile: "flag 5% of in-scope images"), so that no out-of-scope
photo is needed to set it. Measurements and the choice of score: docs/out-of-scope.md.

Scores, all "higher = more out of scope":

- ``mahalanobis``: squared Mahalanobis distance of the penultimate features to the nearest
  class mean, with one covariance shared by the classes (Lee et al. 2018). Its statistics
  (class means, precision matrix) are fitted on training images and stored in the card.
- ``energy``: minus the log-sum-exp of the logits (Liu et al. 2020).
- ``max_softmax``: one minus the (calibrated) top probability.
- ``relative_mahalanobis``: the same minus the distance to one Gaussian over all training
  features (Ren et al. 2021); the best of these on real photos, and what ``Detector`` uses.
- ``ink_fraction``: the share of lit pixels of the 28x28 input, whose bounds catch blank
  pages and photos the background trim could not separate.

Everything here is pure numpy over arrays except ``features_and_logits``, which runs the
network once and returns what every score needs (the logits tagging already computes, and
the features the head reads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .model import GarmentNet
from .runtime import CPU_CHUNK

# A pixel of the model input (0-255, light on black) counts as ink above this level.
INK_LEVEL = 32
# Added to the diagonal of the shared covariance, relative to its mean variance: features
# that never vary in training (a dead channel) must not get an infinite weight.
SHRINKAGE = 1e-3


@torch.inference_mode()
def features_and_logits(model: GarmentNet, images: np.ndarray, batch_size: int = CPU_CHUNK
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features (N, D) and logits (N, classes) for uint8 images (N, [C,] H, W).

    The features are the globally pooled activations the head reads; with flip TTA they are
    averaged over the image and its mirror, so ``head(features)`` equals ``model(x)``.
    ``model`` may be a ``runtime.prepare_model`` copy (batch norm folded), as tagging runs it.
    """
    model = model.eval()
    feats, logits = [], []
    for start in range(0, len(images), batch_size):
        chunk = torch.from_numpy(np.array(images[start:start + batch_size]))  # a copy: inputs may be read-only
        x = (chunk.unsqueeze(1) if chunk.ndim == 3 else chunk).float().div_(255)
        x = x.contiguous(memory_format=torch.channels_last)
        f = _pooled(model, x)
        if model.config.flip_tta:
            f = (f + _pooled(model, x.flip(-1))) / 2
        feats.append(f.numpy())
        logits.append(model.head(f).numpy())
    d, k = model.head.in_features, model.head.out_features
    return (np.concatenate(feats) if feats else np.zeros((0, d), np.float32),
            np.concatenate(logits) if logits else np.zeros((0, k), np.float32))


def _pooled(model: GarmentNet, x: torch.Tensor) -> torch.Tensor:
    x = (x - model.mean) / model.std
    return torch.amax(model.features(x), dim=(2, 3))


@dataclass(frozen=True)
class FeatureGaussian:
    """Class means (K, D) and the shared precision matrix (D, D) of penultimate features."""

    means: np.ndarray
    precision: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (nested lists of float32-rounded numbers), for the model card."""
        return {"means": _to_lists(self.means), "precision": _to_lists(self.precision)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FeatureGaussian":
        means = np.asarray(data["means"], dtype=np.float64)
        precision = np.asarray(data["precision"], dtype=np.float64)
        if means.ndim != 2 or precision.shape != (means.shape[1], means.shape[1]):
            raise ValueError(f"feature statistics do not fit together: means {means.shape}, "
                             f"precision {precision.shape}")
        return cls(means, precision)


def _to_lists(a: np.ndarray) -> list[Any]:
    return np.asarray(a, dtype=np.float32).astype(float).tolist()


def fit_feature_gaussian(features: np.ndarray, labels: np.ndarray, num_classes: int) -> FeatureGaussian:
    """Class means and the shared (tied) covariance's inverse from training features."""
    features = np.asarray(features, dtype=np.float64)
    missing = sorted(set(range(num_classes)) - set(np.unique(labels).tolist()))
    if missing:
        raise ValueError(f"no training features for class(es) {missing}")
    means = np.stack([features[labels == k].mean(0) for k in range(num_classes)])
    centred = features - means[labels]
    cov = centred.T @ centred / len(features)
    cov += SHRINKAGE * float(np.trace(cov)) / len(cov) * np.eye(len(cov))
    return FeatureGaussian(means, np.linalg.inv(cov))


def mahalanobis(features: np.ndarray, gaussian: FeatureGaussian) -> np.ndarray:
    """Squared Mahalanobis distance to the nearest class mean, per row (N,)."""
    f = np.asarray(features, dtype=np.float64)
    p = gaussian.precision
    # (f - m)' P (f - m) = f'Pf - 2 f'Pm + m'Pm, for all classes at once.
    fp = f @ p
    d = (fp * f).sum(1, keepdims=True) - 2 * fp @ gaussian.means.T + ((gaussian.means @ p) * gaussian.means).sum(1)
    return np.maximum(d.min(1), 0.0)


def energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Minus the temperature-scaled log-sum-exp of the logits (N,)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    top = z.max(1)
    return -temperature * (top + np.log(np.exp(z - top[:, None]).sum(1)))


def max_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """One minus the top softmax probability (N,)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return 1.0 - (e / e.sum(1, keepdims=True)).max(1)


def relative_mahalanobis(features: np.ndarray, gaussian: FeatureGaussian, background: FeatureGaussian) -> np.ndarray:
    """Class distance minus the distance to one Gaussian over all training features (Ren et al.
    2021): directions in which every garment varies (lighting, size) stop counting as "far"."""
    return mahalanobis(features, gaussian) - mahalanobis(features, background)


def ink_fraction(images: np.ndarray) -> np.ndarray:
    """Share of pixels brighter than ``INK_LEVEL`` in each uint8 model input (N, [C,] H, W)."""
    a = np.asarray(images)
    return (a.reshape(len(a), -1) > INK_LEVEL).mean(1)


def fit_threshold(in_scope_scores: np.ndarray, flag_share: float = 0.05) -> float:
    """The score above which ``flag_share`` of these in-scope images lie."""
    scores = np.asarray(in_scope_scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("a threshold needs at least one in-scope score")
    if not 0.0 <= flag_share < 1.0:
        raise ValueError(f"flag_share must be in [0, 1), got {flag_share}")
    return float(np.quantile(scores, 1.0 - flag_share))


# Reasons a row can carry; the first that applies is reported.
REASON_BLANK = "blank: almost no product pixels"
REASON_FILLED = "filled: no product outline against a background"
REASON_UNLIKE = "unlike every class seen in training"


@dataclass(frozen=True)
class Detector:
    """Everything the out-of-scope decision needs at tagging time; stored in the model card.

    ``threshold`` applies to ``relative_mahalanobis`` of the penultimate features; the ink
    bounds catch degenerate inputs (a blank page, a photo the background trim could not
    separate) whatever the features say.
    """

    gaussian: FeatureGaussian
    background: FeatureGaussian
    threshold: float
    ink_low: float
    ink_high: float
    fitted_on: str = ""

    def scores(self, features: np.ndarray) -> np.ndarray:
        return relative_mahalanobis(features, self.gaussian, self.background)

    def reasons(self, features: np.ndarray, images: np.ndarray) -> list[str | None]:
        """Per row: None when in scope, else why it is out of scope."""
        ink = ink_fraction(images)
        far = self.scores(features) > self.threshold
        out: list[str | None] = []
        for share, is_far in zip(ink.tolist(), far.tolist()):
            if share < self.ink_low:
                out.append(REASON_BLANK)
            elif share > self.ink_high:
                out.append(REASON_FILLED)
            else:
                out.append(REASON_UNLIKE if is_far else None)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"method": "relative mahalanobis on penultimate features + ink share bounds",
                "threshold": self.threshold, "ink_low": self.ink_low, "ink_high": self.ink_high,
                "fitted_on": self.fitted_on, "class_gaussian": self.gaussian.to_dict(),
                "background_gaussian": self.background.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Detector":
        return cls(FeatureGaussian.from_dict(data["class_gaussian"]),
                   FeatureGaussian.from_dict(data["background_gaussian"]),
                   float(data["threshold"]), float(data["ink_low"]), float(data["ink_high"]),
                   str(data.get("fitted_on", "")))


def fit_detector(train_features: np.ndarray, train_labels: np.ndarray, num_classes: int,
                 val_features: np.ndarray, val_images: np.ndarray, flag_share: float = 0.05,
                 ink_flag_share: float = 0.002) -> Detector:
    """Statistics from training features, thresholds from held-out in-scope images only.

    ``flag_share`` of the validation images score above the feature threshold; the ink
    bounds leave ``ink_flag_share`` of them outside on each side.
    """
    gaussian = fit_feature_gaussian(train_features, train_labels, num_classes)
    background = fit_feature_gaussian(train_features, np.zeros(len(train_labels), dtype=np.int64), 1)
    ink = ink_fraction(val_images)
    threshold = fit_threshold(relative_mahalanobis(val_features, gaussian, background), flag_share)
    return Detector(gaussian, background, threshold,
                    float(np.quantile(ink, ink_flag_share)), float(np.quantile(ink, 1 - ink_flag_share)),
                    f"{len(train_labels)} training images; thresholds flag {flag_share:.1%} (features) and "
                    f"{2 * ink_flag_share:.1%} (ink) of {len(val_images)} validation images")
