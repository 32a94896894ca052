"""Training and evaluation data as arrays: Fashion-MNIST, or a retailer's own labeled photos.

Own photos come as an image folder (one sub-folder per class) or a manifest with a path
and a label column, read by the same readers as tagging's sources (``sources``, with a
label). They are decoded once, in parallel, by the same decoding dataset that tagging
uses (``batches``), so training sees exactly what tagging will see. Images that cannot
be decoded are reported and skipped; they never stop training.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..batches import Collate, DecodeDataset, DecodeSettings
from ..config import IMAGE_EXTENSIONS
from ..errors import DataError, SourceError, UsageError
from ..model import FASHION_MNIST_CLASSES, ModelConfig
from ..sources import Record, read_manifest, walk_folder
from .fashion_mnist import load_split, train_val_indices

log = logging.getLogger(__name__)


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


def _from_folder(folder: Path, extensions: tuple[str, ...]) -> list[Record]:
    """Every image under a class sub-folder, labeled with that sub-folder's name."""
    try:
        with os.scandir(folder) as it:
            classes = sorted(e.name for e in it if not e.name.startswith(".") and _is_folder(e))
    except OSError as exc:
        raise DataError(f"cannot read folder {folder}: {exc.strerror or exc}") from exc
    if len(classes) >= 2 and {c.lower() for c in classes} <= _SPLIT_NAMES:
        raise DataError(f"{folder} holds dataset splits ({', '.join(classes)}), not class folders; "
                        "point --data at one split, whose sub-folders are the classes")
    records = list(walk_folder(folder, extensions, label_by_folder=True))
    found = {r.label for r in records if r.problem is None}
    for name in classes:
        if name not in found:
            raise DataError(f"class folder {folder / name} holds no images "
                            f"({', '.join('.' + e for e in extensions)}); add some or remove the folder")
    return records


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links, as the walk does
    except OSError:
        return False


def list_labeled(data: Path | None, manifest: Path | None, path_col: str = "path", label_col: str = "label",
                 root: Path | None = None, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[Record]:
    """The records of an image folder or a manifest (.csv, or .parquet), each with its label
    (None for a manifest row without one). ``root`` as for tagging's manifests."""
    if (data is None) == (manifest is None):
        raise UsageError("give exactly one of --data FOLDER or --manifest FILE")
    try:
        if data is not None:
            if not Path(data).is_dir():
                raise DataError(f"--data {data} is not a folder")
            return _from_folder(Path(data), extensions)
        return list(read_manifest(Path(manifest), path_col, None, root, label_col).records)  # type: ignore[arg-type]
    except SourceError as exc:  # the same problem, as training data (exit 3)
        raise DataError(str(exc)) from exc


def decode_records(records: Sequence[Record], config: ModelConfig, workers: int, progress: bool,
                   settings: DecodeSettings | None = None) -> tuple[np.ndarray, np.ndarray, list[dict[str, str]]]:
    """Decode with the tagging decoder in worker processes: (arrays, ok mask, problems)."""
    dataset = DecodeDataset(records, config, settings or DecodeSettings())
    loader = DataLoader(dataset, batch_size=64, num_workers=workers, collate_fn=Collate())
    arrays = np.zeros((len(records), config.channels, config.input_size, config.input_size), np.uint8)
    ok = np.zeros(len(records), bool)
    problems = []
    bar = tqdm(total=len(records), desc="decode", unit="img", disable=not progress, leave=False)
    for batch in loader:
        for item, array in zip(batch.items, batch.arrays()):
            if array is not None:
                arrays[item.index] = array
                ok[item.index] = True
            else:
                problems.append({"path": records[item.index].path, "status": item.status, "error": item.error})
        bar.update(len(batch.items))
    bar.close()
    for p in problems[:5]:
        log.warning("skipping %s: %s (%s)", p["path"], p["status"], p["error"])
    if len(problems) > 5:
        log.warning("... and %d more images skipped", len(problems) - 5)
    return arrays[ok], ok, problems


def decode_paths(paths: list[str], config: ModelConfig, workers: int, progress: bool,
                 max_pixels: int = DecodeSettings.max_pixels) -> tuple[np.ndarray, np.ndarray, list[dict[str, str]]]:
    """``decode_records`` for bare paths."""
    records = [Record(i, p, p) for i, p in enumerate(paths)]
    return decode_records(records, config, workers, progress, DecodeSettings(max_pixels=max_pixels))


def decoders_for(workers: int, n: int) -> int:
    """Decoding processes for ``n`` photos: a worker's start costs more than a few dozen small decodes."""
    return min(workers, max(1, n // 64))


def jittered_views(paths: list[str], config: ModelConfig, k: int, seed: int, workers: int, progress: bool
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``k`` jittered conversions of each photo, and the photo each one is of (0 <= index < len(paths))."""
    if k == 0:
        return np.zeros((0, config.channels, config.input_size, config.input_size),
                        np.uint8), np.zeros(0, np.int64)
    records = [Record(i, p, p) for i, p in enumerate(paths * k)]
    settings = DecodeSettings(jitter_seed=seed)
    views, ok, _ = decode_records(records, config, decoders_for(workers, len(records)), progress, settings)
    # A photo changed since it decoded a moment ago loses its views, not the run.
    return views, (np.arange(len(records)) % len(paths))[ok]


def load_labeled(data: Path | None, manifest: Path | None, config: ModelConfig, path_col: str = "path",
                 label_col: str = "label", classes: tuple[str, ...] | None = None, workers: int = 0,
                 progress: bool = False, min_classes: int = 2) -> LabeledArrays:
    """Decode a labeled image set. With ``classes``, labels are matched to those names
    (loosely: case and punctuation ignored); otherwise the sorted label names are the classes.

    Training needs decodable images of ``min_classes`` classes; evaluating a known model on
    photos of one class is fine (``min_classes=1``).
    """
    records = list_labeled(data, manifest, path_col, label_col)
    unlabeled = [{"path": r.path, "status": "unlabeled", "error": "no label"} for r in records if r.label is None]
    if unlabeled:
        log.warning("skipping %d rows without a label (first: %s)", len(unlabeled), unlabeled[0]["path"])
    records = [r for r in records if r.label is not None]
    names = [str(r.label) for r in records]
    if not records:
        raise DataError("the labeled data holds no labeled images")
    derived = classes is None
    if classes is None:
        classes = _classes_from_labels(names)
    keys = {class_key(c): i for i, c in enumerate(classes)}
    unknown = sorted({n for n in names if class_key(n) not in keys})
    if unknown:
        raise DataError(f"labels not among the model's classes {list(classes)}: {unknown[:10]}")
    labels = np.array([keys[class_key(n)] for n in names], np.int64)
    arrays, ok, problems = decode_records(records, config, workers, progress)
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
    train: list[int] = []
    val: list[int] = []
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
