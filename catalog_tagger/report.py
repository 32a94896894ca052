"""Pictures and report files, drawn from arrays they are given."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: cron jobs and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, encoding="utf-8")
    return path


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
        ax.imshow(np.squeeze(img), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{classes[p]} ({c:.2f})\ntrue: {classes[t]}", fontsize=7,
                     color="black" if p == t else "red")
    return _save(fig, path)
