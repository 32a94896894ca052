"""The cron wrapper, run as cron would run it."""

from __future__ import annotations

import json
import os
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
    import shutil

    import pandas as pd

    published = tmp_path / "learned"
    first = _nightly(tmp_path, MODEL_DIR=str(published), MAX_ERROR_RATE="0.1")  # none published: bundled
    assert first.returncode == 0, first.stderr
    rows = pd.read_parquet(tmp_path / "tags.parquet")
    assert rows.loc[rows["status"] == "ok", "model"].str.startswith("fashion-garment-cnn@").all()
    shutil.copytree(REPO / "catalog_tagger" / "models", published)
    card = json.loads((published / "model.json").read_text())
    card["name"] = "learned-week-1"
    (published / "model.json").write_text(json.dumps(card))
    second = _nightly(tmp_path, MODEL_DIR=str(published), MAX_ERROR_RATE="0.1")
    assert second.returncode == 0, second.stderr
    rows = pd.read_parquet(tmp_path / "tags.parquet")
    assert rows.loc[rows["status"] == "ok", "model"].str.startswith("learned-week-1@").all()  # all re-tagged
    summary = json.loads((tmp_path / "tags.parquet.summary.json").read_text())
    assert summary["carried_over"] == 0
