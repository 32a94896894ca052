"""Pure functions over label arrays: accuracy, confusion matrix, per-class report, binomial bounds."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts with true classes as rows and predicted classes as columns."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/support and their macro averages."""
    cm = confusion_matrix(y_true, y_pred, len(classes)).astype(np.float64)
    tp = np.diag(cm)
    precision = _safe_div(tp, cm.sum(axis=0))
    recall = _safe_div(tp, cm.sum(axis=1))
    f1 = _safe_div(2 * precision * recall, precision + recall)
    n = int(cm.sum())
    per_class = {
        name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
               "support": int(cm[i].sum())}
        for i, name in enumerate(classes)
    }
    present = cm.sum(axis=1) > 0  # macro averages over classes that occur in the data
    return {
        "n": n,
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "per_class": per_class,
        "macro": {
            "precision": float(precision[present].mean()) if present.any() else 0.0,
            "recall": float(recall[present].mean()) if present.any() else 0.0,
            "f1": float(f1[present].mean()) if present.any() else 0.0,
        },
        "confusion_matrix": cm.astype(np.int64).tolist(),
    }


# The confidence level of every binomial bound the cards report (review table, out-of-scope rates).
CONFIDENCE_LEVEL = 0.90


def clopper_pearson_lower(successes: int, n: int, level: float = CONFIDENCE_LEVEL) -> float:
    """One-sided lower confidence bound for a binomial proportion (exact, Clopper-Pearson):
    the p at which seeing ``successes`` or more out of ``n`` has probability 1 - level."""
    if n <= 0 or successes <= 0:
        return 0.0
    alpha = 1.0 - level
    # P(X >= s | p) = I_p(s, n - s + 1), increasing in p: bisect for alpha.
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _betainc(successes, n - successes + 1, mid) < alpha:
            lo = mid
        else:
            hi = mid
    return round(lo, 6)


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by Lentz's continued fraction (no SciPy here)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast on this side only
        return 1.0 - _betainc(b, a, 1.0 - x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-12:
            break
    return math.exp(log_front) * h / a


def clopper_pearson_upper(successes: int, n: int, level: float = CONFIDENCE_LEVEL) -> float:
    """One-sided upper confidence bound for a binomial proportion (exact, Clopper-Pearson)."""
    return 1.0 if n <= 0 else round(1.0 - clopper_pearson_lower(n - successes, n, level), 6)
