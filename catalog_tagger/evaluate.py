"""Evaluate a model on labeled images and write the report files."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .calibration import expected_calibration_error, softmax
from .checkpoint import load_model, output_folder
from .config import EvalConfig
from .data.fashion_mnist import load_split
from .data.labeled import LabeledArrays, load_labeled
from .metrics import classification_report
from .model import FASHION_MNIST_CLASSES
from .out_of_scope import Detector
from .runtime import (
    iter_batches,
    predict_features_and_logits,
    predict_logits_array,
    prepare_model,
    resolve_device,
    resolve_workers,
)


def evaluate_model(config: EvalConfig, progress: bool = False) -> dict[str, Any]:
    """Accuracy, per-class report and confusion matrix of a model on the Fashion-MNIST test
    set, or on labeled photos (``config.data`` folder or ``config.manifest``); with the card's
    out-of-scope detector, the share of these in-scope images it flags (``out_of_scope``).

    With ``config.out``, also writes metrics.json, confusion_matrix.{csv,png} and a grid of
    sample predictions.
    """
    own = config.data is not None or config.manifest is not None
    if config.out is not None:
        output_folder(Path(config.out))
    loaded = load_model(config.model, expected_classes=None if own else FASHION_MNIST_CLASSES)
    device = resolve_device(config.device)
    model = prepare_model(loaded.model, device)
    if own:
        test = load_labeled(config.data, config.manifest, loaded.config, config.path_col, config.label_col,
                            classes=loaded.classes, workers=resolve_workers(config.workers),
                            progress=progress, min_classes=1)
        dataset = {"name": str(config.data or config.manifest), "skipped_images": len(test.skipped)}
    else:
        fmnist = load_split("test", config.data_dir)
        test = LabeledArrays(fmnist.images[:, None], fmnist.labels, FASHION_MNIST_CLASSES)
        dataset = {"name": "Fashion-MNIST test", "checksums_sha256": fmnist.checksums}
    logits = predict_logits_array(model, test.images, device, config.batch_size, progress=progress, desc="evaluate")
    raw, probs = softmax(logits), softmax(logits, loaded.temperature)
    predicted = probs.argmax(1)
    correct = predicted == test.labels
    result = classification_report(test.labels, predicted, loaded.classes)
    result["model"] = loaded.ident
    result["calibration"] = {
        "temperature": loaded.temperature,
        "ece_before": expected_calibration_error(raw.max(1), correct),
        "ece_after": expected_calibration_error(probs.max(1), correct),
    }
    result["dataset"] = dataset
    if loaded.detector is not None:
        result["out_of_scope"] = in_scope_flagged(loaded.detector, model, test, correct, device, config.batch_size)
    if config.out is not None:
        result["report_files"] = [str(p) for p in write_report(
            Path(config.out), result, test.images, test.labels, raw, probs, loaded.classes, config.grid_size)]
    return result


def in_scope_flagged(detector: Detector, model: torch.nn.Module, test: LabeledArrays, correct: np.ndarray,
                     device: torch.device, batch_size: int) -> dict[str, Any]:
    """What the card's out-of-scope detector does to labeled (so in-scope) images, as ``tag``
    would: the share flagged (wrongly rejected), overall and per class, and the accuracy of
    the rows it leaves labeled."""
    feats, logits = [], []
    for batch in iter_batches(test.images, batch_size):
        f, z = predict_features_and_logits(model, batch, device)
        feats.append(f.numpy())
        logits.append(z.numpy())
    reasons = detector.reasons(np.concatenate(feats), np.concatenate(logits), test.images)
    flagged = np.array([r is not None for r in reasons], bool)
    kinds = Counter(r.split(":", 1)[0] for r in reasons if r is not None)
    return {
        "detector": detector.fitted_on,
        "in_scope_flagged": float(flagged.mean()) if len(flagged) else 0.0,
        "per_class": {name: float(flagged[test.labels == k].mean()) if (test.labels == k).any() else None
                      for k, name in enumerate(test.classes)},
        "by_reason": dict(sorted(kinds.items())),
        "accuracy_unflagged": float(correct[~flagged].mean()) if (~flagged).any() else None,
    }


def write_report(out: Path, result: dict[str, Any], images: np.ndarray, labels: np.ndarray, raw: np.ndarray,
                 probs: np.ndarray, classes: tuple[str, ...], grid_size: int) -> list[Path]:
    """metrics.json, confusion matrix (CSV, PNG), prediction grid, reliability and coverage plots."""
    from .checkpoint import atomic_write_json
    from .report import (
        plot_confusion_matrix,
        plot_coverage_precision,
        plot_prediction_grid,
        plot_reliability,
        write_confusion_csv,
    )

    out.mkdir(parents=True, exist_ok=True)
    cm = np.asarray(result["confusion_matrix"])
    predicted = probs.argmax(1)
    # Show the mistakes first: a grid of correct predictions teaches nothing.
    wrong = np.flatnonzero(predicted != labels)
    right = np.flatnonzero(predicted == labels)
    rng = np.random.default_rng(0)
    pick = np.concatenate([rng.permutation(wrong)[: grid_size // 2], rng.permutation(right)])[:grid_size]
    paths = [out / "metrics.json", out / "confusion_matrix.csv", out / "confusion_matrix.png", out / "predictions.png",
             out / "reliability.png", out / "coverage_precision.png"]
    atomic_write_json(paths[0], {k: v for k, v in result.items() if k != "report_files"})
    write_confusion_csv(cm, classes, paths[1])
    plot_confusion_matrix(cm, classes, paths[2])
    plot_prediction_grid(images[pick], labels[pick], predicted[pick], probs[pick].max(1), classes, paths[3])
    correct = predicted == labels
    plot_reliability({"raw softmax": raw.max(1), "calibrated": probs.max(1)}, correct, paths[4])
    plot_coverage_precision(probs.max(1), correct, paths[5])
    return paths
