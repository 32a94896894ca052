"""Evaluate a model on labeled images and write the report files."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .calibration import expected_calibration_error, softmax
from .checkpoint import load_model, output_folder, refuse_out_inside_data
from .config import EvalConfig
from .data.fashion_mnist import load_split
from .data.labeled import LabeledArrays, load_labeled
from .errors import OutputError
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
        refuse_out_inside_data(Path(config.out), config.data)
        refuse_foreign_report(output_folder(Path(config.out)))
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


# The files of one report, metrics.json first: it is written first, so a folder holding any of
# the others but no metrics.json of ours did not get them from evaluate (not even a killed one).
REPORT_FILES = ("metrics.json", "confusion_matrix.csv", "confusion_matrix.png", "predictions.png",
                "reliability.png", "coverage_precision.png")


def is_report_metrics(path: Path) -> bool:
    """Whether ``path`` is a metrics.json that evaluate wrote (its keys, not just its name)."""
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(metrics, dict) and {"n", "accuracy", "per_class", "confusion_matrix", "model"} <= metrics.keys()


def refuse_foreign_report(out: Path) -> None:
    """Refuse a report folder holding files of a report's names that evaluate did not write
    (the user's own metrics.json, a confusion_matrix.png of another tool): replacing our own
    earlier report is what a rerun is for; replacing theirs is not."""
    present = [name for name in REPORT_FILES if os.path.lexists(out / name)]
    if present and not is_report_metrics(out / REPORT_FILES[0]):
        raise OutputError(f"--out {out} already holds {', '.join(present)} not written by catalog-tagger evaluate; "
                          "they are left alone: choose another --out")


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
    paths = [out / name for name in REPORT_FILES]
    atomic_write_json(paths[0], {k: v for k, v in result.items() if k != "report_files"})
    write_confusion_csv(cm, classes, paths[1])
    plot_confusion_matrix(cm, classes, paths[2])
    plot_prediction_grid(images[pick], labels[pick], predicted[pick], probs[pick].max(1), classes, paths[3])
    correct = predicted == labels
    plot_reliability({"raw softmax": raw.max(1), "calibrated": probs.max(1)}, correct, paths[4])
    plot_coverage_precision(probs.max(1), correct, paths[5])
    return paths
