"""--target-precision says whether it can vouch for the precision on today's photos."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from catalog_tagger.checkpoint import BUNDLED_DIR
from catalog_tagger.precision_check import DRIFT_TOLERANCE, check_target_precision

from .conftest import SAMPLE

TABLE = [[0.9, 0.99, 0.30], [0.6, 0.96, 0.60], [0.3, 0.90, 0.90]]


def own_card(**calibration) -> dict:
    return {"calibration": {"temperature": 1.0, "review_table": TABLE, "source": "own_photos", **calibration}}


def test_fashion_mnist_calibration_is_never_verified():
    card = {"calibration": {"temperature": 0.6, "review_table": TABLE, "fitted_on": "validation split"}}
    check = check_target_precision(card, 0.6, np.full(100, 0.99))
    assert not check.verified and "catalog-tagger review" in check.reason


def test_own_photo_calibration_is_verified_when_today_looks_like_the_calibration_photos():
    rng = np.random.default_rng(0)
    like = np.where(rng.random(1000) < 0.6, 0.8, 0.4)  # 60% above 0.6, as on the calibration photos
    assert check_target_precision(own_card(), 0.6, like).verified
    unlike = np.where(rng.random(1000) < 0.6 + DRIFT_TOLERANCE + 0.1, 0.8, 0.4)
    check = check_target_precision(own_card(), 0.6, unlike)
    assert not check.verified and "do not look like" in check.reason


def test_a_model_trained_on_own_labeled_photos_counts_as_own_calibration():
    card = {"calibration": {"temperature": 1.2, "review_table": TABLE},
            "training": {"config": {"manifest": "labels.csv", "data": None}}}
    assert check_target_precision(card, 0.6, np.array([0.8] * 6 + [0.4] * 4)).verified
    card["training"]["config"]["manifest"] = None
    assert not check_target_precision(card, 0.6, np.array([0.8] * 6 + [0.4] * 4)).verified


@pytest.mark.parametrize("source, verified", [(None, False), ("own_photos", True)])
def test_tag_reports_the_verdict_in_the_summary_parquet_metadata_and_stderr(run_cli, tmp_path, source, verified):
    model = tmp_path / "model"
    shutil.copytree(BUNDLED_DIR, model)
    card = json.loads((model / "model.json").read_text())
    if source:
        # Pretend the calibration came from photos like the sample: at the threshold the
        # target picks (0.255), the table accepts 100%, the sample 37 of its 40 photos.
        card["calibration"]["source"] = source
    (model / "model.json").write_text(json.dumps(card))
    out = tmp_path / "t.parquet"
    result = run_cli("tag", SAMPLE / "images", "--out", out, "--model", model, "--workers", "0",
                     "--target-precision", "0.95")
    assert result.exit_code == 0, result.output
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert summary["target_precision_verified"] is verified
    meta = pq.read_schema(out).metadata
    assert meta[b"target_precision_verified"] == (b"true" if verified else b"false")
    assert ("NOT verified" in result.output) is not verified
