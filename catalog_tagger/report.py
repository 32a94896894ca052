"""Pictures and report files, drawn from arrays they are given."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: cron jobs and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .checkpoint import atomic_write_bytes  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    """Draw into memory, then write atomically: a report read while being rewritten (or a
    run killed halfway) never leaves half a picture."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def plot_training_curves(history: Sequence[dict[str, Any]], path: Path) -> Path:
    """Loss and accuracy per epoch, train vs validation."""
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    # Training loss includes label smoothing, so it sits above the validation loss.
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train (label-smoothed)")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_acc.plot(epochs, [r["train_accuracy"] for r in history], "o-", label="train")
    ax_acc.plot(epochs, [r["val_accuracy"] for r in history], "o-", label="validation")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def write_confusion_csv(cm: np.ndarray, classes: Sequence[str], path: Path) -> Path:
    frame = pd.DataFrame(cm, index=pd.Index(classes, name="true"), columns=list(classes))
    atomic_write_bytes(Path(path), frame.to_csv().encode("utf-8"))
    return Path(path)


def plot_confusion_matrix(cm: np.ndarray, classes: Sequence[str], path: Path) -> Path:
    """Row-normalised colours (recall per class) with the raw counts written in each cell."""
    cm = np.asarray(cm)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    size = max(6, 0.6 * len(classes))
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of true class")
    return _save(fig, path)


def plot_prediction_grid(
    images: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, confidence: np.ndarray,
    classes: Sequence[str], path: Path,
) -> Path:
    """Sample images titled 'predicted (confidence) / true', mistakes in red."""
    n = len(images)
    cols = int(np.ceil(np.sqrt(n))) if n else 1
    rows = int(np.ceil(n / cols)) if n else 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.1 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, t, p, c in zip(axes.flat, images, y_true, y_pred, confidence):
        img = np.asarray(img)
        if img.ndim == 3 and img.shape[0] == 3:  # (C, H, W) colour -> (H, W, C)
            ax.imshow(img.transpose(1, 2, 0))
        else:
            ax.imshow(np.squeeze(img), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{classes[p]} ({c:.2f})\ntrue: {classes[t]}", fontsize=7,
                     color="black" if p == t else "red")
    return _save(fig, path)


def plot_reliability(confidences: dict[str, np.ndarray], correct: np.ndarray, path: Path, bins: int = 15) -> Path:
    """Accuracy against confidence per bin, one line per scoring; the diagonal is perfect."""
    from .calibration import expected_calibration_error, reliability_bins

    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    for name, conf in confidences.items():
        rows = [b for b in reliability_bins(conf, correct, bins) if b["count"]]
        ece = expected_calibration_error(conf, correct, bins)
        ax.plot([b["confidence"] for b in rows], [b["accuracy"] for b in rows], "o-", label=f"{name} (ECE {ece:.3f})")
    ax.set(xlabel="confidence", ylabel="accuracy", title="Reliability", xlim=(0, 1), ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    return _save(fig, path)


def plot_coverage_precision(confidence: np.ndarray, correct: np.ndarray, path: Path) -> Path:
    """Precision of the auto-accepted rows against the share accepted, as the threshold falls."""
    from .calibration import review_table

    table = np.asarray(review_table(confidence, correct, points=201))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(table[:, 2], table[:, 1], "-")
    for target in (0.95, 0.99):
        ax.axhline(target, color="grey", lw=0.8, ls=":")
        ax.text(0.01, target, f" {target:.0%}", va="bottom", fontsize=8, color="grey")
    ax.set(xlabel="share auto-accepted (coverage)", ylabel="precision of accepted rows",
           title="Coverage vs precision", xlim=(0, 1))
    ax.grid(alpha=0.3)
    return _save(fig, path)
