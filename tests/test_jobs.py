"""The cron wrapper, run as cron would run it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import REPO, SAMPLE


def _nightly(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    tagger = Path(sys.executable).with_name("catalog-tagger")
    return subprocess.run(["bash", str(REPO / "jobs" / "nightly-tag.sh")], capture_output=True, text=True,
                          env={**os.environ, "CATALOG_DIR": str(SAMPLE), "OUTPUT_DIR": str(tmp_path),
                               "TAGGER": str(tagger), "EXTRA_ARGS": "--workers 0", **env})


def test_nightly_job_is_incremental_logs_and_passes_exit_codes_through(tmp_path):
    first = _nightly(tmp_path, MAX_ERROR_RATE="0.1")
    assert first.returncode == 0, first.stderr
    second = _nightly(tmp_path, MAX_ERROR_RATE="0.1")
    assert second.returncode == 0, second.stderr
    summary = json.loads((tmp_path / "tags.parquet.summary.json").read_text())
    # The 40 labeled rows are carried over; the 3 broken files are tried again.
    assert summary["total"] == 43 and summary["carried_over"] == 40 and summary["processed"] == 3
    logs = sorted((tmp_path / "logs").glob("tag-*.log"))
    assert logs and "exit 0" in logs[-1].read_text()
    # 3 of 43 sample files are broken on purpose: above a 1% limit the job must alert.
    third = _nightly(tmp_path, MAX_ERROR_RATE="0.01")
    assert third.returncode == 7


def test_nightly_job_tags_with_the_published_model_once_there_is_one(tmp_path):
    import pandas as pd

    published = tmp_path / "learned"
    published.mkdir()
    first = _nightly(tmp_path, MODEL_DIR=str(published), MAX_ERROR_RATE="0.1")  # none published: bundled
    assert first.returncode == 0, first.stderr
    assert "bundled model" in sorted((tmp_path / "logs").glob("tag-*.log"))[-1].read_text()
    rows = pd.read_parquet(tmp_path / "tags.parquet")
    assert rows.loc[rows["status"] == "ok", "model"].str.startswith("fashion-garment-cnn@").all()
    shutil.copytree(REPO / "catalog_tagger" / "models", published, dirs_exist_ok=True)
    card = json.loads((published / "model.json").read_text())
    card["name"] = "learned-week-1"
    (published / "model.json").write_text(json.dumps(card))
    second = _nightly(tmp_path, MODEL_DIR=str(published), MAX_ERROR_RATE="0.1")
    assert second.returncode == 0, second.stderr
    rows = pd.read_parquet(tmp_path / "tags.parquet")
    assert rows.loc[rows["status"] == "ok", "model"].str.startswith("learned-week-1@").all()  # all re-tagged
    summary = json.loads((tmp_path / "tags.parquet.summary.json").read_text())
    assert summary["carried_over"] == 0


def test_jobs_say_what_is_missing_with_exit_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("CATALOG_DIR", "MODEL_DIR")}
    for job in ("nightly-tag.sh", "weekly-learn.sh", "retrain.sh"):
        done = subprocess.run(["bash", str(REPO / "jobs" / job)], capture_output=True, text=True, env=env)
        assert done.returncode == 2 and "set " in done.stderr, (job, done.stderr)
    # a mistyped FILLED_DIR is not "nothing filled yet": cron must hear of it
    (tmp_path / "m").mkdir()
    done = subprocess.run(["bash", str(REPO / "jobs" / "weekly-learn.sh")], capture_output=True, text=True,
                          env={**env, "MODEL_DIR": str(tmp_path / "m"), "FILLED_DIR": str(tmp_path / "typo")})
    assert done.returncode == 2 and "typo" in done.stderr and not any((tmp_path / "m").iterdir())


def test_a_mistyped_or_unmounted_model_dir_stops_the_jobs_with_exit_2(tmp_path):
    """Not "no model published yet": tagging would re-tag every photo with the bundled model,
    learning would start from it, and publishing would go where tag never looks."""
    typo = tmp_path / "lerned"
    (tmp_path / "filled").mkdir()
    env = {**os.environ, "MODEL_DIR": str(typo), "FILLED_DIR": str(tmp_path / "filled")}
    for job in ("nightly-tag.sh", "weekly-learn.sh"):
        done = subprocess.run(["bash", str(REPO / "jobs" / job)], capture_output=True, text=True,
                              env={**env, "CATALOG_DIR": str(SAMPLE), "OUTPUT_DIR": str(tmp_path / "out")})
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and str(typo) in lines[0], (job, done.stderr)
    run = tmp_path / "run"
    shutil.copytree(REPO / "catalog_tagger" / "models", run)
    done = subprocess.run(["bash", str(REPO / "jobs" / "publish-model.sh"), str(run), str(tmp_path / "typo" / "m")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "does not exist" in done.stderr
    assert not typo.exists() and not (tmp_path / "typo").exists() and not (tmp_path / "out").exists()
    # the model folder itself may be new: the first publication
    done = subprocess.run(["bash", str(REPO / "jobs" / "publish-model.sh"), str(run), str(typo)],
                          capture_output=True, text=True)
    assert done.returncode == 0 and (typo / "model.json").is_file(), done.stderr


def test_a_failed_night_prints_one_line_for_cron_to_mail(tmp_path):
    tagger = Path(sys.executable).with_name("catalog-tagger")
    assert _nightly(tmp_path, CATALOG_DIR=str(SAMPLE / "images" / "broken"), MAX_ERROR_RATE="1").returncode == 0
    (tmp_path / "share").mkdir()  # the share is not mounted tonight: an empty mount point
    done = _nightly(tmp_path, CATALOG_DIR=str(tmp_path / "share"))
    log = sorted((tmp_path / "logs").glob("tag-*.log"))[-1]
    assert done.returncode == 5 and done.stdout == ""
    assert done.stderr.startswith("catalog-tagger tag failed (exit 5): ") and "no images to tag" in done.stderr
    assert done.stderr.rstrip().endswith(f"see {log}") and len(done.stderr.splitlines()) == 1
    # cron's PATH without TAGGER: the executable is not found, and cron must hear of it
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "CATALOG_DIR": str(SAMPLE), "OUTPUT_DIR": str(tmp_path)}
    done = subprocess.run(["bash", str(REPO / "jobs" / "nightly-tag.sh")], capture_output=True, text=True, env=env)
    assert done.returncode == 127 and "(exit 127): " in done.stderr and "not found" in done.stderr
    # the review job too
    done = subprocess.run(["bash", str(REPO / "jobs" / "nightly-review.sh")], capture_output=True, text=True,
                          env={**env, "TAGGER": str(tagger), "BUDGET": "5"})
    assert done.returncode == 3 and done.stderr.startswith("catalog-tagger review failed (exit 3): "), done.stderr


def test_office_owner_files_are_no_review_files(tmp_path):
    """Excel leaves ~$name.xlsx beside a workbook someone has open; LibreOffice .~lock.name#."""
    tagger = Path(sys.executable).with_name("catalog-tagger")
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("sku-10001.jpg", "sku-10002.png", "sku-10004.jpg"):
        shutil.copy(SAMPLE / "images" / name, photos / name)
    assert subprocess.run([str(tagger), "-q", "tag", str(photos), "--out", str(tmp_path / "tags.parquet"),
                           "--workers", "0"]).returncode == 0
    review = tmp_path / "review"
    review.mkdir()
    (review / "~$review-20261130.xlsx").write_bytes(b"\x05alice" + b" " * 160)
    (review / ".~lock.review-20261130.xlsx#").write_text(",alice,host,30.11.2026 10:00,alice;")
    done = subprocess.run(["bash", str(REPO / "jobs" / "nightly-review.sh")], capture_output=True, text=True,
                          env={**os.environ, "OUTPUT_DIR": str(tmp_path), "TAGGER": str(tagger), "BUDGET": "2"})
    assert done.returncode == 0, (done.stderr, [p.read_text() for p in (tmp_path / "logs").glob("*.log")])
    filled = tmp_path / "filled"
    filled.mkdir()
    (filled / "~$review-20261130.xlsx").write_bytes(b"\x05alice" + b" " * 160)
    (tmp_path / "m").mkdir()
    done = subprocess.run(["bash", str(REPO / "jobs" / "weekly-learn.sh")], capture_output=True, text=True,
                          env={**os.environ, "MODEL_DIR": str(tmp_path / "m"), "FILLED_DIR": str(filled),
                               "TAGGER": str(tagger)})
    assert done.returncode == 0 and "no filled review files" in done.stdout, done.stderr


def test_publishing_a_model_swaps_card_and_weights_as_a_pair(tmp_path):
    """Each model's weights are published under their own name before the card that names them,
    so a kill between two renames leaves a pair that loads; stale weights go last."""
    import torch

    from catalog_tagger.checkpoint import load_model, save_model

    bundled = load_model()
    runs = []
    for i in range(2):  # two models with different weights
        run = tmp_path / f"run{i}"
        run.mkdir()
        with torch.no_grad():
            for p in bundled.model.parameters():
                p.add_(0.001 * (i + 1))
        save_model(bundled.model, {k: v for k, v in bundled.card.items() if k not in ("weights_file",)},
                   run / "model.safetensors")
        runs.append(run)
    published = tmp_path / "published"
    for run in runs:
        done = subprocess.run(["bash", str(REPO / "jobs" / "publish-model.sh"), str(run), str(published)],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        card = json.loads((run / "model.json").read_text())
        loaded = load_model(published)
        assert loaded.card["weights_sha256"] == card["weights_sha256"]
        assert [p.name for p in published.glob("*.safetensors")] == [f"model-{card['weights_sha256'][:12]}.safetensors"]
    # a kill after the weights, before the card: the published card still loads with its own weights
    before = load_model(published).card["weights_sha256"]
    (published / f"model-{'0' * 12}.safetensors").write_bytes((runs[0] / "model.safetensors").read_bytes())
    assert load_model(published).card["weights_sha256"] == before
