"""A simulated retailer running the review loop on real labeled photos.

    python benchmarks/review_loop.py /path/to/realphoto-dev --out runs/review-loop

For each budget N and each strategy, through the real CLI:

1. ``tag`` every photo with the bundled model;
2. ``review --budget N`` (strategy ``review``: random slice + uncertain photos, the
   defaults) or ``review --budget N --random-share 1`` (strategy ``random``: the baseline);
3. fill ``correct_label`` from labels.csv as a person would (open the workbook with
   openpyxl, type into the cells, save);
4. ``learn`` the filled workbook (default settings), and ``tag`` every photo again with
   the new model, plain and with ``--target-precision`` 0.90 and 0.95.

Reported on the photos *not* reviewed (out of sample): accuracy, and precision and
coverage of the rows ``--target-precision`` auto-accepts. Writes ``results.json``,
``results.md`` (a Markdown table) and ``learning_curve.png`` into ``--out``.
The photo folder must hold ``images/`` and ``labels.csv`` (``file,label_id,label_name``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import openpyxl
import pandas as pd

TAGGER = [sys.executable, "-m", "catalog_tagger"]
TARGETS = (0.90, 0.95)


def run(*args: object) -> None:
    cmd = [*TAGGER, "-q", *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-2000:]}")


def fill(workbook: Path, truth: dict[str, str]) -> int:
    wb = openpyxl.load_workbook(workbook)
    ws = wb["review"]
    col = {c.value: c.column for c in ws[2]}
    n = 0
    for r in range(3, ws.max_row + 1):
        path = ws.cell(r, col["path"]).value
        ws.cell(r, col["correct_label"]).value = truth[os.path.abspath(path)]
        n += 1
    wb.save(workbook)
    return n


def score(tags: Path, truth: dict[str, str], reviewed: set[str]) -> dict[str, float]:
    frame = pd.read_parquet(tags)
    frame = frame[~frame["path"].map(os.path.abspath).isin(reviewed)]
    right = frame["label"] == frame["path"].map(lambda p: truth[os.path.abspath(p)])
    accepted = ~frame["needs_review"]
    return {"n": int(len(frame)), "accuracy": float(right.mean()),
            "precision": float(right[accepted].mean()) if accepted.any() else float("nan"),
            "coverage": float(accepted.mean())}


def bound_rule(work: Path, truth: dict[str, str], reviewed: set[str], target: float) -> dict[str, float] | None:
    """Precision and coverage on the photos not reviewed when the threshold is the lowest
    whose Clopper-Pearson 90% lower bound (card: review_table_bounds) reaches ``target``:
    a stricter rule than tag --target-precision's point estimate."""
    card = json.loads((work / "model" / "model.json").read_text())
    rows = [r for r in card["calibration"]["review_table_bounds"] if r["precision_lower_bound"] >= target]
    if not rows:
        return None
    threshold = max(rows, key=lambda r: r["coverage"])["threshold"]
    frame = pd.read_parquet(work / "tags.parquet")
    frame = frame[~frame["path"].map(os.path.abspath).isin(reviewed)]
    right = frame["label"] == frame["path"].map(lambda p: truth[os.path.abspath(p)])
    accepted = frame["confidence"] >= threshold
    return {"precision": float(right[accepted].mean()) if accepted.any() else float("nan"),
            "coverage": float(accepted.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("photos", type=Path, help="folder with images/ and labels.csv")
    parser.add_argument("--out", type=Path, default=Path("runs/review-loop"))
    parser.add_argument("--budgets", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--report-only", action="store_true",
                        help="recompute the table from the runs already in --out (results.jsonl)")
    parser.add_argument("--learn-args", default="", help="extra options for learn, e.g. '--epochs 20'")
    args = parser.parse_args()

    labels = pd.read_csv(args.photos / "labels.csv")
    truth = {os.path.abspath(args.photos / f): name for f, name in zip(labels["file"], labels["label_name"])}
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    base = out / "tags.parquet"
    if not base.exists():
        run("tag", args.photos / "images", "--out", base)
    results = [{"strategy": "none (bundled model)", "budget": 0, "seed": None, **score(base, truth, set())}]
    for target in TARGETS:
        tagged = out / f"bundled-{target}.parquet"
        if not args.report_only:
            run("tag", args.photos / "images", "--out", tagged, "--target-precision", target)
        results[0][f"at_{target}"] = score(tagged, truth, set())
    for seed in args.seeds:
        for budget in args.budgets:
            for strategy, extra in (("review", []), ("random", ["--random-share", "1"])):
                work = out / f"{strategy}-{budget}-s{seed}"
                t0 = time.perf_counter()
                if args.report_only:
                    if not (work / "tags.parquet").exists():
                        continue
                else:
                    loop(args, base, work, truth, seed, budget, extra)
                row = {"strategy": strategy, "budget": budget, "seed": seed, **evaluate_run(work, truth)}
                row["seconds"] = round(time.perf_counter() - t0, 1)
                results.append(row)
                print(json.dumps(row), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(table(results))
    plot(results, out / "learning_curve.png")
    print(table(results))


def loop(args: argparse.Namespace, base: Path, work: Path, truth: dict[str, str], seed: int, budget: int,
         extra: list[str]) -> None:
    """review -> fill as a person would -> learn -> tag (plain and at each target)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    run("review", base, "--budget", budget, "--out", work / "review.xlsx", "--seed", seed, *extra)
    fill(work / "review.xlsx", truth)
    run("learn", work / "review.xlsx", "--out", work / "model", "--seed", seed, *args.learn_args.split())
    run("tag", args.photos / "images", "--model", work / "model", "--out", work / "tags.parquet")
    for target in TARGETS:
        try:
            run("tag", args.photos / "images", "--model", work / "model", "--out", work / f"tags-{target}.parquet",
                "--target-precision", target)
        except SystemExit:  # no threshold reaches the target on the reviewed photos
            pass


def evaluate_run(work: Path, truth: dict[str, str]) -> dict:
    """The row of the table for one finished loop, from its files."""
    reviewed = {os.path.abspath(p) for p in pd.read_excel(work / "review.xlsx", header=1)["path"]}
    card = json.loads((work / "model" / "model.json").read_text())
    row = {"cv_accuracy": card["metrics"]["cv_accuracy"], **score(work / "tags.parquet", truth, reviewed)}
    for target in TARGETS:
        tagged = work / f"tags-{target}.parquet"
        row[f"at_{target}"] = score(tagged, truth, reviewed) if tagged.exists() else None
        row[f"bound_{target}"] = bound_rule(work, truth, reviewed, target)
    return row


def table(results: list[dict]) -> str:
    def at(row: dict, target: float, key: str = "at") -> str:
        got = row.get(f"{key}_{target}")
        return "no threshold" if not got else f"{got['precision']:.1%} / {got['coverage']:.1%}"

    lines = ["| strategy | labels | seed | accuracy (not reviewed) | CV accuracy (card) | "
             "precision / coverage at 0.90 | at 0.95 | lower-bound rule at 0.90 | at 0.95 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in results:
        cv = f"{row['cv_accuracy']:.1%}" if "cv_accuracy" in row else "-"
        lines.append(f"| {row['strategy']} | {row['budget']} | {row['seed'] if row['seed'] is not None else '-'} | "
                     f"{row['accuracy']:.1%} (n={row['n']}) | {cv} | {at(row, 0.90)} | {at(row, 0.95)} | "
                     f"{at(row, 0.90, 'bound') if row['budget'] else '-'} | "
                     f"{at(row, 0.95, 'bound') if row['budget'] else '-'} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy in ("review", "random"):
        rows = pd.DataFrame([r for r in results if r["strategy"] == strategy])
        if rows.empty:
            continue
        mean = rows.groupby("budget")["accuracy"].mean()
        ax.plot(mean.index, mean.values, marker="o", label=f"chosen by {strategy}" if strategy == "review"
                else "chosen at random")
    ax.axhline(results[0]["accuracy"], color="grey", linestyle="--", label="bundled model")
    ax.set_xlabel("labels")
    ax.set_ylabel("accuracy on photos not reviewed")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
