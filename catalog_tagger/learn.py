"""Learn from reviewed photos: fine-tune, calibrate out of fold, and write a model folder.

The reviewed photos are all the evidence there is about the retailer's own pictures, so
each one is used twice, never for the same thing at once:

1. k-fold cross-validation: k copies of the starting model are fine-tuned, each on k-1
   folds, and each predicts the fold it did not see. Those out-of-fold predictions give
   the accuracy in the card, the temperature, and the review-threshold table with its
   Clopper-Pearson lower bounds, all measured on photos the predicting model never
   trained on.
2. The final model is fine-tuned the same way on every label and carries that
   calibration (``calibration.source = "own_photos"``).

Rows marked ``other`` (none of the classes) are dealt into the folds too: out-of-fold scores
of both kinds set the reject threshold of the card's out-of-scope detector (reject.py), and
while fine-tuning they are outlier exposure (``LearnConfig.outlier_weight``).

Fine-tuning is ``train --init``'s recipe (same ``train_one_epoch``, augmentation, SGD
with warm-up and decay) on arrays decoded once by the tagging decoder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .calibration import calibrate, softmax
from .checkpoint import LoadedModel, load_model, output_folder, save_model
from .config import LearnConfig, TrainConfig
from .data.labeled import class_key, decode_paths, decoders_for, jittered_views
from .errors import DataError, OutputError
from .metrics import CONFIDENCE_LEVEL, clopper_pearson_lower
from .model import FASHION_MNIST_CLASSES, GarmentNet, build_model
from .new_classes import ClassPlan, extend_model, near_known, plan_classes
from .reject import ReviewedScores, tune_detector
from .review import OTHER, WHY_RANDOM
from .runtime import describe_device, predict_logits_array, resolve_device
from .schema import file_path
from .self_training import CatalogPool, load_pool, pseudo_labels, with_photos
from .tagging import default_workers
from .train import WEIGHTS_FILE, StepSettings, TrainState, lr_schedule, train_one_epoch
from .workbook import ReviewRow, read_review_rows

log = logging.getLogger(__name__)

# Fewer labels than this cannot be split into folds that each teach and test something.
MIN_LABELS = 10


@dataclass
class ReviewedSet:
    """Reviewed photos that decoded, with class indices (-1: marked ``other``), and what was left out."""

    paths: list[str]
    labels: np.ndarray
    random: np.ndarray  # bool: chosen for the random slice (unbiased precision)
    images: np.ndarray
    other: int
    missing: list[str]
    undecodable: list[dict[str, str]]
    # Jittered conversions of the photos (photo_jitter.py) and the row each one is a view of.
    views: np.ndarray
    view_of: np.ndarray
    # What the indices point into: the model's classes, then any of the retailer's own.
    plan: ClassPlan

    @property
    def classes(self) -> tuple[str, ...]:
        return self.plan.classes

    def photos(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Images of the ``rows`` (a bool mask), their views, and the row of the result each
        view is of."""
        kept_views = rows[self.view_of]
        return self.images[rows], self.views[kept_views], (np.cumsum(rows) - 1)[self.view_of[kept_views]]

    def in_scope(self) -> ReviewedSet:
        """Only the rows labeled with a class."""
        keep = self.labels >= 0
        images, views, view_of = self.photos(keep)
        return ReviewedSet([p for p, k in zip(self.paths, keep) if k], self.labels[keep], self.random[keep],
                           images, self.other, self.missing, self.undecodable, views, view_of, self.plan)

    def training_set(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images and labels of the in-scope ``rows`` (a bool mask), their views included."""
        rows = rows & (self.labels >= 0)
        with_views = rows[self.view_of]
        images = np.concatenate([self.images[rows], self.views[with_views]])
        return images, np.concatenate([self.labels[rows], self.labels[self.view_of[with_views]]])


@dataclass(frozen=True)
class Labels:
    """The filled rows of the review files (deduplicated by path), each with its class index
    (-1 for ``other``), and the class list those indices point into."""

    rows: list[ReviewRow]
    indices: list[int]
    plan: ClassPlan  # the model's classes, and any of the retailer's own (--new-classes)


def collect_labels(files: list[Path], classes: tuple[str, ...], new_classes: bool = False,
                   min_new_class_labels: int = LearnConfig.min_new_class_labels) -> Labels:
    """The reviewed labels of ``files``. A label that is none of ``classes`` nor ``other`` is
    refused, unless ``new_classes``: then it names a class of its own (new_classes.py), or,
    with too few photos yet, counts as ``other``. Refuses conflicting labels of one photo."""
    keys = {class_key(c): i for i, c in enumerate(classes)}
    if class_key(OTHER) in keys:
        raise DataError(f"the model has a class named like {OTHER!r}; learn cannot tell it from 'not one of these'")
    keys[class_key(OTHER)] = -1
    filled: list[ReviewRow] = []
    for file in files:
        for row in read_review_rows(Path(file), require_filled=False):
            if not row.correct_label:  # not reviewed
                continue
            label = row.correct_label
            if class_key(label) not in keys:
                if not new_classes:
                    raise DataError(f"{row.where}: {label!r} is not one of the model's classes "
                                    f"({', '.join(classes)}) nor {OTHER!r}; to learn it as a class of your own, "
                                    "pass --new-classes")
                typo = near_known(label, (*classes, OTHER))
                if typo is not None:
                    raise DataError(f"{row.where}: {label!r} is not one of the model's classes; did you mean "
                                    f"{typo!r}? (a class of your own must not look like one of them)")
            filled.append(ReviewRow(row.where, row.image_id, os.path.normpath(os.path.abspath(file_path(row.path))),
                                    label, row.why))
    if not filled:
        raise DataError(f"no row of {', '.join(map(str, files))} has correct_label filled in; label some photos first")
    first: dict[str, ReviewRow] = {}
    for row in filled:
        prev = first.setdefault(row.path, row)
        if class_key(prev.correct_label) != class_key(row.correct_label):
            raise DataError(f"{prev.where} and {row.where} label the same photo {row.path} differently "
                            f"({prev.correct_label!r}, {row.correct_label!r}); keep one")
    rows = list(first.values())
    plan = plan_classes(classes, [r.correct_label for r in rows if class_key(r.correct_label) not in keys],
                        min_new_class_labels)
    keys.update({class_key(c): i for i, c in enumerate(plan.classes)})
    return Labels(rows, [keys.get(class_key(r.correct_label), -1) for r in rows], plan)


def _workers(config: LearnConfig) -> int:
    """Decoding processes: the configured count, else tagging's default for this machine."""
    return default_workers() if config.workers is None else config.workers


def load_reviewed(config: LearnConfig, loaded: LoadedModel, progress: bool) -> ReviewedSet:
    labels = collect_labels(list(config.reviewed), loaded.classes, config.new_classes, config.min_new_class_labels)
    for name, n in labels.plan.too_few.items():
        log.warning("%r has %d reviewed photos, fewer than the %d a class of your own needs: learned as %r for now",
                    name, n, config.min_new_class_labels, OTHER)
    rows, indices = labels.rows, labels.indices
    other = sum(1 for i in indices if i < 0)
    kept = list(zip(rows, indices))
    # A photo deleted since the review is skipped and counted, not fatal: catalogs change
    # between the review and the weekly learn, and the other labels are still good.
    missing = [r.path for r, _ in kept if not os.path.isfile(r.path)]
    if missing:
        log.warning("skipping %d reviewed photos that no longer exist (first: %s)", len(missing), missing[0])
    gone = set(missing)
    kept = [(r, i) for r, i in kept if r.path not in gone]
    workers = _workers(config)
    paths = [r.path for r, _ in kept]
    images, ok, problems = decode_paths(paths, loaded.config, decoders_for(workers, len(paths)), progress)
    kept = [k for k, good in zip(kept, ok) if good]
    learnable = sum(1 for _, i in kept if i >= 0)
    if learnable < MIN_LABELS:
        raise DataError(f"only {learnable} reviewed photos can be learned from ({other} marked {OTHER!r}, "
                        f"{len(missing)} missing, {len(problems)} undecodable); label at least {MIN_LABELS}")
    paths = [r.path for r, _ in kept]
    views, view_of = jittered_views(paths, loaded.config, config.views, config.seed, workers, progress)
    return ReviewedSet(
        plan=labels.plan, paths=paths, labels=np.array([i for _, i in kept], np.int64),
        random=np.array([r.why == WHY_RANDOM for r, _ in kept], bool), images=images, other=other,
        missing=missing, undecodable=problems, views=views, view_of=view_of,
    )


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold number per example, each class dealt round-robin over the folds after a shuffle."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(labels), np.int64)
    offset = 0
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        fold[members] = (np.arange(len(members)) + offset) % k
        offset += len(members)  # classes continue where the last one stopped: folds stay even
    return fold


def fine_tune(init: LoadedModel, images: np.ndarray, labels: np.ndarray, config: LearnConfig,
              device: torch.device, seed: int, outliers: np.ndarray | None = None,
              after_epoch: Callable[[int, GarmentNet], None] | None = None) -> GarmentNet:
    """A copy of ``init`` fine-tuned on ``images``/``labels`` with ``train``'s recipe, and with
    ``outliers`` (photos of none of the classes) as outlier exposure. ``after_epoch(epoch,
    model)`` sees the weights after each epoch (benchmarks: weight averaging)."""
    recipe = TrainConfig()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build_model(init.config)
    model.load_state_dict(init.model.state_dict())
    model = model.to(device).to(memory_format=torch.channels_last)
    batch_size = min(config.batch_size, len(images))
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=recipe.momentum, nesterov=True,
                                weight_decay=recipe.weight_decay)
    steps = max(1, len(images) // batch_size) * config.epochs
    warmup = max(1, int(recipe.warmup_epochs * max(1, len(images) // batch_size)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_schedule(s, steps, warmup))
    # The simulated "worn by a model" augmentation knows Fashion-MNIST's garments only.
    # Classes of the retailer's own come after Fashion-MNIST's, whose indices it reads.
    fashion = init.classes[:len(FASHION_MNIST_CLASSES)] == FASHION_MNIST_CLASSES
    worn = recipe.worn_prob if fashion and init.config.channels == 1 else 0.0
    images_t, labels_t = torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device)
    state = TrainState(model, optimizer, scheduler, generator)
    settings = StepSettings(batch_size, device, recipe.label_smoothing, worn)  # float32, as before
    outliers_t = torch.from_numpy(outliers).to(device) if outliers is not None and len(outliers) else None
    for epoch in range(config.epochs):
        train_one_epoch(state, images_t, labels_t, settings, outliers=outliers_t, outlier_weight=config.outlier_weight)
        if after_epoch is not None:
            after_epoch(epoch, model)
    return model.eval()


def _tuned(init: LoadedModel, reviewed: ReviewedSet, train: np.ndarray, other: np.ndarray, pool: CatalogPool | None,
           config: LearnConfig, device: torch.device, seed: int) -> tuple[GarmentNet, int]:
    """The model fine-tuned on the ``train`` rows (and ``other`` rows as outliers); with a
    catalog pool, that model is the teacher and its student is returned, with the number
    of pool photos it was taught."""
    images, labels = reviewed.training_set(train)
    outliers = reviewed.images[other]
    teacher = fine_tune(init, images, labels, config, device, seed, outliers=outliers)
    if pool is None:
        return teacher, 0
    sure = pseudo_labels(teacher, pool, config.pseudo_share, device)
    student = fine_tune(init, np.concatenate([images, sure.images]), np.concatenate([labels, sure.labels]),
                        config, device, seed, outliers=outliers)
    return student, sure.photos


def learn(config: LearnConfig, command: str = "", progress: bool = False) -> dict[str, Any]:
    """Fine-tune on reviewed photos, calibrate out of fold, write ``config.out``; returns the card."""
    started = time.perf_counter()
    out = Path(os.path.abspath(config.out))  # "--out ." names the folder itself
    _check_out(out, config.overwrite)
    start = load_model(config.init)
    reviewed = load_reviewed(config, start, progress)
    # With classes of the retailer's own, every fine-tune starts from the model with a head
    # for them; the model as it was stays the reference the card compares against.
    init = extend_model(start, reviewed.classes, reviewed.images, reviewed.labels)
    pool = None
    if config.catalog is not None:
        workers = _workers(config)
        done = reviewed.paths + reviewed.missing + [p["path"] for p in reviewed.undecodable]
        pool = load_pool(config.catalog, done, init.config, config.catalog_sample,
                         config.pseudo_views, config.seed, workers, progress)
    device = resolve_device(config.device)
    inside = reviewed.labels >= 0
    k = max(2, min(config.folds, int(inside.sum()) // 2))
    fold = stratified_folds(reviewed.labels, k, config.seed)  # `other` rows are a stratum of their own
    eval_batch = 1024
    oof_all = np.zeros((len(inside), len(init.classes)), np.float32)
    pseudo_counts = []
    for f in range(k):
        train, held = (fold != f) & inside, fold == f
        log.info("fold %d/%d: fine-tuning on %d photos", f + 1, k, int(train.sum()))
        # The fold's own teacher labels the pool: the held-out fold's labels never reach its
        # model. Its photos do join the pool, unlabeled, as the catalog's photos join the final
        # student's: so the evidence read off this fold comes from a student that self-trained
        # on the photos it predicts, as the final student did on the photos it will tag.
        fold_pool = None if pool is None else with_photos(pool, *reviewed.photos(held))
        model, taken = _tuned(init, reviewed, train, (fold != f) & ~inside, fold_pool, config, device,
                              config.seed + f)
        pseudo_counts.append(taken)
        oof_all[held] = predict_logits_array(model, reviewed.images[held], device, eval_batch)
    final, taken = _tuned(init, reviewed, inside, ~inside, pool, config, device, config.seed + k)
    detector = tune_detector(
        ReviewedScores(oof_all[inside], reviewed.images[inside], reviewed.random[inside], oof_all[~inside],
                       reviewed.images[~inside], reviewed.random[~inside]),
        init.detector, config.max_in_scope_flagged, config.min_other, config.fallback_flag_share)
    data = reviewed.in_scope()
    n = len(data.labels)
    before = predict_logits_array(start.model.to(device).eval(), data.images, device, eval_batch)
    oof = oof_all[inside]

    calibration = calibrate(oof, data.labels)
    probs = softmax(oof, calibration["temperature"])
    correct = probs.argmax(1) == data.labels
    init_correct = before.argmax(1) == data.labels
    bounds = bounded_table(probs.max(1), correct)
    calibration.update({
        # tag --target-precision reads this table: its precision column is the lower bound, not
        # the point estimate. With a few hundred reviewed photos (not all of them a random draw)
        # the point estimate missed the target by up to 9 points on photos nobody reviewed
        # (docs/review-loop.md); the bound holds, or finds no threshold when the labels are too
        # few to vouch for the target, which is the honest answer.
        "review_table": [[row["threshold"], row["precision_lower_bound"], row["coverage"]] for row in bounds],
        "review_table_precision": f"one-sided Clopper-Pearson {CONFIDENCE_LEVEL:.0%} lower bound",
        "fitted_on": "reviewed photos",
        "source": "own_photos",
        "detail": f"out-of-fold predictions of {k} fine-tuned models on {n} reviewed photos "
                  f"({int((~correct).sum())} mistakes); never on photos the predicting model trained on",
        "folds": k,
        "n": n,
        "confidence_level": CONFIDENCE_LEVEL,
        "review_table_bounds": bounds,
    })
    if data.random.any():
        r = data.random
        calibration["random_slice"] = {
            "n": int(r.sum()), "accuracy": float(correct[r].mean()),
            "accuracy_lower_bound": clopper_pearson_lower(int(correct[r].sum()), int(r.sum())),
            "review_table_bounds": bounded_table(probs.max(1)[r], correct[r], points=21),
        }
    classes = init.classes
    cv_accuracy = float(correct.mean())
    trained_on = _path_keys(data.paths)
    earlier = set(init.card.get("training", {}).get("reviewed_path_keys", []))
    new = np.array([key not in earlier for key in trained_on], bool)
    card = {
        "name": out.name if out.name not in ("", ".") else "model",
        "description": f"{init.card.get('name', 'model')} fine-tuned on {n} reviewed catalog photos.",
        "input": init.card.get("input"),
        "preprocessing": init.card.get("preprocessing"),
        "training": {
            "dataset": "reviewed photos",
            "reviewed_files": [str(p) for p in config.reviewed],
            "command": command,
            "config": {**{k_: str(v) if isinstance(v, Path) else v for k_, v in vars(config).items()
                          if k_ != "reviewed"}},
            "init": init.ident,
            "labels_per_class": {c: int((data.labels == i).sum()) for i, c in enumerate(classes)},
            "labels": n,
            "jittered_views": len(data.views),
            "other": data.other,
            # --new-classes: the retailer's own classes learned here, and names still too rare
            # to be one (their photos were learned as `other`), with their reviewed photos.
            "new_classes": reviewed.plan.new,
            "too_few_for_a_class": reviewed.plan.too_few,
            "self_training": None if pool is None else {
                "catalog": str(config.catalog), "tagged_rows": pool.tagged, "flagged_left_out": pool.flagged,
                "sampled_out": pool.sampled_out, "pool": len(pool.paths), "share": config.pseudo_share,
                "views": config.pseudo_views, "pseudo_labeled": taken, "pseudo_labeled_per_fold": pseudo_counts},
            "missing_photos": len(data.missing),
            "missing_examples": data.missing[:20],
            "skipped_images": len(data.undecodable),
            "skipped_examples": data.undecodable[:20],
            "reviewed_path_keys": trained_on,
            "seconds": round(time.perf_counter() - started, 1),
            "device": describe_device(device),
        },
        "metrics": {
            "cv_accuracy": cv_accuracy,
            "cv_accuracy_lower_bound": clopper_pearson_lower(int(correct.sum()), n),
            "cv_per_class_accuracy": {c: float(correct[data.labels == i].mean()) if (data.labels == i).any() else None
                                      for i, c in enumerate(classes)},
            "init_accuracy": float(init_correct.mean()),
            # Photos the --init model never trained on: the fair ground for "is the new one better".
            "comparison": {"n": int(new.sum()),
                           "init_accuracy": float(init_correct[new].mean()) if new.any() else None,
                           "cv_accuracy": float(correct[new].mean()) if new.any() else None},
            "val_accuracy": cv_accuracy,  # what jobs/retrain.sh and older tools compare
            "test_accuracy": None,
        },
        "calibration": calibration,
        "out_of_scope": detector,
        "package_version": __version__,
        "torch_version": torch.__version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _write_model_folder(out, final, card, config.overwrite)
    return card


CARD_FILE = Path(WEIGHTS_FILE).with_suffix(".json").name


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that ``learn`` may not replace: a file, a folder holding anything
    but a model (the swap below replaces the whole folder, and it may be the user's), or,
    without ``overwrite``, a model."""
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder; choose a folder")
    entries = list(out.iterdir())
    foreign = sorted(e.name for e in entries
                     if not (e.is_file() and (e.name == CARD_FILE or e.suffix == ".safetensors")))
    if foreign:
        raise OutputError(f"{out} holds files that are not a model ({', '.join(foreign[:3])}"
                          f"{', ...' if len(foreign) > 3 else ''}); learn replaces the whole folder, "
                          "so choose a new or empty --out")
    if entries and not overwrite:
        raise OutputError(f"{out} already holds a model; pass --overwrite to replace it or choose another --out")


def _write_model_folder(out: Path, model: GarmentNet, card: dict[str, Any], overwrite: bool) -> None:
    """Write into a fresh sibling folder, then swap it in: a failed write never leaves a
    half model where ``tag --model`` would find it."""
    out = Path(out)
    output_folder(out.parent if str(out.parent) else Path("."))
    staging = out.with_name(f".{out.name}.new")
    shutil.rmtree(staging, ignore_errors=True)
    output_folder(staging)
    try:
        saved = save_model(model.cpu(), card, staging / WEIGHTS_FILE)
    except BaseException:  # a full disk, a kill: no half-written folder is left beside --out
        shutil.rmtree(staging, ignore_errors=True)
        raise
    card.update(saved)
    if out.exists():
        try:
            _check_out(out, overwrite)  # again: the folder may have changed during training
        except OutputError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)


def _path_keys(paths: list[str]) -> list[str]:
    """Short hashes of the photos' paths: enough to recognise them again, small in the card."""
    return sorted(hashlib.sha1(p.encode("utf-8", "surrogateescape")).hexdigest()[:12] for p in paths)


def bounded_table(confidence: np.ndarray, correct: np.ndarray, points: int = 101) -> list[dict[str, float]]:
    """For accepting the rows with confidence >= threshold: precision, its one-sided
    Clopper-Pearson lower bound at ``CONFIDENCE_LEVEL``, and coverage."""
    order = np.argsort(-confidence)
    conf, hits = confidence[order], np.cumsum(correct[order])
    table = []
    for q in np.linspace(0.0, 1.0, points):
        m = max(1, int(round(q * len(conf))))
        good = int(hits[m - 1])
        table.append({"threshold": float(conf[m - 1]), "precision": good / m,
                      "precision_lower_bound": clopper_pearson_lower(good, m),
                      "coverage": m / len(conf), "accepted": m})
    return table
