"""What each preprocessing lever is worth to the bundled model, per photo style and class.

    python benchmarks/zero_shot_levers.py ../shared/realphoto-dev ../shared/realphoto-dev2 \
        [--levers v1,default,...] [--model PATH [--model PATH ...]] [--grid OUT.png] [--json]

The photos are decoded as ``decode.py`` decodes them for ``tag`` (JPEG draft mode at 4x
the input size, YCbCr for a 1-channel model, whose Y plane is the grey decode of the lever
sets without the colour cutout, bit for bit; EXIF rotation) and converted by
``preprocess.convert`` with the named lever set (``levers.LEVER_SETS``), so each
lever can be measured on its own without editing the product. Reports top-1 and recall
per class for each style: ``dev`` (catalog thumbnails), ``studio`` and ``home``
(realphoto-dev2's ``style`` column). It also converts the 10,000 Fashion-MNIST test
images (already 28x28, light on black) with the same lever set, as ``tag`` would convert them
written out as images; ``unchanged`` says whether the lever set left them as they are
(the trim to the item re-centres them, so none does: 94.60% against ``evaluate``'s 94.93%
on the raw arrays).

``--speed FOLDER --levers v1,default`` instead times ``catalog-tagger tag`` on a folder of
large JPEGs (benchmarks/synth_catalog.py) with each lever set as the product's default,
interleaved over ``--runs`` runs (tag's worker processes are forked, so they inherit it).

``--grid`` writes a PNG of photos beside the 28x28 inputs the model sees (per lever set),
to look at what a lever does. Nothing is copied out of the photo folders.

``--model`` more than once measures the models as an ensemble: each one's probabilities at
its card's temperature, averaged (with one model the labels are its own argmax).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps

from catalog_tagger import preprocess
from catalog_tagger.checkpoint import LoadedModel, load_model
from catalog_tagger.levers import LEVER_SETS, Levers
from catalog_tagger.model import FASHION_MNIST_CLASSES, ModelConfig

FMNIST = Path("/usr/share/datasets/fashion-mnist")


# Decoded once for every lever set: YCbCr's Y plane is bit for bit the grey decode, so the
# grey lever sets see what ``tag`` gives them and the colour cutout its colours.
COLOUR = Levers(clutter="grabcut-fast", colour_cutout=True)


def decode_like_tag(path: Path, config: ModelConfig) -> Image.Image:
    """The image ``decode._decode_open`` hands to the preprocessing (JPEG draft mode)."""
    img = Image.open(path)
    if img.format in ("JPEG", "MPO"):
        target = 4 * config.input_size
        img.draft(preprocess.draft_mode(config, COLOUR), (target, target))
    img.load()
    return ImageOps.exif_transpose(img)


def load_photos(folders: list[Path], config: ModelConfig) -> pd.DataFrame:
    rows = []
    for folder in folders:
        labels = pd.read_csv(folder / "labels.csv")
        for rec in labels.itertuples():
            style = getattr(rec, "style", "dev") if "style" in labels.columns else "dev"
            rows.append({"file": str(folder / rec.file), "label": int(rec.label_id), "style": style,
                         "image": decode_like_tag(folder / rec.file, config)})
    return pd.DataFrame(rows)


def fashion_mnist_test() -> tuple[np.ndarray, np.ndarray]:
    from catalog_tagger.data.idx import read_idx

    images = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")
    return np.asarray(images), np.asarray(labels)


@torch.inference_mode()
def predict(models: list[LoadedModel], arrays: np.ndarray) -> np.ndarray:
    """Labels of ``arrays``: the argmax of the models' mean probability."""
    out = []
    for i in range(0, len(arrays), 512):
        x = torch.from_numpy(arrays[i : i + 512]).float().div_(255)
        probs = torch.stack([torch.softmax(m.model(x) / m.temperature, dim=1) for m in models])
        out.append(probs.mean(0).argmax(1).numpy())
    return np.concatenate(out)


def convert_all(images, config: ModelConfig, levers: Levers) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    arrays = np.stack([preprocess.convert(img, config, levers) for img in images])
    return arrays, (time.perf_counter() - start) / max(1, len(images))


def report(photos: pd.DataFrame, predicted: np.ndarray) -> dict:
    out = {}
    for style, part in photos.groupby("style", sort=False):
        pred = predicted[part.index.to_numpy()]
        truth = part["label"].to_numpy()
        per_class = {}
        for c, name in enumerate(FASHION_MNIST_CLASSES):
            sel = truth == c
            if sel.any():
                per_class[name] = {"recall": float((pred[sel] == c).mean()), "support": int(sel.sum())}
        out[style] = {"accuracy": float((pred == truth).mean()), "n": len(part), "per_class": per_class}
    return out


def save_grid(photos: pd.DataFrame, lever_names: list[str], config: ModelConfig, path: Path,
              per_style: int = 12, seed: int = 0) -> None:
    """Each row: a photo (shrunk to 84 px high) and the model's input under each lever set."""
    rng = np.random.default_rng(seed)
    picks = []
    for _, part in photos.groupby("style", sort=False):
        picks += list(rng.choice(part.index.to_numpy(), size=min(per_style, len(part)), replace=False))
    cell = 84
    width = cell + cell * len(lever_names)
    grid = Image.new("L", (width * 2, cell * ((len(picks) + 1) // 2)), 40)
    for n, i in enumerate(picks):
        x0, y0 = (n % 2) * width, (n // 2) * cell
        photo = photos.at[i, "image"].convert("L").copy()
        photo.thumbnail((cell, cell))
        grid.paste(photo, (x0, y0))
        for k, name in enumerate(lever_names):
            arr = preprocess.convert(photos.at[i, "image"], config, LEVER_SETS[name])[0]
            grid.paste(Image.fromarray(arr).resize((cell - 4, cell - 4), Image.Resampling.NEAREST),
                       (x0 + cell * (k + 1), y0))
    grid.save(path)


def speed(folder: Path, names: list[str], runs: int) -> dict[str, list[float]]:
    """images/s of ``tag`` with each lever set as ``preprocess.DEFAULT``, side by side."""
    import statistics
    import tempfile

    from catalog_tagger.config import TagConfig
    from catalog_tagger.run import run_tagging

    saved = preprocess.DEFAULT
    results: dict[str, list[float]] = {n: [] for n in names}
    try:
        for _ in range(runs):
            for name in names:
                preprocess.DEFAULT = LEVER_SETS[name]
                with tempfile.TemporaryDirectory() as tmp:
                    start = time.perf_counter()
                    summary = run_tagging(TagConfig(source=folder, out=Path(tmp) / "t.parquet"), progress=False)
                    results[name].append(summary.total / (time.perf_counter() - start))
    finally:
        preprocess.DEFAULT = saved
    base = statistics.median(results[names[0]])
    for name in names:
        med = statistics.median(results[name])
        print(f"{name:<22} {med:7.1f} images/s ({med / base:.2f}x of {names[0]})  runs: "
              + ", ".join(f"{v:.0f}" for v in results[name]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="*")
    parser.add_argument("--levers", default=",".join(LEVER_SETS))
    parser.add_argument("--model", type=Path, action="append", help="a model folder; repeat for an ensemble")
    parser.add_argument("--grid", type=Path)
    parser.add_argument("--no-fmnist", action="store_true")
    parser.add_argument("--per-class", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--speed", type=Path, help="time tag on this folder of JPEGs instead")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if args.speed:
        speed(args.speed, [n for n in args.levers.split(",") if n], args.runs)
        return
    torch.set_num_threads(1)
    models = [load_model(path) for path in args.model or [None]]
    config = models[0].config
    same = (config.input_size, config.channels, config.classes)
    if any((m.config.input_size, m.config.channels, m.config.classes) != same for m in models):
        raise SystemExit("the models of an ensemble must take the same input and name the same classes")
    photos = load_photos(args.folders, config)
    names = [n for n in args.levers.split(",") if n]
    if args.grid:
        save_grid(photos, names, config, args.grid)
    fm_images, fm_labels = (None, None) if args.no_fmnist else fashion_mnist_test()
    results = {}
    for name in names:
        levers = LEVER_SETS[name]
        arrays, seconds = convert_all(photos["image"], config, levers)
        styles = report(photos, predict(models, arrays))
        res: dict[str, object] = {"styles": styles, "ms_per_photo": 1000 * seconds}
        if fm_images is not None:
            fm = np.stack([preprocess.convert(Image.fromarray(a), config, levers) for a in fm_images])
            res["fmnist_unchanged"] = bool((fm[:, 0] == fm_images).all())
            res["fmnist_accuracy"] = float((predict(models, fm) == fm_labels).mean())
        results[name] = res
        if not args.json:
            line = "  ".join(f"{s} {v['accuracy']:.3f}" for s, v in styles.items())
            fmn = (f"  fmnist {res['fmnist_accuracy']:.4f} unchanged={res['fmnist_unchanged']}"
                   if fm_images is not None else "")
            print(f"{name:<22} {line}{fmn}  {res['ms_per_photo']:.1f} ms/photo", flush=True)
            if args.per_class:
                for s, v in styles.items():
                    print("    " + s.ljust(7) + " ".join(f"{c[:5]}={r['recall']:.2f}({r['support']})"
                                                      for c, r in v["per_class"].items()))
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
