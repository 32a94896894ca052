"""Choose the photos a person should label next, and write them as a workbook or a page.

A review of N photos serves two purposes that pull in different directions:

- measuring the model honestly needs photos drawn at random (``why = random``): precision
  estimated on them is unbiased for the photos that were not reviewed;
- teaching the model needs photos that stand for the rest of the catalog (``why = typical``).

So a share of the budget (``random_share``) is a seeded random draw from all taggable
photos, those the model labeled and those its detector flagged out of scope alike: ``learn``
estimates from them both how often in-scope photos are flagged and how many out-of-scope
ones are caught. A second share (``flagged_share``, ``why = out_of_scope``) goes to photos
the detector flagged, where a catalog's "none of these" photos are most likely to be: the
``other`` labels they get are what ``learn`` tunes the reject decision with. The rest are
the most typical labeled photos of as many different kinds of photo as the budget allows:
the photos are grouped into that many clusters by k-means on the model's penultimate
features (what the network "sees"), and the photo nearest each cluster's centre is asked
(the flagged share is chosen the same way among the flagged photos). Exact duplicates
(same sha256, from ``tag --hash``) are asked once.

Why not the least confident photos: measured on real photos (docs/review-loop.md), they
taught the model less than a random draw. The bundled model's mistakes on real photos are
mostly confident ones, and its least confident photos are odd ones (several items, unusual
crops) that say little about the rest; with few labels, a weak model learns most from
photos that look like many others, and from as many different looks as possible.
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
from .outputs import refuse_inputs
from .schema import file_path
from .sources import read_csv_text

log = logging.getLogger(__name__)

# The drop-down's entry for a photo that shows none of the model's classes; ``learn``
# keeps such rows out of class training.
OTHER = "other"
WHY_RANDOM = "random"
WHY_TYPICAL = "typical"
WHY_FLAGGED = "out_of_scope"
# The tag statuses a person can label: the photo decoded, and the model said something about it.
REVIEWABLE = ("ok", "out_of_scope")
KMEANS_ITERATIONS = 25


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
            frame = read_csv_text(path)
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise DataError(f"cannot read tags file {path}: {exc}") from exc
    missing = [c for c in ("image_id", "path", "status", "label", "confidence") if c not in frame.columns]
    if missing:
        raise DataError(f"{path} is not a catalog-tagger tag output: no column {missing[0]!r}")
    frame = frame[frame["status"].astype(str).isin(REVIEWABLE)].copy()
    frame["flagged"] = frame["status"].astype(str) == "out_of_scope"
    frame["confidence"] = pd.to_numeric(frame["confidence"], errors="coerce").fillna(0.0)
    frame["topk"] = [_topk(row) for row in frame.to_dict("records")]
    # A flagged row has no label; the person sees that, with the nearest class as a hint
    # (Parquet keeps it in topk_labels; a CSV row's label_2... start at the second nearest).
    hint = "topk_labels" in frame.columns
    nearest = [f"out of scope (nearest: {t[0][0]})" if t and hint else "out of scope" for t in frame["topk"]]
    frame["label"] = np.where(frame["flagged"], nearest, frame["label"].astype(str))
    frame["confidence"] = np.where(frame["flagged"], [t[0][1] if t and hint else 0.0 for t in frame["topk"]],
                                   frame["confidence"])
    return frame.reset_index(drop=True), classes


def _topk(row: dict[str, Any]) -> list[tuple[str, float]]:
    if "topk_labels" in row and row["topk_labels"] is not None:
        return [(str(a), float(b)) for a, b in zip(row["topk_labels"], row["topk_scores"])]
    pairs = [(str(row["label"]), float(row["confidence"]))] if str(row["label"]) else []
    k = 2
    while f"label_{k}" in row:  # CSV output: label_2, score_2, ...
        if str(row[f"label_{k}"]):
            pairs.append((str(row[f"label_{k}"]), float(row[f"score_{k}"] or 0.0)))
        k += 1
    return pairs


def reviewed_keys(files: list[Path]) -> set[str]:
    """Paths and image ids already in earlier review workbooks or CSVs (filled or not)."""
    from .review_html import read_review_html
    from .workbook import read_review_rows

    keys: set[str] = set()
    for file in files:
        if Path(file).suffix.lower() in (".html", ".htm"):  # a page handed out: its photos were asked
            try:
                rows = read_review_html(Path(file))
            except OSError as exc:
                raise DataError(f"cannot read {file}: {exc.strerror or exc}") from exc
        else:
            rows = [(row.image_id or "", row.path or "") for row in read_review_rows(Path(file), require_filled=False)]
        for image_id, path in rows:
            if path:
                keys.add(os.path.abspath(path))
            if image_id:
                keys.add("id:" + image_id)
    return keys


def choose(frame: pd.DataFrame, budget: int, random_share: float, seed: int,
           features: np.ndarray, flagged_share: float = 0.0) -> list[tuple[int, str]]:
    """Row positions with their ``why``: a random slice first (from every row), then typical
    flagged rows (``flagged_share`` of the budget, when ``frame["flagged"]`` has them), then
    typical labeled ones; a part that runs out of rows leaves its share to the next.

    ``features``: one row per frame row (the model's penultimate features); rows of NaN
    (photos that no longer decode) can be drawn at random but are never typical."""
    n = len(frame)
    budget = min(budget, n)
    rng = np.random.default_rng(seed)
    n_random = min(budget, int(round(budget * random_share)))
    if budget >= 4 and random_share > 0:
        n_random = max(1, n_random)
    picked = [(int(i), WHY_RANDOM) for i in sorted(rng.choice(n, size=n_random, replace=False))]
    free = np.ones(n, bool)
    free[[i for i, _ in picked]] = False
    free &= np.isfinite(features).all(1)
    if "sha256" in frame.columns:  # exact duplicates (tag --hash) are one photo to a person
        key = frame["sha256"]
        known = key.notna() & (key.astype(str) != "")
        free &= ~(key.duplicated() & known).to_numpy()
    flagged = frame["flagged"].to_numpy(bool) if "flagged" in frame.columns else np.zeros(n, bool)
    n_flagged = min(int(round(budget * flagged_share)), budget - n_random)
    picked += [(i, WHY_FLAGGED) for i in typical(features, free & flagged, n_flagged, rng)]
    left = budget - len(picked)
    labeled = typical(features, free & ~flagged, left, rng)
    picked += [(i, WHY_TYPICAL) for i in labeled]
    if len(labeled) < left:  # fewer labeled photos than their share: the flagged ones fill it
        taken = np.zeros(n, bool)
        taken[[i for i, _ in picked]] = True
        picked += [(i, WHY_FLAGGED) for i in typical(features, free & flagged & ~taken, left - len(labeled), rng)]
    return picked


def typical(features: np.ndarray, free: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    """``k`` rows among ``free``: k-means (k-means++ start) on the L2-normalised features,
    then the row nearest each centre, largest cluster first."""
    rows = np.flatnonzero(free)
    if k <= 0:
        return []
    if k >= len(rows):  # every photo is asked: nothing to choose (and k-means would be slow)
        return rows.tolist()
    x = features[rows].astype(np.float64)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    centres, assigned = kmeans(x, k, rng)
    chosen: list[int] = []
    sizes = np.bincount(assigned, minlength=k)
    for c in np.argsort(-sizes, kind="stable"):
        members = np.flatnonzero(assigned == c)
        if len(members):
            chosen.append(int(rows[members[np.argmin(((x[members] - centres[c]) ** 2).sum(1))]]))
    if len(chosen) < k:  # an emptied cluster: top up at random, never ask fewer than asked for
        left = np.setdiff1d(rows, chosen)
        chosen += rng.choice(left, k - len(chosen), replace=False).tolist()
    return chosen


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means from a k-means++ start: centres (k, D) and each row's cluster."""
    squared = (x ** 2).sum(1)

    def distances(centres: np.ndarray) -> np.ndarray:  # (N, k), without an (N, k, D) array
        return np.maximum(squared[:, None] - 2 * x @ centres.T + (centres ** 2).sum(1)[None], 0.0)

    first = int(rng.integers(len(x)))
    starts = [first]
    nearest = distances(x[[first]])[:, 0]
    # Greedy k-means++ (as scikit-learn does it): of a few candidates drawn in proportion to
    # the squared distance, keep the one that leaves the least; a plain draw can still land
    # in a large cluster twice and leave a small, distinct one without a centre.
    trials = 2 + int(math.log(k))
    for _ in range(1, k):
        total = nearest.sum()
        if total <= 0:
            starts.append(int(rng.integers(len(x))))
            continue
        candidates = rng.choice(len(x), size=trials, p=nearest / total)
        after = np.minimum(nearest[:, None], distances(x[candidates]))
        best = int(after.sum(0).argmin())
        starts.append(int(candidates[best]))
        nearest = after[:, best]
    centres = x[starts].copy()
    assigned = distances(centres).argmin(1)
    for _ in range(KMEANS_ITERATIONS):
        for c in range(k):
            members = assigned == c
            if members.any():
                centres[c] = x[members].mean(0)
        moved = distances(centres).argmin(1)
        if np.array_equal(moved, assigned):
            break
        assigned = moved
    return centres, assigned


def photo_features(paths: list[str], model: Path | None, workers: int | None = None) -> np.ndarray:
    """The penultimate features of ``model`` (default: bundled) for each photo, decoded the
    way tagging decodes it; NaN rows for photos that no longer decode. Any model of the
    same input works: the features only say which photos look alike."""
    from .checkpoint import load_model
    from .data.labeled import decode_paths
    from .out_of_scope import features_and_logits
    from .tagging import default_workers

    loaded = load_model(model)
    workers = default_workers() if workers is None else workers
    images, ok, _ = decode_paths([file_path(p) for p in paths], loaded.config,
                                 min(workers, max(1, len(paths) // 256)), False)
    feats, _ = features_and_logits(loaded.model, images)
    out = np.full((len(paths), feats.shape[1]), np.nan, np.float32)
    out[np.flatnonzero(ok)] = feats
    return out


def build_review(config: ReviewConfig) -> ReviewResult:
    """Choose ``config.budget`` photos from ``config.tags`` and write ``config.out``."""
    from .review_html import write_review_html
    from .workbook import write_review_workbook

    out = Path(config.out)
    kind = out.suffix.lower()
    if kind not in (".xlsx", ".html", ".htm"):
        raise UsageError(f"--out {out}: the review file must end in .xlsx or .html")
    # Even with --overwrite: the workbook being excluded holds a person's answers.
    refuse_inputs(out, [("TAGS", Path(config.tags)), *(("--exclude", Path(p)) for p in config.exclude)])
    if out.exists() and not config.overwrite:
        raise OutputError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    if not out.absolute().parent.is_dir():  # a typo, as tag refuses it: no folders made on a guess
        raise OutputError(f"output folder does not exist: {out.absolute().parent}")
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
                        f"({before} with status ok or out_of_scope, {excluded} already reviewed)")
    features = photo_features([str(p) for p in frame["path"]], config.model)
    picks = choose(frame, config.budget, config.random_share, config.seed, features, config.flagged_share)
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
    pool = multiprocessing.get_context("fork").Pool(workers)
    try:
        yield from pool.imap(functools.partial(thumbnail_jpeg, size=size), paths, chunksize=16)
    except BaseException:
        pool.terminate()
        raise
    else:
        # Workers leave when the queue tells them to. Not terminate() (Pool's `with`): it
        # stops them with SIGTERM, and a handler the calling process installed for SIGTERM,
        # which forked workers inherit, can swallow it; the join then waits for ever (seen
        # in the test suite once Ray had been loaded in the process).
        pool.close()
    finally:
        pool.join()


def thumbnail_jpeg(path: str, size: int) -> bytes | None:
    """A small JPEG of the photo (longest side ``size``), or None when it cannot be read."""
    import io

    from PIL import Image, ImageOps

    from .preprocess import to_8bit

    try:
        with Image.open(file_path(path)) as opened:
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
