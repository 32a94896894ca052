"""Ray engine images/s with 1 and 2 model actors, beside the local engine, on the same files.

    python benchmarks/ray_speed.py FOLDER [--runs 3]

Starts a local Ray instance on this machine's CPUs. Figures are medians of --runs,
interleaved so that machine noise hits all engines alike.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import ray

from catalog_tagger.config import TagConfig
from catalog_tagger.ray_engine import run_tagging_ray
from catalog_tagger.run import run_tagging


def timed(fn, folder: Path, **kw) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        # The Ray engine writes a folder of parts, the local one a file.
        out = Path(tmp) / ("out" if kw else "out.parquet")
        summary = fn(TagConfig(source=folder, out=out), progress=False, **kw)
        return summary.total / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    ray.init(include_dashboard=False, log_to_driver=False)
    results: dict[str, list[float]] = {"local engine": [], "ray, 1 actor": [], "ray, 2 actors": []}
    timed(run_tagging_ray, args.folder, concurrency=1)  # warm-up: worker start-up, model load
    for _ in range(args.runs):
        results["local engine"].append(timed(run_tagging, args.folder))
        results["ray, 1 actor"].append(timed(run_tagging_ray, args.folder, concurrency=1))
        results["ray, 2 actors"].append(timed(run_tagging_ray, args.folder, concurrency=2))
    print(f"{args.folder}: images/s, median of {args.runs} runs")
    for name, values in results.items():
        print(f"  {name:<14} {statistics.median(values):7.1f}   runs: {', '.join(f'{v:.0f}' for v in values)}")


if __name__ == "__main__":
    main()
