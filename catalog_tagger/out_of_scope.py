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
- ``relative_mahalanobis``: the same minus the distance to one Gaussian over all training
  features (Ren et al. 2021); the best post-hoc score of a plainly trained model.
- ``energy``: minus the log-sum-exp of the logits (Liu et al. 2020); the best score of a model
  fine-tuned with outlier exposure.
- ``max_softmax``: one minus the (calibrated) top probability.
- ``ink_fraction``: the share of lit pixels of the 28x28 input, whose bounds catch blank
  pages and photos the background trim could not separate.

Everything here is pure numpy over arrays except ``features_and_logits``, which runs the
network once and returns what every score needs (the logits tagging already computes, and
the features the head reads).
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass, replace
from typing import Any, cast

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
    ``model`` may be a ``runtime.prepare_model`` copy (batch norm folded), as tagging runs it;
    it runs in eval mode and is left in the mode it came in.
    """
    was_training = model.training
    model.eval()
    try:
        return _features_and_logits(model, images, batch_size)
    finally:
        model.train(was_training)


def _features_and_logits(model: GarmentNet, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
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
        """JSON-ready, for the model card: each array as float32 bytes in base64 with its shape
        (a 128 x 128 precision matrix is 88 KB so, against 400 KB as a list of numbers)."""
        return {"means": _encode(self.means), "precision": _encode(self.precision)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureGaussian:
        """From ``to_dict``'s form (nested lists of numbers are accepted too); ValueError
        when the arrays are malformed, not finite or do not fit together."""
        means, precision = _decode(data["means"]), _decode(data["precision"])
        if means.ndim != 2 or precision.shape != (means.shape[1], means.shape[1]):
            raise ValueError(f"feature statistics do not fit together: means {means.shape}, "
                             f"precision {precision.shape}")
        return cls(means, precision)


def _encode(a: np.ndarray) -> dict[str, Any]:
    data = np.ascontiguousarray(a, dtype="<f4")
    return {"shape": list(data.shape), "float32_base64": base64.b64encode(data.tobytes()).decode("ascii")}


def _decode(obj: Any) -> np.ndarray:
    if isinstance(obj, dict):
        shape = obj.get("shape")
        if not (isinstance(shape, list) and all(isinstance(n, int) and 0 < n <= 4096 for n in shape)):
            raise ValueError(f"an array's shape must be a list of sizes, found {shape!r}")
        try:
            raw = base64.b64decode(str(obj.get("float32_base64", "")), validate=True)
        except binascii.Error as exc:
            raise ValueError(f"an array's float32_base64 is not base64: {exc}") from None
        if len(raw) != 4 * math.prod(shape):
            raise ValueError(f"an array of shape {shape} needs {4 * math.prod(shape)} bytes, found {len(raw)}")
        a = np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float64)
    else:
        try:
            a = np.asarray(obj, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"an array must be numbers: {exc}") from None
    if not np.isfinite(a).all():
        raise ValueError("feature statistics hold a value that is not a finite number")
    return a


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
    # (f - m)' P (f - m) = f'Pf - 2 f'Pm + m'Pm, for all classes at once. In chunks of 16 rows:
    # OpenBLAS runs larger products on several threads, whose start and spinning cost more
    # than the product itself (up to 30x, measured) while the decoders keep every core busy.
    fp = np.concatenate([f[i:i + 16] @ p for i in range(0, len(f), 16)]) if len(f) else f @ p
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


def short_side(images: np.ndarray) -> np.ndarray:
    """The shorter side, in pixels, of the box around the ink of each model input (0 when blank).

    The conversion scales a product's longer side to the full 28 pixels, so a line of text
    or a strap ends up a few pixels thin, thinner than all but a few Fashion-MNIST items.
    """
    ink = np.asarray(images).reshape(len(images), -1, *np.shape(images)[-2:]).max(1) > INK_LEVEL
    return np.minimum(ink.any(2).sum(1), ink.any(1).sum(1))


GRAIN_MIN_STD = 8.0  # grey levels: less spread in the ink's brightness than this is not grain


def grain(images: np.ndarray) -> np.ndarray:
    """Correlation of neighbouring ink pixels' brightness in each model input (1.0 with too
    few ink pixels, or too little variation in their brightness, to say).

    Shading and fabric vary smoothly from pixel to pixel (Fashion-MNIST: 0.4 typically, above
    0.02 for 99.8% of items); a noise field, which the conversion shrinks to 28 pixels of
    independent averages, gives about 0. The network's features cannot tell: it places
    noise among garments.
    """
    a = np.asarray(images)
    a = a.reshape(len(a), -1, *a.shape[-2:])
    a = (a[:, 0] if a.shape[1] == 1 else a.mean(1)).astype(np.float64)
    ink = a > INK_LEVEL
    # every pair of horizontal and of vertical neighbours, both ink; the others count as zero
    u = np.concatenate([a[:, :, :-1].reshape(len(a), -1), a[:, :-1, :].reshape(len(a), -1)], 1)
    v = np.concatenate([a[:, :, 1:].reshape(len(a), -1), a[:, 1:, :].reshape(len(a), -1)], 1)
    m = np.concatenate([(ink[:, :, :-1] & ink[:, :, 1:]).reshape(len(a), -1),
                        (ink[:, :-1, :] & ink[:, 1:, :]).reshape(len(a), -1)], 1)
    u, v = u * m, v * m
    n, su, sv = m.sum(1), u.sum(1), v.sum(1)
    suu, svv, suv = (u * u).sum(1), (v * v).sum(1), (u * v).sum(1)
    safe = np.maximum(n, 1)
    cov, var_u, var_v = suv / safe - su * sv / safe**2, suu / safe - (su / safe) ** 2, svv / safe - (sv / safe) ** 2
    denom = np.sqrt(np.maximum(var_u * var_v, 0.0))
    # A flat-coloured object (a plain triangle) varies only at its edges, where the sharpening
    # leaves a ring: weakly correlated, but no grain. Only visible variation counts.
    enough = (n > 10) & (denom > GRAIN_MIN_STD**2)
    return np.where(enough, cov / np.where(enough, denom, 1.0), 1.0)


def fit_threshold(in_scope_scores: np.ndarray, flag_share: float = 0.05) -> float:
    """The score above which ``flag_share`` of these in-scope images lie."""
    scores = np.asarray(in_scope_scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("a threshold needs at least one in-scope score")
    if not 0.0 <= flag_share < 1.0:
        raise ValueError(f"flag_share must be in [0, 1), got {flag_share}")
    return float(np.quantile(scores, 1.0 - flag_share))


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, found {value!r}")
    return float(value)


# Reasons a row can carry; the first that applies is reported.
REASON_BLANK = ("blank: almost no product pixels after conversion (an empty image, a noise field, thin lines "
                "such as text, or a product that blends into its background)")
REASON_FILLED = "filled: no product outline against a background"
REASON_THIN = "thin: a line such as text or a strap, thinner than any garment"
REASON_GRAINY = "grainy: pixel-to-pixel noise where a product has smooth shading"
REASON_UNLIKE = "unlike: far from every class seen in training"
METHODS = ("energy", "relative_mahalanobis")


@dataclass(frozen=True)
class Detector:
    """Everything the out-of-scope decision needs at tagging time; stored in the model card.

    ``method`` names the score ``threshold`` applies to: ``energy`` of the logits (needs no
    statistics; the choice for a model trained with outlier exposure) or
    ``relative_mahalanobis`` of the penultimate features (the best post-hoc score of a plain
    model; needs ``gaussian`` and ``background``). The ink bounds catch degenerate inputs
    (a blank page, a photo the background trim could not separate, a line of text) whatever
    the score says.
    """

    method: str
    threshold: float
    ink_low: float
    ink_high: float
    min_side: float = 0.0
    gaussian: FeatureGaussian | None = None
    background: FeatureGaussian | None = None
    fitted_on: str = ""
    # Flag inputs whose ``grain`` lies below this (-1: never; cards written before it existed).
    min_grain: float = -1.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown out-of-scope method {self.method!r}; expected one of {METHODS}")
        if self.method == "relative_mahalanobis" and (self.gaussian is None or self.background is None):
            raise ValueError("relative_mahalanobis needs the class and background feature statistics")
        numbers = (self.threshold, self.ink_low, self.ink_high, self.min_side, self.min_grain)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers):
            raise ValueError(f"threshold, ink bounds, min_side and min_grain must be finite numbers, found {numbers}")
        if not 0.0 <= self.ink_low <= self.ink_high <= 1.0 or self.min_side < 0:
            raise ValueError(f"ink bounds must satisfy 0 <= ink_low <= ink_high <= 1 and min_side >= 0, "
                             f"found {self.ink_low}, {self.ink_high}, {self.min_side}")
        if not -1.0 <= self.min_grain <= 1.0:
            raise ValueError(f"min_grain is a correlation, between -1 and 1; found {self.min_grain}")
        if self.background is not None and len(self.background.means) != 1:
            raise ValueError("the background statistics must be one Gaussian")

    def check_fits(self, num_classes: int, feature_dim: int) -> None:
        """ValueError unless the feature statistics fit a model with these classes and features."""
        for name, g, rows in (("class", self.gaussian, num_classes), ("background", self.background, 1)):
            if g is not None and g.means.shape != (rows, feature_dim):
                raise ValueError(f"{name} statistics have shape {g.means.shape}; the model needs "
                                 f"({rows}, {feature_dim})")

    def scores(self, features: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """The method's score per row; above ``threshold`` is out of scope."""
        if self.method == "energy":
            return energy(logits)
        assert self.gaussian is not None and self.background is not None
        return relative_mahalanobis(features, self.gaussian, self.background)

    def reasons(self, features: np.ndarray, logits: np.ndarray, images: np.ndarray) -> list[str | None]:
        """Per row: None when in scope, else why it is out of scope."""
        ink = ink_fraction(images)
        thin = (short_side(images) < self.min_side).tolist()
        grainy = (grain(images) < self.min_grain).tolist()
        far = self.scores(features, logits) > self.threshold
        out: list[str | None] = []
        for share, is_thin, is_grainy, is_far in zip(ink.tolist(), thin, grainy, far.tolist()):
            if share < self.ink_low:
                out.append(REASON_BLANK)
            elif share > self.ink_high:
                out.append(REASON_FILLED)
            elif is_thin:
                out.append(REASON_THIN)
            elif is_grainy:
                out.append(REASON_GRAINY)
            else:
                out.append(REASON_UNLIKE if is_far else None)
        return out

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"method": self.method, "threshold": self.threshold, "ink_level": INK_LEVEL,
                                "ink_low": self.ink_low, "ink_high": self.ink_high, "min_side": self.min_side,
                                "min_grain": self.min_grain, "fitted_on": self.fitted_on}
        if self.gaussian is not None and self.background is not None:
            data["class_gaussian"] = self.gaussian.to_dict()
            data["background_gaussian"] = self.background.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Detector:
        """From ``to_dict``'s form; ValueError for anything missing, malformed or out of range."""
        if not isinstance(data, dict):
            raise ValueError(f"expected an object, found {type(data).__name__}")
        if data.get("ink_level", INK_LEVEL) != INK_LEVEL:
            raise ValueError(f"ink bounds measured at ink level {data.get('ink_level')!r}, this version uses "
                             f"{INK_LEVEL}")
        try:
            stats = [FeatureGaussian.from_dict(data[k]) if k in data else None
                     for k in ("class_gaussian", "background_gaussian")]
            return cls(str(data["method"]), _number(data["threshold"]), _number(data["ink_low"]),
                       _number(data["ink_high"]), _number(data.get("min_side", 0.0)), stats[0], stats[1],
                       str(data.get("fitted_on", "")), _number(data.get("min_grain", -1.0)))
        except KeyError as exc:
            raise ValueError(f"missing {exc}") from None
        except TypeError as exc:
            raise ValueError(str(exc)) from None


def fit_detector(method: str, val_features: np.ndarray, val_logits: np.ndarray, val_images: np.ndarray,
                 train_features: np.ndarray | None = None, train_labels: np.ndarray | None = None,
                 num_classes: int | None = None, flag_share: float = 0.01, ink_flag_share: float = 0.002
                 ) -> Detector:
    """A detector whose thresholds come from held-out in-scope images only (the validation split).

    ``flag_share`` of the validation images score above the threshold; the ink bounds leave
    ``ink_flag_share`` of them outside on each side, and at most that share is thinner than
    ``min_side`` or grainier than ``min_grain``. ``relative_mahalanobis`` also needs the
    training features and labels its statistics are fitted on.
    """
    gaussian = background = None
    if method == "relative_mahalanobis":
        if train_features is None or train_labels is None or num_classes is None:
            raise ValueError("relative_mahalanobis needs training features, labels and the number of classes")
        gaussian = fit_feature_gaussian(train_features, train_labels, num_classes)
        background = fit_feature_gaussian(train_features, np.zeros(len(train_labels), dtype=np.int64), 1)
    ink = ink_fraction(val_images)
    low, high = np.quantile(ink, [ink_flag_share, 1 - ink_flag_share])
    # Whole pixels: flag only sides strictly thinner than the thinnest ``ink_flag_share`` of items.
    min_side = float(np.floor(np.quantile(short_side(val_images), ink_flag_share)))
    min_grain = float(np.quantile(grain(val_images), ink_flag_share))
    draft = Detector(method, 0.0, float(low), float(high), min_side, gaussian, background, min_grain=min_grain)
    threshold = fit_threshold(draft.scores(val_features, val_logits), flag_share)
    trained = f"; statistics from {len(train_features)} training images" if train_features is not None else ""
    return replace(draft, threshold=threshold,
                   fitted_on=f"threshold flags {flag_share:.1%}, ink, size and grain bounds "
                             f"{4 * ink_flag_share:.1%} of {len(val_images)} validation images{trained}")


# The bundled model's rule (docs/out-of-scope.md): relative Mahalanobis distance, the threshold
# flagging 0.2% of the validation images, which on real product photos flagged few in-scope ones.
DEFAULT_METHOD = "relative_mahalanobis"
DEFAULT_FLAG_SHARE = 0.002
FIT_SIZE = 20_000  # training images the feature statistics come from (plenty for 128 features)
# Fewer validation images than this cannot place a 0.2% percentile: no detector then.
MIN_VALIDATION = 1_000


def fit_for_model(module: torch.nn.Module, train_images: np.ndarray, train_labels: np.ndarray, val_images: np.ndarray,
                  method: str = DEFAULT_METHOD, flag_share: float = DEFAULT_FLAG_SHARE, seed: int = 0
                  ) -> dict[str, Any] | None:
    """The card's ``out_of_scope`` entry for a trained model: statistics from (at most
    ``FIT_SIZE``) training images, thresholds from the validation split, both in-scope only.
    None when the validation split is too small to place the thresholds (detector off).

    Deterministic: the training subset is drawn with ``seed``; ``module`` may be a
    ``runtime.prepare_model`` copy, as tagging runs it.
    """
    if len(val_images) < MIN_VALIDATION:
        return None
    model = cast(GarmentNet, module)
    fit = np.sort(np.random.default_rng(seed).choice(len(train_images), min(FIT_SIZE, len(train_images)),
                                                     replace=False))
    train_feats, _ = features_and_logits(model, train_images[fit])
    val_feats, val_logits = features_and_logits(model, val_images)
    try:
        detector = fit_detector(method, val_feats, val_logits, val_images, train_feats,
                                np.asarray(train_labels)[fit], model.config.num_classes,
                                flag_share=flag_share)
    except ValueError:  # a class without training images in the subset: no statistics for it
        return None
    return {**detector.to_dict(), "flag_share": flag_share,
            "chosen": "the flag share by measuring real product photos, none of which the product reads: "
                      "docs/out-of-scope.md"}
