"""The GPU path, checked and measured in one go: labels, bf16 training, tagging speed.

    python benchmarks/gpu_check.py --out DIR [--device auto] [--quick] [--budget-s 420]

Run through ``benchmarks/gpu_check.sh`` on a CUDA machine (it installs what is missing and
finds Fashion-MNIST). Each check is a section; a failed section is recorded and the next
one runs. After every section ``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` are rewritten,
so a run stopped at its time limit still leaves what it measured. Exit status 1 when a
check failed.

Checks (pass/fail):
- ``agreement_fashion_mnist``: the bundled model's labels on the Fashion-MNIST test set are
  the same on the device as on the CPU, except where the CPU's two best classes are within
  float32 rounding of each other; probabilities differ by < 1e-3.
- ``bf16_training``: ``catalog-tagger train`` on the device trains in bf16 (the card says
  so) and reaches a sane accuracy in a few epochs.
- ``tag_device_vs_cpu``: ``catalog-tagger tag --device DEVICE`` through the real CLI writes
  the same labels as ``--device cpu`` on rendered catalog JPEGs (good and broken files).

Measurements (reported, compared with the issue's targets):
- ``tag_speed``: images/s on large catalog JPEGs with every core decoding: the decode limit,
  ``tag --device DEVICE`` and ``tag --device cpu`` (median of runs).
- ``time_to_accuracy``: Fashion-MNIST test accuracy against training seconds for the
  default and the bundled recipe (target: >= 95.0% in <= 30 s).
- ``ray_gpu_actor``: the Ray engine with one GPU model actor, where Ray is installed.

``--quick`` shrinks every section (a few hundred images, a tiny training set) so that the
whole script runs on a CPU in CI; the figures it prints then mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks

from synth_catalog import build as build_catalog  # noqa: E402
from tag_speed import decode_limit  # noqa: E402

from catalog_tagger.checkpoint import load_model  # noqa: E402
from catalog_tagger.config import TagConfig  # noqa: E402
from catalog_tagger.data.fashion_mnist import load_split  # noqa: E402
from catalog_tagger.run import run_tagging  # noqa: E402
from catalog_tagger.runtime import (  # noqa: E402
    cpu_model,
    describe_device,
    native_bf16,
    predict_logits_array,
    prepare_model,
    resolve_device,
)

# Probabilities on the device may differ from the CPU's by float32 rounding of different
# kernels (TF32 is off for inference, runtime.prepare_model); labels may differ only where
# the two best classes are this close.
PROB_TOLERANCE = 1e-3
TARGET_ACCURACY = 0.95
TARGET_SECONDS = 30.0
SECTIONS = ("agreement_fashion_mnist", "bf16_training", "tag_device_vs_cpu", "tag_speed", "time_to_accuracy",
            "ray_gpu_actor")


@dataclass(frozen=True)
class Sizes:
    """How big each section is: the full run on a GPU machine, or a CPU smoke test."""

    fm_test: int
    catalog: int
    catalog_size: tuple[int, int]
    speed_images: int
    speed_runs: int
    train_epochs: int
    recipes: tuple[tuple[str, int], ...]
    # None: train on Fashion-MNIST; else on this many rendered photos (train --data).
    train_images: int | None = None

    @staticmethod
    def full() -> Sizes:
        return Sizes(fm_test=10_000, catalog=600, catalog_size=(1080, 1440), speed_images=6000, speed_runs=2,
                     train_epochs=2, recipes=(("default recipe", 24), ("bundled recipe", 72)))

    @staticmethod
    def quick() -> Sizes:
        return Sizes(fm_test=500, catalog=40, catalog_size=(180, 240), speed_images=60, speed_runs=1,
                     train_epochs=1, recipes=(("default recipe", 1),),
                     train_images=100)


@dataclass
class Report:
    """What the sections found, written out after each of them."""

    out: Path
    device: str
    started: float = field(default_factory=time.perf_counter)
    sections: list[dict[str, Any]] = field(default_factory=list)

    def add(self, name: str, ok: bool | None, seconds: float, **figures: Any) -> None:
        self.sections.append({"section": name, "ok": ok, "seconds": round(seconds, 1), **figures})
        self.write()

    def failed(self) -> list[str]:
        return [s["section"] for s in self.sections if s["ok"] is False]

    def write(self) -> None:
        header = environment(self.device)
        (self.out / "gpu_check.json").write_text(json.dumps({"environment": header, "sections": self.sections},
                                                            indent=2, default=str))
        lines = [f"# GPU check, {header['date']}", ""]
        lines += [f"- {key}: {value}" for key, value in header.items() if key != "date"]
        lines += ["", "| section | result | seconds | figures |", "|---|---|---:|---|"]
        for s in self.sections:
            result = {True: "pass", False: "**FAIL**", None: "measured"}[s["ok"]]
            figures = "; ".join(f"{k} {v}" for k, v in s.items() if k not in ("section", "ok", "seconds"))
            lines.append(f"| {s['section']} | {result} | {s['seconds']} | {figures} |")
        (self.out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def environment(device: str) -> dict[str, Any]:
    torch_device = torch.device(device)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": describe_device(torch_device),
        "cpu": f"{cpu_model()}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``catalog-tagger ARGS`` in a fresh process, as a user runs it."""
    done = subprocess.run([sys.executable, "-m", "catalog_tagger", "-q", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"catalog-tagger {' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done


# -- checks ------------------------------------------------------------------------------------------


def agreement_fashion_mnist(device: str, sizes: Sizes) -> dict[str, Any]:
    test = load_split("test")
    images = test.images[: sizes.fm_test]
    loaded = load_model(None)
    probs = {}
    for name in dict.fromkeys(("cpu", device)):
        torch_device = torch.device(name)
        logits = predict_logits_array(prepare_model(loaded.model, torch_device), images, torch_device)
        probs[name] = torch.softmax(torch.from_numpy(logits), 1).numpy()
    cpu, dev = probs["cpu"], probs[device]
    top2 = np.sort(cpu, 1)[:, -2:]
    differ = cpu.argmax(1) != dev.argmax(1)
    real = differ & (top2[:, 1] - top2[:, 0] > PROB_TOLERANCE)
    max_diff = float(np.abs(cpu - dev).max())
    return {"ok": not real.any() and max_diff < PROB_TOLERANCE, "images": len(images),
            "labels_differ": int(differ.sum()), "labels_differ_beyond_rounding": int(real.sum()),
            "max_prob_diff": f"{max_diff:.2e}",
            "accuracy_cpu": round(float((cpu.argmax(1) == test.labels[: len(images)]).mean()), 4),
            "accuracy_device": round(float((dev.argmax(1) == test.labels[: len(images)]).mean()), 4)}


def train_run(device: str, out: Path, epochs: int, data: Path | None) -> tuple[dict[str, Any], float]:
    """``catalog-tagger train`` on Fashion-MNIST (or on the labeled folder ``data``); the card
    and the wall-clock seconds."""
    start = time.perf_counter()
    cli("train", "--out", str(out), "--epochs", str(epochs), "--device", device, "--overwrite",
        *(("--data", str(data)) if data else ()))
    wall = time.perf_counter() - start
    return json.loads((out / "model.json").read_text()), wall


def labeled_folder(work: Path, sizes: Sizes) -> Path | None:
    """--quick trains on a few rendered photos per class (``train --data``) instead of the
    55,000 Fashion-MNIST images, so that CI's CPU gets through it in seconds."""
    if sizes.train_images is None:
        return None
    folder = work / "labeled"
    if folder.exists():  # made by an earlier section
        return folder
    build_catalog(folder, sizes.train_images, 56, 56)
    classes = load_model(None).classes
    for row in pd.read_csv(folder / "labels.csv").itertuples():
        target = folder / classes[row.label_id].replace("/", "-")
        target.mkdir(exist_ok=True)
        (folder / row.file).rename(target / row.file)
    (folder / "labels.csv").unlink()
    return folder


def bf16_training(device: str, sizes: Sizes, work: Path) -> dict[str, Any]:
    card, wall = train_run(device, work / "bf16", sizes.train_epochs, labeled_folder(work, sizes))
    training, metrics = card["training"], card["metrics"]
    accuracy = metrics["test_accuracy"] if metrics["test_accuracy"] is not None else metrics["val_accuracy"]
    # bf16 wherever it is native (a GPU, an AVX512-BF16 or AMX CPU), float32 elsewhere.
    bf16_expected = native_bf16(torch.device(device))
    ok = (training["precision"] == "bf16 mixed") == bf16_expected and accuracy >= (0.0 if sizes.train_images else 0.85)
    epoch_seconds = statistics.median(row["seconds"] for row in training["history"])
    return {"ok": ok, "epochs": sizes.train_epochs, "precision": training["precision"],
            "accuracy": accuracy, "seconds_per_epoch": round(epoch_seconds, 2),
            "train_seconds": training["seconds"], "wall_seconds": round(wall, 1)}


def _with_broken_files(folder: Path) -> None:
    """A few files a real catalog has: truncated, empty, not an image at all."""
    good = sorted(folder.glob("*.jpg"))[0].read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not a photo")


def tag_device_vs_cpu(device: str, sizes: Sizes, work: Path) -> dict[str, Any]:
    folder = work / "catalog"
    build_catalog(folder, sizes.catalog, *sizes.catalog_size)
    _with_broken_files(folder)
    tables = {}
    for name in dict.fromkeys(("cpu", device)):
        out = work / f"tags-{name}.parquet"
        cli("tag", str(folder), "--out", str(out), "--device", name)
        tables[name] = pd.read_parquet(out).set_index("path").sort_index()
    cpu, dev = tables["cpu"], tables[device]
    same_status = bool((cpu["status"] == dev["status"]).all())
    ok_rows = cpu["status"] == "ok"
    labels_differ = int((cpu.loc[ok_rows, "label"] != dev.loc[ok_rows, "label"]).sum())
    max_diff = float((cpu.loc[ok_rows, "confidence"] - dev.loc[ok_rows, "confidence"]).abs().max())
    return {"ok": same_status and labels_differ == 0 and max_diff < PROB_TOLERANCE and len(cpu) == len(dev),
            "rows": len(cpu), "bad_files": int((~cpu["status"].isin(["ok", "out_of_scope"])).sum()),
            "out_of_scope": int((cpu["status"] == "out_of_scope").sum()), "labels_differ": labels_differ,
            "max_confidence_diff": f"{max_diff:.2e}"}


def tag_speed(device: str, sizes: Sizes, work: Path) -> dict[str, Any]:
    """Images/s of the decode limit and of ``tag`` on each device, two ways: the whole CLI
    run (what a user waits for: interpreter and torch start-up included) and ``run_tagging``
    in this process (the steady state a large catalog approaches)."""
    folder = work / "speed"
    build_catalog(folder, sizes.speed_images, *sizes.catalog_size)
    paths = sorted(str(p) for p in folder.glob("*.jpg"))
    runs: dict[str, list[float]] = defaultdict(list)
    for i in range(sizes.speed_runs):  # interleaved: machine noise hits all alike
        runs["decode limit"].append(len(paths) / _timed(lambda: decode_limit(paths)))
        for name in dict.fromkeys((device, "cpu")):
            out = work / f"speed-{name}-{i}.parquet"
            runs[f"tag --device {name} (CLI run)"].append(len(paths) / _timed(
                lambda n=name, o=out: cli("tag", str(folder), "--out", str(o), "--device", n)))
            config = TagConfig(source=folder, out=work / f"speed-{name}-{i}-in.parquet", device=name)
            runs[f"tag --device {name} (in process)"].append(len(paths) / _timed(
                lambda c=config: run_tagging(c, progress=False)))
    median = {k: statistics.median(v) for k, v in runs.items()}
    limit = median["decode limit"]
    figures: dict[str, Any] = {"images": len(paths), "size": "x".join(map(str, sizes.catalog_size)),
                               "workers": os.cpu_count()}
    figures.update({f"{k} img/s": round(v) for k, v in median.items()})
    figures.update({f"{k} / decode limit": round(v / limit, 2) for k, v in median.items() if k != "decode limit"})
    return figures


def time_to_accuracy(device: str, sizes: Sizes, work: Path, seconds_left: Callable[[], float],
                     epoch_seconds: float | None) -> dict[str, Any]:
    figures: dict[str, Any] = {"target": f">= {TARGET_ACCURACY:.1%} in <= {TARGET_SECONDS:.0f} s"}
    met = False
    for name, epochs in sizes.recipes:
        # Skip a recipe that would outrun the script's budget (the 2-epoch check measured the pace).
        if epoch_seconds is not None and epochs * epoch_seconds * 1.3 + 30 > seconds_left():
            figures[name] = f"skipped: {epochs} epochs at {epoch_seconds:.1f} s would outrun the budget"
            continue
        card, wall = train_run(device, work / name.replace(" ", "-"), epochs, labeled_folder(work, sizes))
        metrics, seconds = card["metrics"], card["training"]["seconds"]
        accuracy = metrics["test_accuracy"] if metrics["test_accuracy"] is not None else metrics["val_accuracy"]
        met |= accuracy >= TARGET_ACCURACY and seconds <= TARGET_SECONDS
        figures[name] = (f"{epochs} epochs, {card['training']['precision']}: test {accuracy:.2%} after "
                         f"{seconds:.0f} s of training ({wall:.0f} s wall incl. start-up, data, calibration)")
    figures["target_met"] = met
    return figures


def ray_gpu_actor(device: str, sizes: Sizes, work: Path) -> dict[str, Any]:
    try:
        import ray  # noqa: F401
    except ImportError:
        return {"skipped": "Ray is not installed on this machine"}
    folder = work / "speed" if (work / "speed").exists() else work / "catalog"
    n = len(list(folder.glob("*.jpg")))
    gpus = "1" if device == "cuda" else "0"
    out = work / "tags-ray.parquet"
    seconds = _timed(lambda: cli("tag", str(folder), "--out", str(out), "--engine", "ray",
                                 "--num-gpus-per-worker", gpus, "--concurrency", "1"))
    return {"images": n, "img/s (incl. Ray start-up)": round(n / seconds), "gpus_per_actor": gpus}


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Folder for gpu_check.json and gpu_check.md.")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="Tiny sizes: a CPU smoke test of the script itself.")
    parser.add_argument("--budget-s", type=float, default=420.0, help="Skip long sections past this many seconds.")
    parser.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, metavar="SECTION",
                        help=f"Sections to leave out ({', '.join(SECTIONS)}).")
    args = parser.parse_args()

    device = resolve_device(args.device).type
    sizes = Sizes.quick() if args.quick else Sizes.full()
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.out, device)
    print(f"GPU check on {describe_device(torch.device(device))}; report: {args.out / 'gpu_check.md'}", flush=True)

    def seconds_left() -> float:
        return args.budget_s - (time.perf_counter() - report.started)

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    pace: dict[str, float] = {}

    def section(name: str, run: Callable[[], dict[str, Any]]) -> None:
        if name in args.skip:
            return
        start = time.perf_counter()
        try:
            figures = run()
        except Exception as exc:  # one failed section must not hide the others' figures
            traceback.print_exc()
            report.add(name, False, time.perf_counter() - start, error=f"{type(exc).__name__}: {exc}"[:500])
            return
        ok = figures.pop("ok", None)
        report.add(name, ok, time.perf_counter() - start, **figures)
        print(f"{name}: {'pass' if ok else 'FAIL' if ok is False else 'done'} {figures}", flush=True)

    try:
        section("agreement_fashion_mnist", lambda: agreement_fashion_mnist(device, sizes))

        def bf16() -> dict[str, Any]:
            figures = bf16_training(device, sizes, work)
            pace["epoch"] = figures["seconds_per_epoch"]
            return figures

        section("bf16_training", bf16)
        section("tag_device_vs_cpu", lambda: tag_device_vs_cpu(device, sizes, work))
        section("tag_speed", lambda: tag_speed(device, sizes, work))
        section("time_to_accuracy", lambda: time_to_accuracy(device, sizes, work, seconds_left, pace.get("epoch")))
        section("ray_gpu_actor", lambda: ray_gpu_actor(device, sizes, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print((args.out / "gpu_check.md").read_text())
    failed = report.failed()
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
