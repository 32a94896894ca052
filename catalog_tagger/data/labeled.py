"""Training and evaluation data as arrays: Fashion-MNIST, or a retailer's own labeled photos.

Own photos come as an image folder (one sub-folder per class) or a manifest with a path
and a label column. They are decoded once, in parallel, by the same decode and
preprocessing code that tagging uses, so training sees exactly what tagging will see.
Images that cannot be decoded are reported and skipped; they never stop training.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..errors import DataError, UsageError
from ..model import FASHION_MNIST_CLASSES, ModelConfig
from ..sources import Record
from .fashion_mnist import load_split, train_val_indices

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


@dataclass
class LabeledArrays:
    """uint8 images (N, C, S, S) with integer labels into ``classes``."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    skipped: list[dict[str, str]] = field(default_factory=list)


@dataclass
class TrainingData:
    train: LabeledArrays
    val: LabeledArrays
    test: LabeledArrays | None
    description: dict[str, Any]


def class_key(name: str) -> str:
    """Names compared loosely, so a folder 'T-shirt_top' matches the class 'T-shirt/top'
    (a slash cannot appear in a folder name)."""
    return re.sub(r"[^a-z0-9]+", "", name.lower())


# Folder names that mean a dataset split, not a class: --data given the parent of train/ and val/.
_SPLIT_NAMES = {"train", "training", "val", "valid", "validation", "test", "testing"}
# Label cells that mean "no label" (pandas and spreadsheets write missing values so).
_NO_LABEL = {"", "nan", "none", "null"}


def _from_folder(folder: Path) -> tuple[list[str], list[str]]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) >= 2 and {c.lower() for c in classes} <= _SPLIT_NAMES:
        raise DataError(f"{folder} holds dataset splits ({', '.join(classes)}), not class folders; "
                        "point --data at one split, whose sub-folders are the classes")
    paths, names = [], []
    for name in classes:
        found = 0
        for root, dirs, files in os.walk(folder / name):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in sorted(files):
                if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES):
                    paths.append(os.path.join(root, f))
                    names.append(name)
                    found += 1
        if not found:
            raise DataError(f"class folder {folder / name} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                            "add some or remove the folder")
    return paths, names


def _from_manifest(manifest: Path, path_col: str, label_col: str) -> tuple[list[str], list[str]]:
    """All rows; a row without a label has the label ''."""
    try:
        frame = pd.read_csv(manifest, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"cannot read manifest {manifest}: {exc}") from exc
    for col in (path_col, label_col):
        if col not in frame.columns:
            raise DataError(f"manifest {manifest} has no column {col!r} (columns: {', '.join(frame.columns)})")
    base = os.path.dirname(os.path.abspath(manifest))
    paths = [p if os.path.isabs(p) else os.path.join(base, p) for p in frame[path_col]]
    labels = [s.strip() for s in frame[label_col]]
    return paths, ["" if s.lower() in _NO_LABEL else s for s in labels]


def list_labeled(data: Path | None, manifest: Path | None, path_col: str = "path",
                 label_col: str = "label") -> tuple[list[str], list[str]]:
    """(paths, label names) from an image folder or a manifest."""
    if (data is None) == (manifest is None):
        raise UsageError("give exactly one of --data FOLDER or --manifest FILE")
    if data is not None:
        if not Path(data).is_dir():
            raise DataError(f"--data {data} is not a folder")
        return _from_folder(Path(data))
    return _from_manifest(Path(manifest), path_col, label_col)  # type: ignore[arg-type]


def decode_paths(paths: list[str], config: ModelConfig, workers: int, progress: bool,
                 max_pixels: int = 64_000_000) -> tuple[np.ndarray, np.ndarray, list[dict[str, str]]]:
    """Decode with the tagging decoder in worker processes: (arrays, ok mask, problems)."""
    from ..tagging import Collate, DecodeDataset, TagSettings

    records = [Record(i, p, p) for i, p in enumerate(paths)]
    dataset = DecodeDataset(records, config, TagSettings(max_pixels=max_pixels))
    loader = DataLoader(dataset, batch_size=64, num_workers=workers, collate_fn=Collate())
    arrays = np.zeros((len(paths), config.channels, config.input_size, config.input_size), np.uint8)
    ok = np.zeros(len(paths), bool)
    problems = []
    bar = tqdm(total=len(paths), desc="decode", unit="img", disable=not progress, leave=False)
    for batch, _, items in loader:
        good = iter(batch.numpy()) if batch is not None else iter(())
        for item in items:
            if item["has_array"]:
                arrays[item["index"]] = next(good)
                ok[item["index"]] = True
            else:
                problems.append({"path": paths[item["index"]], "status": item["status"], "error": item["error"]})
        bar.update(len(items))
    bar.close()
    for p in problems[:5]:
        log.warning("skipping %s: %s (%s)", p["path"], p["status"], p["error"])
    if len(problems) > 5:
        log.warning("... and %d more images skipped", len(problems) - 5)
    return arrays[ok], ok, problems


def load_labeled(data: Path | None, manifest: Path | None, config: ModelConfig, path_col: str = "path",
                 label_col: str = "label", classes: tuple[str, ...] | None = None, workers: int = 0,
                 progress: bool = False, min_classes: int = 2) -> LabeledArrays:
    """Decode a labeled image set. With ``classes``, labels are matched to those names
    (loosely: case and punctuation ignored); otherwise the sorted label names are the classes.

    Training needs decodable images of ``min_classes`` classes; evaluating a known model on
    photos of one class is fine (``min_classes=1``).
    """
    all_paths, all_names = list_labeled(data, manifest, path_col, label_col)
    unlabeled = [{"path": p, "status": "unlabeled", "error": "no label"} for p, n in zip(all_paths, all_names) if not n]
    if unlabeled:
        log.warning("skipping %d rows without a label (first: %s)", len(unlabeled), unlabeled[0]["path"])
    paths = [p for p, n in zip(all_paths, all_names) if n]
    names = [n for n in all_names if n]
    if not paths:
        raise DataError("the labeled data holds no labeled images")
    derived = classes is None
    if classes is None:
        classes = _classes_from_labels(names)
    keys = {class_key(c): i for i, c in enumerate(classes)}
    unknown = sorted({n for n in names if class_key(n) not in keys})
    if unknown:
        raise DataError(f"labels not among the model's classes {list(classes)}: {unknown[:10]}")
    labels = np.array([keys[class_key(n)] for n in names], np.int64)
    arrays, ok, problems = decode_paths(paths, config, workers, progress)
    labels = labels[ok]
    present = set(np.unique(labels).tolist())
    empty = [c for i, c in enumerate(classes) if i not in present]
    if derived and empty:
        # A class without a single training image would be a class the model never predicts.
        raise DataError(f"no image of class {empty[0]!r} could be decoded "
                        f"({len(problems)} images skipped in all; see the warnings above)")
    if len(present) < min_classes:
        raise DataError(f"need decodable images of at least {min_classes} classes, found {len(present)}")
    return LabeledArrays(arrays, labels, tuple(classes), unlabeled + problems)


def _classes_from_labels(names: list[str]) -> tuple[str, ...]:
    """The sorted label names; two spellings of one class (Dress, dress) are refused, since
    labels are matched to classes loosely (see class_key)."""
    spellings: dict[str, set[str]] = {}
    for name in names:
        spellings.setdefault(class_key(name), set()).add(name)
    clashes = [sorted(v) for v in spellings.values() if len(v) > 1]
    if clashes:
        raise DataError(f"labels {' and '.join(map(repr, clashes[0]))} name the same class; spell them one way")
    classes = tuple(sorted(next(iter(v)) for v in spellings.values()))
    if len(classes) < 2:
        raise DataError(f"need at least two classes, found {list(classes)}")
    return classes


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/validation indices with every class represented in both where possible."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(len(members) * val_fraction))
        k = min(max(k, 1 if len(members) > 1 else 0), len(members) - 1)
        val.extend(members[:k])
        train.extend(members[k:])
    return np.sort(np.array(train, np.int64)), np.sort(np.array(val, np.int64))


def fashion_mnist_data(data_dir: Path | None, val_size: int, seed: int) -> TrainingData:
    train_all = load_split("train", data_dir)
    test = load_split("test", data_dir)
    train_idx, val_idx = train_val_indices(len(train_all), val_size, seed)
    images = train_all.images[:, None]

    def part(idx: np.ndarray) -> LabeledArrays:
        return LabeledArrays(images[idx], train_all.labels[idx], FASHION_MNIST_CLASSES)

    return TrainingData(
        part(train_idx), part(val_idx), LabeledArrays(test.images[:, None], test.labels, FASHION_MNIST_CLASSES),
        {"dataset": "Fashion-MNIST", "train_size": len(train_idx), "val_size": len(val_idx),
         "data_checksums_sha256": {**train_all.checksums, **test.checksums}},
    )


def own_data(all_data: LabeledArrays, val_fraction: float, seed: int, source: str) -> TrainingData:
    train_idx, val_idx = stratified_split(all_data.labels, val_fraction, seed)
    if len(val_idx) == 0:
        raise DataError(f"too few images for a validation split ({len(all_data.labels)}); "
                        "give at least one class two or more images")

    def part(idx: np.ndarray) -> LabeledArrays:
        return LabeledArrays(all_data.images[idx], all_data.labels[idx], all_data.classes)

    return TrainingData(part(train_idx), part(val_idx), None, {
        "dataset": source, "train_size": len(train_idx), "val_size": len(val_idx),
        "skipped_images": len(all_data.skipped), "skipped_examples": all_data.skipped[:20],
    })
