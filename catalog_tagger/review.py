"""Choose the photos a person should label next, and write them as a workbook or a page.

A review of N photos serves two purposes that pull in different directions:

- measuring the model honestly needs photos drawn at random (``why = random``): precision
  estimated on them is unbiased for the photos that were not reviewed;
- teaching the model needs photos that fix its mistakes, from every kind of photo in the
  catalog (``why = uncertain``).

So a share of the budget (``random_share``) is a seeded random draw from all taggable
photos. The rest gets a quota per predicted class that grows with the square root of the
class's size (every predicted class at least one photo; small classes get more than their
share, large ones still most), filled by a seeded draw weighted by 1 - confidence + 1:
less confident photos are up to twice as likely, yet the draw stays spread over the whole
range (diversity). Exact duplicates (same sha256, from ``tag --hash``) are asked once.
Why not simply the least confident photos: see ``UNCERTAINTY_FLOOR``.
"""

from __future__ import annotations

import functools
import logging
import math
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from .config import ReviewConfig
from .errors import DataError, OutputError, UsageError

log = logging.getLogger(__name__)

# The drop-down's entry for a photo that shows none of the model's classes; ``learn``
# keeps such rows out of class training.
OTHER = "other"
WHY_RANDOM = "random"
WHY_UNCERTAIN = "uncertain"
# Sampling weight of an uncertain-part photo is 1 - confidence + this floor. Measured on real
# photos (docs/review-loop.md): taking only the smallest margins (floor 0) taught the model
# less than a random draw (55% vs 74% accuracy after 50 labels), because the bundled model's
# mistakes on real photos are mostly confident ones; a floor of 1 keeps the draw
# representative while still favouring the unsure.
UNCERTAINTY_FLOOR = 1.0


@dataclass
class ReviewItem:
    image_id: str
    path: str
    label: str
    confidence: float
    topk: list[tuple[str, float]]
    why: str


@dataclass
class ReviewResult:
    out: Path
    items: list[ReviewItem]
    candidates: int
    excluded: int
    bytes: int
    classes: tuple[str, ...]


def read_tags(path: Path) -> tuple[pd.DataFrame, tuple[str, ...] | None]:
    """A ``tag`` output (Parquet or CSV) as a frame with ``topk`` (list of (label, score))
    per row, and the class list from the Parquet metadata when present."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tags file not found: {path}")
    classes = None
    try:
        if path.suffix.lower() == ".parquet":
            table = pq.read_table(path)
            meta = table.schema.metadata or {}
            if b"classes" in meta:
                import json

                classes = tuple(json.loads(meta[b"classes"]))
            frame = table.to_pandas()
        else:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise DataError(f"cannot read tags file {path}: {exc}") from exc
    missing = [c for c in ("image_id", "path", "status", "label", "confidence") if c not in frame.columns]
    if missing:
        raise DataError(f"{path} is not a catalog-tagger tag output: no column {missing[0]!r}")
    frame = frame[frame["status"].astype(str) == "ok"].copy()
    frame["confidence"] = pd.to_numeric(frame["confidence"], errors="coerce").fillna(0.0)
    frame["topk"] = [_topk(row) for row in frame.to_dict("records")]
    return frame.reset_index(drop=True), classes


def _topk(row: dict[str, Any]) -> list[tuple[str, float]]:
    if "topk_labels" in row and row["topk_labels"] is not None:
        return [(str(a), float(b)) for a, b in zip(row["topk_labels"], row["topk_scores"])]
    pairs = [(str(row["label"]), float(row["confidence"]))]
    k = 2
    while f"label_{k}" in row:  # CSV output: label_2, score_2, ...
        if str(row[f"label_{k}"]):
            pairs.append((str(row[f"label_{k}"]), float(row[f"score_{k}"] or 0.0)))
        k += 1
    return pairs


def reviewed_keys(files: list[Path]) -> set[str]:
    """Paths and image ids already in earlier review workbooks or CSVs (filled or not)."""
    from .workbook import read_review_rows

    keys: set[str] = set()
    for file in files:
        for row in read_review_rows(Path(file), require_filled=False):
            if row.path:
                keys.add(os.path.abspath(row.path))
            if row.image_id:
                keys.add("id:" + row.image_id)
    return keys


def choose(frame: pd.DataFrame, budget: int, random_share: float, seed: int) -> list[tuple[int, str]]:
    """Row positions with their ``why``: a random slice first, then uncertain ones."""
    n = len(frame)
    budget = min(budget, n)
    rng = np.random.default_rng(seed)
    n_random = min(budget, int(round(budget * random_share)))
    if budget >= 4 and random_share > 0:
        n_random = max(1, n_random)
    picked = [(int(i), WHY_RANDOM) for i in sorted(rng.choice(n, size=n_random, replace=False))]
    taken = {i for i, _ in picked}
    picked += [(i, WHY_UNCERTAIN) for i in _uncertain(frame, budget - n_random, taken, rng)]
    return picked


def _uncertain(frame: pd.DataFrame, k: int, taken: set[int], rng: np.random.Generator) -> list[int]:
    """``k`` rows not in ``taken``: a quota per predicted class, growing with the square
    root of its size (every class at least one while the budget lasts), filled by weighted
    sampling that favours low confidence without taking only the least confident."""
    if k <= 0:
        return []
    confidence = frame["confidence"].to_numpy(np.float64)
    free = np.array([i not in taken for i in range(len(frame))], bool)
    if "sha256" in frame.columns:  # exact duplicates (tag --hash) are one photo to a person
        key = frame["sha256"]
        known = key.notna() & (key.astype(str) != "")
        free &= ~(key.duplicated() & known).to_numpy()
    labels = frame["label"].astype(str).to_numpy()
    members = {c: np.flatnonzero(free & (labels == c)) for c in sorted(set(labels[free]))}
    quota = _allocate({c: math.sqrt(len(m)) for c, m in members.items()}, {c: len(m) for c, m in members.items()}, k)
    chosen: list[int] = []
    for c, m in members.items():
        if quota[c]:
            weight = 1.0 - confidence[m] + UNCERTAINTY_FLOOR
            chosen += rng.choice(m, quota[c], replace=False, p=weight / weight.sum()).tolist()
    return sorted(chosen, key=lambda i: confidence[i])


def _allocate(weight: dict[str, float], size: dict[str, int], k: int) -> dict[str, int]:
    """Split ``k`` over classes: one each first (every predicted class represented, while
    the budget lasts), the rest in proportion to ``weight``, never more than a class has."""
    order = sorted(weight, key=lambda c: -weight[c])
    share = {c: 0 for c in order}
    for c in order[:k]:
        share[c] = 1
    left = k - sum(share.values())
    while left > 0:
        open_ = [c for c in order if share[c] < size[c]]
        if not open_:
            break
        total = sum(weight[c] for c in open_)
        want = {c: weight[c] / total * left for c in open_}
        given = 0
        for c in open_:
            add = min(size[c] - share[c], math.floor(want[c]))
            share[c] += add
            given += add
        if given == 0:  # remainders: one more to the classes with the largest ones
            for c in sorted(open_, key=lambda c: -(want[c] - math.floor(want[c])))[:left]:
                share[c] += 1
                given += 1
        left -= given
    return share


def build_review(config: ReviewConfig) -> ReviewResult:
    """Choose ``config.budget`` photos from ``config.tags`` and write ``config.out``."""
    from .review_html import write_review_html
    from .workbook import write_review_workbook

    out = Path(config.out)
    kind = out.suffix.lower()
    if kind not in (".xlsx", ".html", ".htm"):
        raise UsageError(f"--out {out}: the review file must end in .xlsx or .html")
    if out.exists() and not config.overwrite:
        raise OutputError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    frame, classes = read_tags(config.tags)
    if classes is None:
        from .checkpoint import load_model

        classes = load_model(config.model).classes
    before = len(frame)
    excluded = 0
    if config.exclude:
        keys = reviewed_keys(list(config.exclude))
        mask = np.array([os.path.abspath(p) in keys or ("id:" + str(i)) in keys
                         for p, i in zip(frame["path"], frame["image_id"])], bool)
        excluded = int(mask.sum())
        frame = frame[~mask].reset_index(drop=True)
    if frame.empty:
        raise DataError(f"{config.tags} has no taggable photo left to review "
                        f"({before} with status ok, {excluded} already reviewed)")
    picks = choose(frame, config.budget, config.random_share, config.seed)
    items = [ReviewItem(str(frame["image_id"].iat[i]), str(frame["path"].iat[i]), str(frame["label"].iat[i]),
                        float(frame["confidence"].iat[i]), list(frame["topk"].iat[i]), why) for i, why in picks]
    if kind == ".xlsx":
        write_review_workbook(out, items, classes, config.thumbnail_size)
    else:
        write_review_html(out, items, classes, config.thumbnail_size)
    return ReviewResult(out, items, len(frame), excluded, out.stat().st_size, classes)


def thumbnails(paths: list[str], size: int, workers: int | None = None) -> Iterator[bytes | None]:
    """``thumbnail_jpeg`` of each path, in order; decoded in parallel processes, since
    decoding the full-size photos is nearly all of the time a large review takes."""
    from .tagging import default_workers

    workers = default_workers() if workers is None else workers
    if workers <= 1 or len(paths) < 64 or "fork" not in multiprocessing.get_all_start_methods():
        yield from (thumbnail_jpeg(p, size) for p in paths)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(functools.partial(thumbnail_jpeg, size=size), paths, chunksize=16)


def thumbnail_jpeg(path: str, size: int) -> bytes | None:
    """A small JPEG of the photo (longest side ``size``), or None when it cannot be read."""
    import io

    from PIL import Image, ImageOps

    from .preprocess import to_8bit

    try:
        with Image.open(path) as opened:
            opened.draft("RGB", (size * 2, size * 2))  # JPEG: decode at a reduced scale, much faster
            # The same mode handling as tagging: 16-bit, palette, transparency onto white.
            img = to_8bit(ImageOps.exif_transpose(opened))
            img.thumbnail((size, size))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=70, optimize=True)
            return buf.getvalue()
    except Exception as exc:  # any decoder failure: the row stays, without a picture
        log.warning("no thumbnail for %s: %s", path, exc)
        return None
