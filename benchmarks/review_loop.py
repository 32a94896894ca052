"""A simulated retailer running the review loop on real labeled photos.

    python benchmarks/review_loop.py /path/to/realphoto-dev --out runs/review-loop
    python benchmarks/review_loop.py /path/to/realphoto-dev2 --styles studio home --budgets 50 100 200 --jobs 8
    python benchmarks/review_loop.py ../shared/realphoto-dev ../shared/realphoto-dev2 \
        --other ../shared/realphoto-other --budgets 200 --seeds 0 1 2 --strategies review --out runs/rl-oos

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
``results.md`` (a Markdown table per run and a summary over seeds) and
``learning_curve.png`` into ``--out``. The photo folder must hold ``images/`` and
``labels.csv`` (``file,label_id,label_name``, optionally ``style``); with ``--styles`` each
style is a catalog of its own (tagged through a manifest of its photos), as a retailer with
only studio or only home photos would run it.

With ``--other FOLDER`` (``images/`` and ``labels.csv`` with ``file,article``) the catalog
mixes those out-of-scope photos into the in-scope ones (issue 18): the person types
``other`` for them, and each row also reports, on the photos not reviewed, the share of
out-of-scope photos caught (``status = out_of_scope``) and of in-scope ones flagged, alone
and together with the rows sent to review (``needs_review``). With ``--other-as-classes`` the
person types the item's article instead (``Watches``), ``learn`` gets ``--new-classes``, and
each row reports the share of those photos labeled with their article (``new_class_accuracy``,
per article in ``new_class_per_article``) beside the garments' accuracy.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import openpyxl
import pandas as pd

TAGGER = [sys.executable, "-m", "catalog_tagger"]
TARGETS = (0.90, 0.95)
OTHER = "other"  # what the person types for a photo of none of the classes
NEW_CLASSES: set[str] = set()  # with --other-as-classes: the articles typed as classes of one's own


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
    expected = frame["path"].map(lambda p: truth[os.path.abspath(p)])
    other = (expected == OTHER).to_numpy()
    flagged = (frame["status"] == "out_of_scope").to_numpy()
    held = flagged | frame["needs_review"].fillna(True).to_numpy(bool)
    frame, expected = frame[~other], expected[~other]  # accuracy and precision: in-scope photos only
    right = frame["label"] == expected  # a flagged photo has no label: not right
    accepted = ~frame["needs_review"]
    got = {"n": int(len(frame)), "accuracy": float(right.mean()),
           "precision": float(right[accepted].mean()) if accepted.any() else float("nan"),
           "coverage": float(accepted.mean())}
    new = expected.isin(NEW_CLASSES).to_numpy()
    if new.any():  # --other-as-classes: classes of the retailer's own, and what they cost the garments
        hit = (frame["label"] == expected).to_numpy()
        got.update({"n_new": int(new.sum()), "new_class_accuracy": float(hit[new].mean()),
                    "garment_accuracy": float(hit[~new].mean()),
                    "new_class_flagged": float((frame["status"] == "out_of_scope").to_numpy()[new].mean()),
                    "new_class_per_article": {a: float(hit[(expected == a).to_numpy()].mean())
                                              for a in sorted(set(expected[new]))}})
    if other.any():  # issue 18: both sides of the reject decision
        got.update({"n_other": int(other.sum()), "other_caught": float(flagged[other].mean()),
                    "other_caught_or_review": float(held[other].mean()),
                    "in_scope_flagged": float(flagged[~other].mean()),
                    "in_scope_flagged_or_review": float(held[~other].mean()),
                    "accuracy_left_labeled": float(right[~flagged[~other]].mean())})
    return got


def point_rule(work: Path, truth: dict[str, str], reviewed: set[str], target: float) -> dict[str, float] | None:
    """Precision and coverage on the photos not reviewed when the threshold is the lowest
    whose *point estimate* on the reviewed photos (card: review_table_bounds' precision)
    reaches ``target``: what tag --target-precision did before it read the lower bound."""
    card = json.loads((work / "model" / "model.json").read_text())
    rows = [r for r in card["calibration"]["review_table_bounds"] if r["precision"] >= target]
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
    parser.add_argument("photos", type=Path, nargs="+", help="folder(s) with images/ and labels.csv")
    parser.add_argument("--other", type=Path, help="folder of out-of-scope photos (labels.csv: file,article) to mix in")
    parser.add_argument("--other-as-classes", action="store_true",
                        help="type the --other photos' article (a class of one's own) and learn with --new-classes")
    parser.add_argument("--strategies", nargs="+", default=["review", "random"], choices=["review", "random"])
    parser.add_argument("--targets", action=argparse.BooleanOptionalAction, default=True,
                        help="also tag at each --target-precision (three tags a loop instead of one)")
    parser.add_argument("--out", type=Path, default=Path("runs/review-loop"))
    parser.add_argument("--budgets", type=int, nargs="+", default=[50, 100, 200, 400])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--styles", nargs="+", default=None,
                        help="run each style of labels.csv as its own catalog (default: all photos as one)")
    parser.add_argument("--jobs", type=int, default=1, help="loops run at once (each is a chain of CLI calls)")
    parser.add_argument("--report-only", action="store_true",
                        help="recompute the tables from the runs already in --out")
    parser.add_argument("--learn-args", default="",
                        help="extra options for learn, e.g. '--epochs 20'; {tags} stands for the bundled model's "
                             "tag output of the catalog ('--catalog {tags}': self-training)")
    parser.add_argument("--from-results", type=Path, nargs="+",
                        help="only redraw the tables and the plot from these results.json files (merged)")
    args = parser.parse_args()
    if args.from_results:
        write_report([row for f in args.from_results for row in json.loads(f.read_text())], args.out)
        return
    if args.jobs > 1:  # loops side by side: each process gets its share of the cores
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))

    folders = [*args.photos, *([args.other] if args.other else [])]
    labels = pd.concat([pd.read_csv(f / "labels.csv").assign(
        file=lambda t, f=f: [os.path.abspath(f / x) for x in t["file"]],
        label_name=lambda t, f=f: (t["article"] if args.other_as_classes else OTHER) if f == args.other
        else t["label_name"]) for f in folders], ignore_index=True)
    if args.other_as_classes:
        NEW_CLASSES.update(pd.read_csv(args.other / "labels.csv")["article"])
        args.learn_args = f"{args.learn_args} --new-classes".strip()
    truth = dict(zip(labels["file"], labels["label_name"]))
    dataset = " + ".join(f.resolve().name for f in folders)
    catalogs = ({dataset: labels} if not args.styles else
                {f"{dataset} {s}": labels[labels["style"] == s] for s in args.styles})
    results: list[dict] = []
    tasks = []
    for name, rows in catalogs.items():
        out = args.out / name.replace(" ", "-")
        out.mkdir(parents=True, exist_ok=True)
        source = args.photos[0] / "images"
        if args.styles or len(folders) > 1:  # a manifest of these photos is the catalog
            source = out / "manifest.csv"
            pd.DataFrame({"path": list(rows["file"])}).to_csv(source, index=False)
        base = out / "tags.parquet"
        targets = TARGETS if args.targets else ()
        if not args.report_only:
            run("tag", source, "--out", base)
            for target in targets:
                run("tag", source, "--out", out / f"bundled-{target}.parquet", "--target-precision", target)
        bundled = {"catalog": name, "strategy": "none (bundled model)", "budget": 0, "seed": None,
                   **score(base, truth, set())}
        for target in targets:
            bundled[f"at_{target}"] = score(out / f"bundled-{target}.parquet", truth, set())
        results.append(bundled)
        for seed in args.seeds:
            for budget in args.budgets:
                if budget >= len(rows):
                    continue  # nothing would be left to measure on
                for strategy, extra in (("review", []), ("random", ["--random-share", "1"])):
                    if strategy not in args.strategies:
                        continue
                    tasks.append((name, source, base, out / f"{strategy}-{budget}-s{seed}", seed, budget, strategy,
                                  extra))

    done, lock = list(results), threading.Lock()

    def one(task: tuple) -> dict:
        name, source, base, work, seed, budget, strategy, extra = task
        t0 = time.perf_counter()
        if not args.report_only:
            loop(args, source, base, work, truth, seed, budget, extra)
        elif not (work / "tags.parquet").exists():
            return {}
        row = {"catalog": name, "strategy": strategy, "budget": budget, "seed": seed, "learn_args": args.learn_args,
               **evaluate_run(work, truth)}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(row), flush=True)
        with lock:  # written after every loop: a run cut short keeps what it finished
            done.append(row)
            (args.out / "results.json").write_text(json.dumps(done, indent=1))
        return row

    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:  # each loop is subprocesses
        results += [row for row in pool.map(one, tasks) if row]
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(results, args.out)


def write_report(results: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report = table(results) + "\n" + summary(results) + "\n" + reject_table(results)
    (out / "results.md").write_text(report)
    plot(results, out / "learning_curve.png")
    print(report)


def loop(args: argparse.Namespace, source: Path, base: Path, work: Path, truth: dict[str, str], seed: int,
         budget: int, extra: list[str]) -> None:
    """review -> fill as a person would -> learn -> tag (plain and at each target)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    run("review", base, "--budget", budget, "--out", work / "review.xlsx", "--seed", seed, *extra)
    fill(work / "review.xlsx", truth)
    learn_args = args.learn_args.replace("{tags}", str(base)).split()
    run("learn", work / "review.xlsx", "--out", work / "model", "--seed", seed, *learn_args)
    run("tag", source, "--model", work / "model", "--out", work / "tags.parquet")
    for target in TARGETS if args.targets else ():
        try:
            run("tag", source, "--model", work / "model", "--out", work / f"tags-{target}.parquet",
                "--target-precision", target)
        except SystemExit:  # no threshold reaches the target on the reviewed photos
            pass


def evaluate_run(work: Path, truth: dict[str, str]) -> dict:
    """The row of the table for one finished loop, from its files."""
    reviewed = {os.path.abspath(p) for p in pd.read_excel(work / "review.xlsx", header=1)["path"]}
    card = json.loads((work / "model" / "model.json").read_text())
    row = {"cv_accuracy": card["metrics"]["cv_accuracy"], **score(work / "tags.parquet", truth, reviewed)}
    if "out_of_scope" in card:  # how learn chose the reject threshold, as the card says
        chosen = card["out_of_scope"]["chosen"]
        row["reject"] = {"source": chosen["source"], "other_reviewed": chosen["other"],
                         "card_in_scope_flagged": chosen["in_scope_flagged"],
                         "card_other_caught": chosen["other_caught"]}
    for target in TARGETS:
        tagged = work / f"tags-{target}.parquet"
        row[f"at_{target}"] = score(tagged, truth, reviewed) if tagged.exists() else None
        row[f"point_{target}"] = point_rule(work, truth, reviewed, target)
    return row


def _pc(got: dict | None) -> str:
    return "no threshold" if not got else f"{got['precision']:.1%} / {got['coverage']:.1%}"


def table(results: list[dict]) -> str:
    lines = ["| catalog | strategy | labels | seed | accuracy (not reviewed) | CV accuracy (card) | "
             "tag --target-precision 0.90: precision / coverage | 0.95 | point-estimate rule 0.90 | 0.95 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in results:
        cv = f"{row['cv_accuracy']:.1%}" if "cv_accuracy" in row else "-"
        lines.append(f"| {row['catalog']} | {row['strategy']} | {row['budget']} | "
                     f"{row['seed'] if row['seed'] is not None else '-'} | {row['accuracy']:.1%} (n={row['n']}) | "
                     f"{cv} | {_pc(row.get('at_0.9'))} | {_pc(row.get('at_0.95'))} | "
                     f"{_pc(row.get('point_0.9')) if row['budget'] else '-'} | "
                     f"{_pc(row.get('point_0.95')) if row['budget'] else '-'} |")
    return "\n".join(lines) + "\n"


def summary(results: list[dict]) -> str:
    """Mean and range over seeds of accuracy, and of what tag --target-precision accepted."""
    lines = ["| catalog | labels | review: accuracy mean (min-max) | random: accuracy mean (min-max) | "
             "review - random (seeds review ahead) | review, tag --target-precision 0.90: precision mean (min), "
             "coverage | 0.95 | review, point-estimate rule 0.90 | 0.95 |", "|---|---|---|---|---|---|---|---|---|"]
    frame = pd.DataFrame([r for r in results if r["budget"]])
    if frame.empty:
        return ""
    for (catalog, budget), rows in frame.groupby(["catalog", "budget"], sort=False):
        acc = {s: rows[rows["strategy"] == s]["accuracy"] for s in ("review", "random")}
        cells = [f"{a.mean():.1%} ({a.min():.1%}-{a.max():.1%}), {len(a)} seeds" if len(a) else "-"
                 for a in acc.values()]
        diff = "-"
        if all(len(a) for a in acc.values()):
            paired = rows.pivot_table(index="seed", columns="strategy", values="accuracy").dropna()
            ahead = int((paired["review"] > paired["random"]).sum())
            diff = f"{acc['review'].mean() - acc['random'].mean():+.1%} ({ahead} of {len(paired)})"
        at = []
        for key in ("at", "point"):
            for target in TARGETS:
                got = [r for r in rows[rows["strategy"] == "review"][f"{key}_{target}"] if r]
                miss = len(rows[rows["strategy"] == "review"]) - len(got)
                precision = [g["precision"] for g in got]
                at.append("no threshold" if not got else
                          f"{sum(precision) / len(got):.1%} ({min(precision):.1%}), "
                          f"{sum(g['coverage'] for g in got) / len(got):.1%}" + (f"; {miss} without" if miss else ""))
        lines.append(f"| {catalog} | {budget} | {cells[0]} | {cells[1]} | {diff} | {' | '.join(at)} |")
    return "\n".join(lines) + "\n"


def reject_table(results: list[dict]) -> str:
    """Issue 18's two sides on the photos not reviewed, mean (min-max) over seeds."""
    rows = [r for r in results if "n_other" in r]
    rows = [r for i, r in enumerate(rows) if r["budget"] or r not in rows[:i]]  # one bundled row per catalog
    if not rows:
        return ""
    keys = ("other_caught", "other_caught_or_review", "in_scope_flagged", "in_scope_flagged_or_review", "accuracy",
            "accuracy_left_labeled")
    lines = ["| catalog | model | labels | seeds | `other` reviewed | out of scope caught | caught or review | "
             "in scope flagged | flagged or review | in-scope accuracy | accuracy of rows left labeled |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    frame = pd.DataFrame(rows).fillna({"learn_args": ""})
    for (catalog, strategy, budget, extra), group in frame.groupby(["catalog", "strategy", "budget", "learn_args"],
                                                                    sort=False, dropna=False):
        model = "bundled" if not budget else f"learn ({strategy}{', ' + extra if extra else ''})"
        cells = [f"{group[k].mean():.1%} ({group[k].min():.1%}-{group[k].max():.1%})" if len(group) > 1
                 else f"{group[k].mean():.1%}" for k in keys]
        others = [r["other_reviewed"] for r in group.get("reject", pd.Series(dtype=object)) if isinstance(r, dict)]
        lines.append(f"| {catalog} | {model} | {budget} | {len(group)} | {', '.join(map(str, others)) or '-'} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    catalogs = list(dict.fromkeys(r["catalog"] for r in results))
    fig, axes = plt.subplots(1, len(catalogs), figsize=(5 * len(catalogs), 4), squeeze=False)
    for ax, catalog in zip(axes[0], catalogs):
        mine = [r for r in results if r["catalog"] == catalog]
        for strategy in ("review", "random"):
            rows = pd.DataFrame([r for r in mine if r["strategy"] == strategy])
            if rows.empty:
                continue
            stats = rows.groupby("budget")["accuracy"].agg(["mean", "min", "max"])
            ax.errorbar(stats.index, stats["mean"], yerr=[stats["mean"] - stats["min"], stats["max"] - stats["mean"]],
                        marker="o", capsize=3, label="chosen by review" if strategy == "review" else "chosen at random")
        ax.axhline(mine[0]["accuracy"], color="grey", linestyle="--", label="bundled model")
        ax.axhline(0.9, color="green", linestyle=":", label="target 90%")
        ax.set_title(catalog)
        ax.set_xlabel("labels")
        ax.set_ylabel("accuracy on photos not reviewed")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
