"""Tagging speed, side by side on the same files and machine.

    python benchmarks/tag_speed.py FOLDER [--runs 3] [--model PATH] [--skip-naive] [--make large|small]

1. decode limit: reduced-size JPEG decoding only (Pillow draft mode), all cores, no model;
2. decode + resize limit: the same plus a plain resize to the model's 28x28, the least any
   tagger must do (on small photos decoding alone is so cheap that this is the fair limit);
3. naive reference: full-size PIL decode, torchvision Resize/ToTensor, the same model,
   batch 64, a default DataLoader (what the reference systems do);
4. catalog-tagger tag with default settings.

Prints the CPU model and instruction set, images/s (median of --runs, the measurements
interleaved) and the ratios of tag to each. ``--make large`` (1,000 catalog JPEGs of
1080x1440) or ``--make small`` (6,000 thumbnails of 60x80) first renders the standard
catalog into FOLDER with benchmarks/synth_catalog.py, where it is not there yet.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from synth_catalog import build as build_catalog  # the sibling script
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from catalog_tagger.checkpoint import load_model
from catalog_tagger.config import TagConfig
from catalog_tagger.run import run_tagging
from catalog_tagger.runtime import describe_device
from catalog_tagger.tagging import default_workers

# The standard catalogs: images, width, height.
CATALOGS = {"large": (1000, 1080, 1440), "small": (6000, 60, 80)}


def draft_decode(path: str, size: int = 112) -> Image.Image:
    """What the decode limit counts: libjpeg at the reduced scale `tag` asks for (4x 28 px)."""
    img = Image.open(path)
    img.draft("L", (size, size))
    img.load()  # also closes the file of a single-frame image opened by name
    return img


def _draft_decode(paths: list[str]) -> int:
    for path in paths:
        draft_decode(path).close()
    return len(paths)


def _draft_decode_resize(paths: list[str]) -> int:
    for path in paths:
        with draft_decode(path) as img:
            img.resize((28, 28), Image.Resampling.BILINEAR).close()
    return len(paths)


def decode_limit(paths: list[str], work: Callable[[list[str]], int] = _draft_decode) -> float:
    """Images/s of ``work`` alone on all cores (one process per core, no model)."""
    workers = default_workers()
    chunks = [paths[i::workers] for i in range(workers)]
    start = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        done = sum(pool.map(work, chunks))
    return done / (time.perf_counter() - start)


class NaiveDataset(Dataset):
    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        self.transform = transforms.Compose([transforms.Resize((28, 28)), transforms.ToTensor()])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(Image.open(self.paths[i]).convert("L"))


@torch.inference_mode()
def naive_reference(paths: list[str], model: torch.nn.Module) -> float:
    start = time.perf_counter()
    n = 0
    for batch in DataLoader(NaiveDataset(paths), batch_size=64):
        model(batch).argmax(1)
        n += len(batch)
    return n / (time.perf_counter() - start)


def catalog_tagger(folder: Path, model: Path | None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = run_tagging(TagConfig(source=folder, out=Path(tmp) / "tags.parquet", model=model), progress=False)
        return summary.total / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--skip-naive", action="store_true", help="Leave out the (slow) naive reference.")
    parser.add_argument("--make", choices=sorted(CATALOGS), help="Render the standard catalog into FOLDER first.")
    args = parser.parse_args()

    if args.make:
        n, width, height = CATALOGS[args.make]
        build_catalog(args.folder, n, width, height)
    paths = sorted(str(p) for p in args.folder.glob("*.jpg"))
    if not paths:
        raise SystemExit(f"no .jpg files in {args.folder}; render a catalog with --make large or --make small")
    model = load_model(args.model).model.eval()
    results: dict[str, list[float]] = {"decode limit": [], "decode + resize limit": [], "naive reference": [],
                                       "catalog-tagger tag": []}
    for _ in range(args.runs):
        # Interleaved, so that machine noise hits all of them alike.
        results["decode limit"].append(decode_limit(paths))
        results["decode + resize limit"].append(decode_limit(paths, _draft_decode_resize))
        if not args.skip_naive:
            results["naive reference"].append(naive_reference(paths, model))
        results["catalog-tagger tag"].append(catalog_tagger(args.folder, args.model))
    median = {k: statistics.median(v) for k, v in results.items() if v}
    print(f"{len(paths)} images in {args.folder}, {os.cpu_count()} cores, {describe_device(torch.device('cpu'))}, "
          f"{args.runs} runs (median images/s)")
    for name, value in median.items():
        print(f"  {name:<22} {value:8.1f} images/s   runs: {', '.join(f'{v:.0f}' for v in results[name])}")
    tag = median["catalog-tagger tag"]
    for name in ("naive reference", "decode limit", "decode + resize limit"):
        if name in median:
            print(f"  tag / {name:<22} = {tag / median[name]:.2f}x")


if __name__ == "__main__":
    main()
