"""k-fold cross-validation of training on your own labeled photos.

    python benchmarks/crossval.py ../shared/realphoto-dev [--folds 5] [--init bundled|none|PATH]
                                  [--epochs 20] [--input-size 28] [--channels 1]

The folder holds ``labels.csv`` (file,label_id,label_name). Each fold trains with
`catalog-tagger train --manifest` on the other folds (fine-tuning the bundled model by
default) and evaluates with `catalog-tagger evaluate --manifest` on the held-out fold.
Folds are stratified by class and seeded. Prints per-fold and mean accuracy and the mean
recall per class.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from catalog_tagger.checkpoint import bundled_model_path
from catalog_tagger.config import EvalConfig, TrainConfig
from catalog_tagger.evaluate import evaluate_model
from catalog_tagger.train import fit


def fold_ids(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = np.zeros(len(labels), np.int64)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        ids[members] = np.arange(len(members)) % folds
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--init", default="bundled", help="bundled, none, or a model path")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--input-size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    labels = pd.read_csv(args.folder / "labels.csv")
    labels["path"] = [str((args.folder / f).resolve()) for f in labels["file"]]
    ids = fold_ids(labels["label_id"].to_numpy(), args.folds, args.seed)
    init = {"bundled": bundled_model_path(), "none": None}.get(args.init, Path(args.init) if args.init else None)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.folds):
            train_csv, test_csv = Path(tmp) / f"train{k}.csv", Path(tmp) / f"test{k}.csv"
            labels[ids != k][["path", "label_name"]].to_csv(train_csv, index=False)
            labels[ids == k][["path", "label_name"]].to_csv(test_csv, index=False)
            out = Path(tmp) / f"fold{k}"
            fit(TrainConfig(out=out, manifest=train_csv, label_col="label_name", init=init, epochs=args.epochs,
                            lr=args.lr, batch_size=args.batch_size, input_size=args.input_size,
                            channels=args.channels, seed=args.seed, worn_prob=0.0), progress=False)
            result = evaluate_model(EvalConfig(model=out, manifest=test_csv, label_col="label_name"))
            results.append(result)
            if not args.json:
                print(f"fold {k}: accuracy {result['accuracy']:.3f} on {result['n']}")
    mean = statistics.mean(r["accuracy"] for r in results)
    classes = list(results[0]["per_class"])
    recall = {c: statistics.mean(r["per_class"][c]["recall"] for r in results) for c in classes}
    if args.json:
        print(json.dumps({"mean_accuracy": mean, "folds": [r["accuracy"] for r in results], "recall": recall}))
        return
    print(f"mean accuracy over {args.folds} folds: {mean:.3f} (min {min(r['accuracy'] for r in results):.3f})")
    for c, v in recall.items():
        print(f"  {c:<12} recall {v:.3f}")


if __name__ == "__main__":
    main()
