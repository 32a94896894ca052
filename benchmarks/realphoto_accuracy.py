"""Accuracy of a model on a folder of real, labeled product photos, per class.

    python benchmarks/realphoto_accuracy.py ../shared/realphoto-dev [--model PATH] [--json]
        [--target-precision 0.95] [--preprocessing conversion|naive|negate] [--levers v1|default|...]

The folder holds ``labels.csv`` (file,label_id,label_name) and the images it names. The
photos are tagged exactly as `catalog-tagger tag` would tag them (same preprocessing,
same model loading), then compared with the labels. Nothing is copied out of the folder.

``--preprocessing naive`` (grayscale resize to 28x28) and ``negate`` (the same, negated)
replace the Fashion-MNIST conversion, to measure what the conversion is worth.
``--levers`` runs the conversion with one of ``levers.LEVER_SETS`` (``v1`` is the
conversion before issue 19); per-style figures are in benchmarks/zero_shot_levers.py.
``--target-precision`` reports the precision of the rows `tag --target-precision` would
auto-accept on these photos, and the share it would send to review.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from catalog_tagger.config import TagConfig
from catalog_tagger.metrics import classification_report
from catalog_tagger.model import FASHION_MNIST_CLASSES
from catalog_tagger.run import run_tagging


def _naive(negate: bool):
    """A stand-in for preprocess.to_model_array: plain resize, as the reference systems do."""
    from PIL import Image

    def convert(img, config):
        small = np.asarray(img.convert("L").resize((config.input_size, config.input_size), Image.Resampling.BILINEAR))
        return (255 - small if negate else small)[None]

    return convert


def measure(folder: Path, model: Path | None = None, target_precision: float | None = None,
            preprocessing: str = "conversion", levers: str | None = None) -> dict:
    if levers is not None:
        from catalog_tagger import preprocess
        from catalog_tagger.levers import LEVER_SETS

        preprocess.DEFAULT = LEVER_SETS[levers]
    if preprocessing != "conversion":
        from catalog_tagger import decode

        decode.to_model_array = _naive(negate=preprocessing == "negate")
    labels = pd.read_csv(folder / "labels.csv")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "manifest.csv"
        pd.DataFrame({"path": [str((folder / f).resolve()) for f in labels["file"]],
                      "file": labels["file"]}).to_csv(manifest, index=False)
        out = Path(tmp) / "tags.parquet"
        # One process: the stand-in preprocessing above must be the one that runs.
        run_tagging(TagConfig(source=manifest, out=out, model=model, id_col="file", workers=0,
                              target_precision=target_precision), progress=False)
        rows = pd.read_parquet(out)
    predictions = rows[["image_id", "label_id", "needs_review"]].rename(columns={"label_id": "predicted"})
    merged = labels.merge(predictions, left_on="file", right_on="image_id")
    assert len(merged) == len(labels), "every photo must get a row"
    predicted = merged["predicted"].fillna(-1).astype(int).to_numpy()
    truth = merged["label_id"].to_numpy()
    ok = predicted >= 0
    report = classification_report(truth[ok], predicted[ok], FASHION_MNIST_CLASSES)
    report["n_total"] = len(merged)
    report["n_failed"] = int((~ok).sum())
    report["accuracy_all"] = float((predicted == truth).mean())
    if target_precision is not None:
        accepted = ~merged["needs_review"].to_numpy(bool)
        report["review"] = {"target_precision": target_precision, "review_share": float(1 - accepted.mean()),
                            "accepted_precision": float((predicted[accepted] == truth[accepted]).mean())
                            if accepted.any() else None}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--target-precision", type=float)
    parser.add_argument("--preprocessing", choices=["conversion", "naive", "negate"], default="conversion")
    parser.add_argument("--levers", help="a levers.LEVER_SETS name, e.g. v1 (before issue 19)")
    args = parser.parse_args()
    report = measure(args.folder, args.model, args.target_precision, args.preprocessing, args.levers)
    if args.json:
        print(json.dumps(report))
        return
    print(f"top-1 accuracy {report['accuracy_all']:.3f} on {report['n_total']} photos "
          f"({report['n_failed']} failed to decode)")
    print(f"{'class':<12} recall  precision  support")
    for name, row in report["per_class"].items():
        print(f"{name:<12} {row['recall']:6.3f}  {row['precision']:9.3f}  {row['support']:7d}")
    cm = np.asarray(report["confusion_matrix"])
    if "review" in report:
        r = report["review"]
        print(f"--target-precision {r['target_precision']}: {r['review_share']:.1%} sent to review, "
              f"accepted rows {r['accepted_precision']:.3f} precise")
    print("confusion (rows true, columns predicted):")
    print(pd.DataFrame(cm, index=[c[:8] for c in FASHION_MNIST_CLASSES],
                       columns=[c[:5] for c in FASHION_MNIST_CLASSES]))


if __name__ == "__main__":
    main()
