"""Confidence that means something: temperature scaling and review thresholds.

A network trained with cross-entropy is usually over- or under-confident. One scalar
temperature T, fitted on the validation split (never the test set), rescales the logits
so that "0.9 confident" is right about 90% of the time (Guo et al. 2017). From the
calibrated validation scores we also keep a table of confidence thresholds with the
precision and coverage of the rows they would auto-accept, so that
``tag --target-precision 0.95`` can pick the threshold for a precision goal.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# log-spaced grid, then refined: robust, deterministic and cheap for one parameter.
_GRID = np.exp(np.linspace(np.log(0.05), np.log(20.0), 161))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float((log_norm - z[np.arange(len(labels)), labels]).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float | None:
    """The temperature minimising validation NLL; None when the data cannot tell.

    With no validation mistake the NLL falls without end as T -> 0 (and with nothing
    right, as T grows): the minimum then sits on the grid's edge and would make every
    prediction look certain (or none). Such a fit is refused rather than stored.
    """
    losses = [nll(logits, labels, t) for t in _GRID]
    i = int(np.argmin(losses))
    if i in (0, len(_GRID) - 1):
        return None
    lo, hi = _GRID[max(0, i - 1)], _GRID[min(len(_GRID) - 1, i + 1)]
    fine = np.linspace(lo, hi, 41)
    return float(fine[int(np.argmin([nll(logits, labels, t) for t in fine]))])


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> list[dict[str, float]]:
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    out = []
    for b in range(bins):
        members = index == b
        out.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": int(members.sum()),
                    "confidence": float(confidence[members].mean()) if members.any() else 0.0,
                    "accuracy": float(correct[members].mean()) if members.any() else 0.0})
    return out


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Mean |accuracy - confidence| over equal-width bins, weighted by bin size."""
    n = len(confidence)
    if n == 0:
        return 0.0
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"])
                     for b in reliability_bins(confidence, correct, bins)))


def review_table(confidence: np.ndarray, correct: np.ndarray, points: int = 101) -> list[list[float]]:
    """Rows [threshold, precision, coverage]: accepting rows with confidence >= threshold."""
    order = np.argsort(-confidence)
    conf, hits = confidence[order], correct[order].astype(np.float64)
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    table = []
    for q in np.linspace(0.0, 1.0, points):
        k = max(1, int(round(q * len(conf))))  # accept the k most confident rows
        table.append([float(conf[k - 1]), float(precision[k - 1]), k / len(conf)])
    return table


def threshold_for_precision(table: list[list[float]], target: float) -> tuple[float, float, float] | None:
    """The lowest threshold (largest coverage) whose accepted rows reach ``target`` precision."""
    feasible = [row for row in table if row[1] >= target]
    if not feasible:
        return None
    threshold, precision, coverage = max(feasible, key=lambda row: row[2])
    return threshold, precision, coverage


def calibrate(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Everything the card stores about calibration, from validation logits and labels."""
    fitted = fit_temperature(logits, labels)
    temperature = 1.0 if fitted is None else fitted
    raw = softmax(logits)
    cal = softmax(logits, temperature)
    correct = raw.argmax(1) == labels
    mistakes = int((~correct).sum())
    if fitted is None:
        log.warning("confidence left uncalibrated: the %d validation images (%d mistakes) cannot pin a "
                    "temperature down; more labeled images would", len(labels), mistakes)
    return {
        "method": "temperature scaling" if fitted is not None else "none (validation could not pin a temperature down)",
        "temperature": round(temperature, 4),
        "fitted_on": f"validation split ({len(labels)} images, {mistakes} mistakes)",
        "val_ece_before": expected_calibration_error(raw.max(1), correct),
        "val_ece_after": expected_calibration_error(cal.max(1), correct),
        "review_table": review_table(cal.max(1), correct),
    }
