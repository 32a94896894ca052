"""Default training recipe, several seeds: test accuracy and wall time of each, and their mean.

    python benchmarks/train_seeds.py [--seeds 0 1 2] [--out runs/seeds] [-- extra train options]

Runs ``catalog-tagger train`` once per seed, one after another (each gets the whole
machine), times each command from start to exit, and reads the test accuracy from the
card. This is how the README's training figures were measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def train_once(out: Path, seed: int, extra: list[str]) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "catalog_tagger", "-q", "train", "--out", str(out), "--seed", str(seed), *extra]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start
    card = json.loads((out / "model.json").read_text())
    return {"seed": seed, "wall_s": wall, "train_s": card["training"]["seconds"],
            "val": card["metrics"]["val_accuracy"], "test": card["metrics"]["test_accuracy"],
            "precision": card["training"].get("precision", "?"), "epochs": card["training"]["config"]["epochs"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/seeds"))
    parser.add_argument("extra", nargs="*", help="more `catalog-tagger train` options, after --")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        row = train_once(args.out / f"seed{seed}", seed, args.extra)
        rows.append(row)
        print(f"seed {seed}: test {row['test']:.4f}  val {row['val']:.4f}  {row['epochs']} epochs, "
              f"{row['wall_s']:.0f} s wall ({row['train_s']:.0f} s in the card), {row['precision']}", flush=True)
    tests = [r["test"] for r in rows]
    walls = [r["wall_s"] for r in rows]
    print(f"mean test accuracy {statistics.mean(tests):.4f} (min {min(tests):.4f}, max {max(tests):.4f}) "
          f"over {len(rows)} seeds; wall time max {max(walls):.0f} s, median {statistics.median(walls):.0f} s")


if __name__ == "__main__":
    main()
