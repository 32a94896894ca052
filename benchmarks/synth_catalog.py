"""Build a synthetic catalog of realistic product JPEGs from Fashion-MNIST test items.

    python benchmarks/synth_catalog.py OUT_DIR [--n 1000] [--size 1080x1440] [--quality 90]

Each item is rendered dark-on-white, enlarged to fill most of the frame, on a white,
slightly noisy background: the size and file weight of a real catalog photo. A
``labels.csv`` beside the images holds the true classes.
"""

from __future__ import annotations

import argparse
import csv
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from catalog_tagger.data.fashion_mnist import load_split
from catalog_tagger.synth import render_catalog_photo


def _render(job: tuple[int, np.ndarray, int, int, int, str]) -> None:
    index, item, width, height, quality, out = job
    scale = max(1, int(0.85 * min(width, height) / 28))
    rng = np.random.default_rng(index)
    render_catalog_photo(item, scale, canvas=(width, height), noise=3.0, rng=rng).save(out, quality=quality)


def build(out_dir: Path, n: int, width: int, height: int, quality: int = 90) -> list[Path]:
    test = load_split("test")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"photo-{i:06d}.jpg" for i in range(n)]
    jobs = [(i, test.images[i % len(test)], width, height, quality, str(p)) for i, p in enumerate(paths)
            if not p.exists()]
    with ProcessPoolExecutor() as pool:
        list(pool.map(_render, jobs, chunksize=16))
    with open(out_dir / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "label_id"])
        writer.writerows((p.name, int(test.labels[i % len(test)])) for i, p in enumerate(paths))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--size", default="1080x1440", help="WIDTHxHEIGHT")
    parser.add_argument("--quality", type=int, default=90)
    args = parser.parse_args()
    width, height = map(int, args.size.lower().split("x"))
    build(args.out, args.n, width, height, args.quality)
    print(f"{args.n} JPEGs of {width}x{height} in {args.out}")


if __name__ == "__main__":
    main()
