"""Where a tagging worker's time goes: per-image core time of each stage, one thread.

    python benchmarks/tag_stages.py FOLDER [--n 300] [--runs 3] [--model PATH]

Stages, each timed over the same files (median of --runs passes) in CPU time of the thread,
which other jobs on a shared machine disturb far less than wall time:
draft decode only (what the decode limit in tag_speed.py measures), draft decode plus the
Fashion-MNIST conversion, `decode_file` as `tag` calls it (adds stat, EXIF and the time
limit), and the network with the model's flip TTA on one batch. Their sum against the
core time `tag` spends per image (cores / images per second) shows what is left to
worker hand-off and scheduling.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tag_speed import draft_decode  # the sibling script: the decode limit counts the same decode

from catalog_tagger.checkpoint import load_model
from catalog_tagger.config import TagConfig
from catalog_tagger.decode import decode_file
from catalog_tagger.preprocess import to_model_array
from catalog_tagger.runtime import describe_device, predict_logits, prepare_model


def ms_per_image(fn: Callable[[str], object], paths: list[str], runs: int) -> tuple[float, list[float]]:
    passes = []
    for _ in range(runs):
        start = time.thread_time()
        for path in paths:
            fn(path)
        passes.append((time.thread_time() - start) / len(paths) * 1000)
    return statistics.median(passes), passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # what one DataLoader worker has
    loaded = load_model(args.model)
    config, limits = loaded.config, TagConfig()
    paths = sorted(str(p) for p in args.folder.rglob("*.jpg"))[: args.n]
    if not paths:
        raise SystemExit(f"no .jpg files under {args.folder}")
    stages: dict[str, Callable[[str], object]] = {
        "draft decode": lambda p: draft_decode(p, 4 * config.input_size).close(),
        "draft decode + conversion": lambda p: to_model_array(draft_decode(p, 4 * config.input_size), config),
        "decode_file (as tag)": lambda p: decode_file(p, config, limits.max_pixels, limits.time_limit),
    }
    print(f"{len(paths)} images in {args.folder}, {describe_device(torch.device('cpu'))}, "
          f"{args.runs} passes (median ms of core time per image)")
    for name, fn in stages.items():
        median, passes = ms_per_image(fn, paths, args.runs)
        print(f"  {name:<28} {median:6.3f} ms   passes: {', '.join(f'{p:.3f}' for p in passes)}")
    batch = torch.from_numpy(np.stack([decode_file(p, config, limits.max_pixels).array for p in paths[:256]]))
    model = prepare_model(loaded.model, torch.device("cpu"))
    predict_logits(model, batch, torch.device("cpu"))  # warm-up
    timings = []
    for _ in range(args.runs):
        start = time.thread_time()
        predict_logits(model, batch, torch.device("cpu"))
        timings.append((time.thread_time() - start) / len(batch) * 1000)
    tta = " with flip TTA" if config.flip_tta else ""
    print(f"  {'network' + tta:<28} {statistics.median(timings):6.3f} ms   passes: "
          f"{', '.join(f'{t:.3f}' for t in timings)}")


if __name__ == "__main__":
    main()
