"""Self-training: the catalog photos nobody reviewed, labeled where the model is sure.

A retailer reviews a few hundred photos of a catalog of thousands. The rest carry no label,
but they show what the catalog looks like: the model trained on the reviewed photos (the
teacher) labels them, the photos it is sure of join the reviewed ones with the teacher's
label (and a few jittered views each), and a student is fine-tuned from the starting model
on all of it. On real catalog thumbnails the labels taken were about 95-98% right, and the
student 0.3 (this rule) to 1.5 points (a softmax threshold) more accurate than the teacher on
the mean of 4 seeds (docs/review-loop.md). Every
teacher takes the same share of the pool, so the fold students the card's evidence comes from
are made like the final one.

Photos the tag run flagged as out of scope stay out: a sure garment label on a belt would
teach the student the very mistake the reviewer corrected. So do the photos the teacher is
least sure of: taking every photo with its argmax label gave nothing (same document).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data.labeled import decode_paths, decoders_for, jittered_views
from .errors import DataError
from .model import ModelConfig
from .review import read_tags
from .runtime import predict_logits_array
from .schema import file_path

log = logging.getLogger(__name__)


@dataclass
class CatalogPool:
    """Decoded catalog photos without a review, and their jittered views."""

    paths: list[str]
    images: np.ndarray
    views: np.ndarray
    view_of: np.ndarray  # row of ``images`` each view is of
    tagged: int  # rows of the tag output with a label or an out-of-scope flag
    flagged: int  # of those, flagged out of scope by the tag run: left out
    sampled_out: int  # left out to keep within the sample size


@dataclass
class PseudoLabels:
    """The pool photos a teacher is sure of, with its labels, views included."""

    images: np.ndarray
    labels: np.ndarray
    photos: int  # photos taken (views not counted)


def load_pool(tags: Path, reviewed: list[str], config: ModelConfig, sample: int, views: int, seed: int,
              workers: int, progress: bool) -> CatalogPool:
    """The photos of a ``tag`` output that were not reviewed, at most ``sample`` of them (a
    seeded random draw), decoded by the tagging decoder with ``views`` jittered views each."""
    frame, _ = read_tags(tags)
    flagged = int(frame["flagged"].sum())
    done = {os.path.normpath(os.path.abspath(p)) for p in reviewed}
    tagged = (os.path.normpath(os.path.abspath(file_path(str(p)))) for p in frame.loc[~frame["flagged"], "path"])
    paths = [p for p in tagged if p not in done]
    paths = list(dict.fromkeys(paths))  # a photo tagged twice (two image ids) counts once
    if not paths:
        raise DataError(f"{tags} holds no photo with a label that is not already reviewed; "
                        "pass the tag output of the catalog the reviewed photos came from")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(paths), sample, replace=False)) if len(paths) > sample else range(len(paths))
    picked = [paths[i] for i in chosen]
    # Photos deleted or changed since the tag run are skipped: the pool is a sample anyway.
    present = [p for p in picked if os.path.isfile(p)]
    images, ok, _ = decode_paths(present, config, decoders_for(workers, len(present)), progress)
    kept = [p for p, good in zip(present, ok) if good]
    if not kept:
        raise DataError(f"none of the {len(picked)} photos of {tags} that were not reviewed can be read now; "
                        "is the catalog where it was when it was tagged?")
    if len(kept) < len(picked):
        log.info("catalog pool: %d of %d sampled photos are gone or no longer decode", len(picked) - len(kept),
                 len(picked))
    extra, view_of = jittered_views(kept, config, views, seed + 1, workers, progress)
    return CatalogPool(kept, images, extra, view_of, tagged=len(frame), flagged=flagged,
                       sampled_out=len(paths) - len(picked))


def with_photos(pool: CatalogPool, images: np.ndarray, views: np.ndarray, view_of: np.ndarray) -> CatalogPool:
    """``pool`` with more unlabeled photos (``views[i]`` a view of ``images[view_of[i]]``), each
    with at most as many views as the pool's photos have."""
    per_photo = int(np.bincount(pool.view_of).max()) if len(pool.view_of) else 0
    order = np.argsort(view_of, kind="stable")
    starts = np.searchsorted(view_of[order], view_of[order])  # where each view's photo begins
    rank = np.empty(len(view_of), np.int64)  # each view's number among its photo's views
    rank[order] = np.arange(len(order)) - starts
    keep = rank < per_photo
    return CatalogPool(pool.paths, np.concatenate([pool.images, images]), np.concatenate([pool.views, views[keep]]),
                       np.concatenate([pool.view_of, view_of[keep] + len(pool.images)]), pool.tagged, pool.flagged,
                       pool.sampled_out)


def pseudo_labels(teacher: torch.nn.Module, pool: CatalogPool, share: float, device: torch.device) -> PseudoLabels:
    """The teacher's labels on the ``share`` of the pool photos it gives the highest softmax."""
    logits = predict_logits_array(teacher, pool.images, device, 1024)
    probs = torch.from_numpy(logits).softmax(1).numpy()
    sure = np.zeros(len(probs), bool)
    sure[np.argsort(-probs.max(1), kind="stable")[: int(round(share * len(probs)))]] = True
    guessed = probs.argmax(1)
    with_views = sure[pool.view_of]
    images = np.concatenate([pool.images[sure], pool.views[with_views]])
    labels = np.concatenate([guessed[sure], guessed[pool.view_of[with_views]]]).astype(np.int64)
    return PseudoLabels(images, labels, int(sure.sum()))
