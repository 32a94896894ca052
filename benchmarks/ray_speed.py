"""Ray engine images/s with 1 and 2 shard tasks at once, beside the local engine, on the same files.

    python benchmarks/ray_speed.py FOLDER [--runs 3] [--shard-size 256] [--address ADDR]

Starts a Ray instance on this machine's CPUs (or joins --address). Both engines write the
same Parquet file; figures are medians of --runs, interleaved so that machine noise hits
all engines alike.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import ray

from catalog_tagger.config import TagConfig
from catalog_tagger.ray_engine import RayEngine
from catalog_tagger.run import run_tagging


def timed(folder: Path, shard_size: int, engine: RayEngine | None = None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        config = TagConfig(source=folder, out=Path(tmp) / "out.parquet", shard_size=shard_size)
        summary = run_tagging(config, progress=False, engine=engine)
        return summary.total / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--shard-size", type=int, default=256, help="images per Ray task (and shard)")
    parser.add_argument("--address", help="a Ray cluster to join (default: start one here)")
    args = parser.parse_args()
    # Connected once here, so that the runs below share the cluster and its started workers.
    ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
    results: dict[str, list[float]] = {"local engine": [], "ray, 1 task": [], "ray, 2 tasks": []}
    timed(args.folder, args.shard_size, RayEngine(concurrency=2))  # warm-up: worker start-up, imports
    for _ in range(args.runs):
        results["local engine"].append(timed(args.folder, args.shard_size))
        results["ray, 1 task"].append(timed(args.folder, args.shard_size, RayEngine(concurrency=1)))
        results["ray, 2 tasks"].append(timed(args.folder, args.shard_size, RayEngine(concurrency=2)))
    print(f"{args.folder}: images/s, median of {args.runs} runs")
    for name, values in results.items():
        print(f"  {name:<14} {statistics.median(values):7.1f}   runs: {', '.join(f'{v:.0f}' for v in values)}")


if __name__ == "__main__":
    main()
