"""Self-training for ``learn``, in process: the screen behind docs/review-loop.md's
"Self-training on the unreviewed photos: measured, not adopted".

    python benchmarks/self_training.py ../shared/realphoto-dev --seeds 0 1 2 3 --budget 200 \
        --variants ens@0.5 final@0.5 ens@0.4 ens@0.6 half@0.5

Photos are decoded once (as ``tag`` decodes them); ``review``'s choice (random slice +
typical photos, ``review.choose``) takes ``--budget`` labels; ``learn.fine_tune`` trains
the 5 fold models and the final one on them, as ``learn`` does. Each variant then
fine-tunes a student from the bundled model on the labels plus the unreviewed photos its
teacher labels with at least the given confidence:

- ``ens@T``: teacher = the mean softmax of the 6 models;
- ``final@T``: teacher = the final model alone;
- ``half@T``: as ``ens@T``, but the pool is a random half of the unreviewed photos, and
  accuracy is also reported on the other half, which no model saw (the inductive case:
  photos added to the catalog after ``learn``).

Accuracy is on the photos not reviewed; "top half" is the precision of the more confident
half of them (what a review threshold can accept: a model confidently wrong scores low).
Prints one JSON line per seed. This screen skips the workbook, the flagged share of the
review, calibration and the detector: the CLI loop (``benchmarks/review_loop.py``) with
self-training wired into ``learn`` (commit 17c1889, reverted) is what decided.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from catalog_tagger.calibration import softmax
from catalog_tagger.checkpoint import load_model
from catalog_tagger.config import LearnConfig
from catalog_tagger.data.labeled import decode_paths
from catalog_tagger.learn import fine_tune, stratified_folds
from catalog_tagger.out_of_scope import features_and_logits
from catalog_tagger.review import choose
from catalog_tagger.runtime import predict_logits_array

FOLDS = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", type=Path, help="folder with images/ and labels.csv (file,label_id)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--budget", type=int, default=200)
    parser.add_argument("--variants", nargs="+", default=["ens@0.5", "half@0.5"])
    args = parser.parse_args()

    labels = pd.read_csv(args.photos / "labels.csv")
    init = load_model(None)
    images, ok, _ = decode_paths([str(args.photos / f) for f in labels["file"]], init.config, 2, False)
    y = labels["label_id"].to_numpy()[ok]
    features, bundled_logits = features_and_logits(init.model, images)
    device, config = torch.device("cpu"), LearnConfig()

    def probs(model: torch.nn.Module) -> np.ndarray:
        return softmax(predict_logits_array(model, images, device), 1.0)

    for seed in args.seeds:
        started = time.perf_counter()
        frame = pd.DataFrame({"path": labels["file"][ok]})
        chosen = np.array([i for i, _ in choose(frame, args.budget, 0.25, seed, features)])
        rest = np.ones(len(y), bool)
        rest[chosen] = False
        half = np.random.default_rng(seed + 7).random(len(y)) < 0.5
        fold = stratified_folds(y[chosen], FOLDS, seed)
        models = [fine_tune(init, images[chosen][fold != f], y[chosen][fold != f], config, device, seed + f)
                  for f in range(FOLDS)]
        models.append(fine_tune(init, images[chosen], y[chosen], config, device, seed + FOLDS))
        outputs = [probs(m) for m in models]
        ensemble = np.mean(outputs, axis=0)

        def accuracy(p: np.ndarray, where: np.ndarray) -> float:
            return round(float((p.argmax(1) == y)[where].mean()), 4)

        def top_half(p: np.ndarray, where: np.ndarray = rest) -> float:
            confident = np.flatnonzero(where)[np.argsort(-p[where].max(1))][: int(where.sum()) // 2]
            return round(float((p.argmax(1) == y)[confident].mean()), 4)

        row: dict[str, object] = {"seed": seed, "bundled": accuracy(softmax(bundled_logits, 1.0), rest),
                                  "final": accuracy(outputs[-1], rest), "final top half": top_half(outputs[-1]),
                                  "ensemble": accuracy(ensemble, rest)}
        for variant in args.variants:
            name, threshold = variant.split("@")
            teacher = outputs[-1] if name == "final" else ensemble
            pool = rest & half if name == "half" else rest
            use = pool & (teacher.max(1) >= float(threshold))
            targets = np.concatenate([y[chosen], teacher.argmax(1)[use]])
            student = fine_tune(init, np.concatenate([images[chosen], images[use]]), targets, config, device,
                                seed + 100)
            p = probs(student)
            row[variant] = accuracy(p, rest)
            row[f"{variant} top half"] = top_half(p)
            row[f"{variant} pseudo-labels"] = int(use.sum())
            row[f"{variant} pseudo-label precision"] = round(float((teacher.argmax(1) == y)[use].mean()), 4)
            if name == "half":
                row["final, unseen half"] = accuracy(outputs[-1], rest & ~half)
                row[f"{variant}, unseen half"] = accuracy(p, rest & ~half)
        row["seconds"] = round(time.perf_counter() - started)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
