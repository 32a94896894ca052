"""Rebuild sample_catalog/ from Fashion-MNIST test images (deterministic).

    python sample_catalog/generate.py [--data-dir DIR]

Four items per class, rendered dark-on-white as product photos of realistic sizes in
JPEG, PNG and WebP, some with transparency, EXIF rotation, palette, 16-bit or CMYK
storage; plus deliberately broken files, a manifest with SKUs and extra columns, and the
true labels (labels.csv) that the tests compare against.
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from catalog_tagger.data.fashion_mnist import load_split
from catalog_tagger.model import FASHION_MNIST_CLASSES
from catalog_tagger.synth import render_catalog_photo

HERE = Path(__file__).resolve().parent
PER_CLASS = 4
EXIF_ORIENTATION = 0x0112


def _save(item: np.ndarray, kind: str, path_stem: Path, rng: np.random.Generator) -> Path:
    """Write one item in the storage variant ``kind``; returns the file written."""
    if kind == "jpeg":
        path = path_stem.with_suffix(".jpg")
        render_catalog_photo(item, 20, canvas=(600, 800), noise=2.0, rng=rng).save(path, quality=90)
    elif kind == "png":
        path = path_stem.with_suffix(".png")
        render_catalog_photo(item, 14, canvas=(420, 560)).save(path, optimize=True)
    elif kind == "webp":
        path = path_stem.with_suffix(".webp")
        render_catalog_photo(item, 16, canvas=(480, 640), noise=1.0, rng=rng).save(path, quality=85)
    elif kind == "rgba":
        # A cut-out product shot: the garment opaque, the backdrop fully transparent (and black).
        path = path_stem.with_suffix(".png")
        photo = render_catalog_photo(item, 12, canvas=(400, 400)).convert("L")
        alpha = Image.fromarray(np.where(np.asarray(photo) < 250, 255, 0).astype(np.uint8), "L")
        rgba = Image.merge("RGBA", (photo, photo, photo, alpha))
        Image.fromarray(np.asarray(rgba) * (np.asarray(alpha)[..., None] > 0)).save(path)
    elif kind == "exif":
        # Pixels stored sideways, with the EXIF tag that tells viewers to turn them upright.
        path = path_stem.with_suffix(".jpg")
        photo = render_catalog_photo(item, 20, canvas=(600, 800), noise=2.0, rng=rng)
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = 6
        photo.transpose(Image.Transpose.ROTATE_90).save(path, quality=90, exif=exif)
    elif kind == "gif":
        path = path_stem.with_suffix(".gif")
        render_catalog_photo(item, 10, canvas=(300, 400)).convert("P", palette=Image.Palette.ADAPTIVE).save(path)
    elif kind == "png16":
        path = path_stem.with_suffix(".png")
        grey = np.asarray(render_catalog_photo(item, 14, canvas=(420, 560)).convert("L")).astype(np.uint16) * 257
        Image.fromarray(grey).save(path)
    elif kind == "cmyk":
        path = path_stem.with_suffix(".jpg")
        render_catalog_photo(item, 20, canvas=(600, 800)).convert("CMYK").save(path, quality=90)
    else:
        raise ValueError(kind)
    return path


KINDS = ["jpeg", "png", "webp", "jpeg", "rgba", "exif", "jpeg", "webp", "gif", "png16", "cmyk", "png"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path)
    args = parser.parse_args()

    test = load_split("test", args.data_dir)
    rng = np.random.default_rng(2024)
    images_dir = HERE / "images"
    shutil.rmtree(images_dir, ignore_errors=True)
    (images_dir / "broken").mkdir(parents=True)

    picks = [(label_id, int(index)) for label_id in range(len(FASHION_MNIST_CLASSES))
             for index in sorted(rng.choice(np.flatnonzero(test.labels == label_id), PER_CLASS, replace=False))]
    # Shuffled so that neither file names nor folder order give the class away.
    picks = [picks[i] for i in rng.permutation(len(picks))]
    rows = []
    for n, (label_id, index) in enumerate(picks):
        kind = KINDS[n % len(KINDS)]
        sku = f"SKU-{10001 + n:05d}"
        path = _save(test.images[index], kind, images_dir / sku.lower(), rng)
        rows.append({"sku": sku, "path": path.relative_to(HERE).as_posix(), "label_id": label_id,
                     "label_name": FASHION_MNIST_CLASSES[label_id], "fmnist_test_index": index, "storage": kind})

    # Broken on purpose: every nightly run meets files like these.
    good_jpeg = (HERE / rows[0]["path"]).read_bytes()
    (images_dir / "broken" / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 3])
    (images_dir / "broken" / "not-an-image.jpg").write_text("<html>404 Not Found</html>\n")
    (images_dir / "broken" / "empty.png").write_bytes(b"")

    with open(HERE / "labels.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    prices = rng.integers(999, 12999, len(rows) + 2) / 100
    manifest = [{"sku": r["sku"], "path": r["path"], "title": f"Catalog item {r['sku'][-3:]}, \"{r['storage']}\"",
                 "price_eur": f"{p:.2f}"} for r, p in zip(rows, prices)]
    manifest.append({"sku": "SKU-90001", "path": "images/broken/truncated.jpg", "title": "Upload cut short",
                     "price_eur": f"{prices[-2]:.2f}"})
    manifest.append({"sku": "SKU-90002", "path": "images/not-uploaded-yet.jpg", "title": "Photo pending",
                     "price_eur": f"{prices[-1]:.2f}"})
    with open(HERE / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(manifest[0]))
        writer.writeheader()
        writer.writerows(manifest)
    print(f"wrote {len(rows)} images, 3 broken files, manifest.csv and labels.csv to {HERE}")


if __name__ == "__main__":
    main()
