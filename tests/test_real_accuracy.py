"""Accuracy claims, measured on the real Fashion-MNIST test set (never skipped)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from catalog_tagger.checkpoint import load_model
from catalog_tagger.synth import render_catalog_photo

pytestmark = pytest.mark.slow  # the bundled model on all 10,000 test images


@pytest.fixture(scope="module")
def evaluated(run_cli_module, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    result = run_cli_module("evaluate", "--json", "--out", out)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), out


@pytest.fixture(scope="module")
def run_cli_module():
    from click.testing import CliRunner

    from catalog_tagger.cli import cli

    runner = CliRunner()
    return lambda *args: runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_bundled_model_reaches_its_card_accuracy_and_the_target(evaluated):
    metrics, _ = evaluated
    card = load_model().card
    assert metrics["n"] == 10000
    assert metrics["accuracy"] >= 0.945  # the card says 0.9493; the issue asks for 0.945
    assert abs(metrics["accuracy"] - card["metrics"]["test_accuracy"]) <= 0.001
    assert set(metrics["per_class"]) == set(card["classes"])
    assert all(0.0 < row["f1"] <= 1.0 for row in metrics["per_class"].values())


def test_evaluate_writes_its_report_files(evaluated):
    metrics, out = evaluated
    cm = pd.read_csv(out / "confusion_matrix.csv", index_col=0)
    assert cm.to_numpy().sum() == 10000
    assert np.trace(cm.to_numpy()) / 10000 == pytest.approx(metrics["accuracy"])
    for name in ("confusion_matrix.png", "predictions.png", "metrics.json"):
        assert (out / name).stat().st_size > 1000


def _tag_accuracy(run_cli, folder, labels, out) -> tuple[float, float]:
    """Top-1 accuracy of the tagged rows (for rows out of scope, the nearest class they keep)
    and the share out of scope."""
    result = run_cli("-q", "tag", folder, "--out", out)
    assert result.exit_code == 0, result.output
    rows = pd.read_parquet(out)
    truth = rows["image_id"].str.extract(r"(\d+)")[0].astype(int).map(lambda i: labels[i])
    assert set(rows["status"]) <= {"ok", "out_of_scope"}
    classes = load_model().classes
    top1 = rows["topk_labels"].map(lambda labels: classes.index(labels[0]))
    return float((top1.to_numpy() == truth.to_numpy()).mean()), float((rows["status"] == "out_of_scope").mean())


def test_tagging_fashion_mnist_pngs_matches_evaluate(evaluated, fmnist_test, run_cli_module, tmp_path):
    metrics, _ = evaluated
    for i, item in enumerate(fmnist_test.images):
        Image.fromarray(item).save(tmp_path / f"{i:05d}.png", compress_level=1)
    accuracy, out_of_scope = _tag_accuracy(run_cli_module, tmp_path, fmnist_test.labels,
                                           tmp_path.parent / "png.parquet")
    assert abs(accuracy - metrics["accuracy"]) <= 0.005
    # the same pixels, so the same out-of-scope decisions as evaluate's (1.26% of them)
    assert abs(out_of_scope - metrics["out_of_scope"]["in_scope_flagged"]) <= 0.002


def test_same_items_as_catalog_jpegs_stay_within_two_points(evaluated, fmnist_test, run_cli_module, tmp_path):
    metrics, _ = evaluated
    for i, item in enumerate(fmnist_test.images):
        render_catalog_photo(item, 10).save(tmp_path / f"{i:05d}.jpg", quality=90)
    accuracy, out_of_scope = _tag_accuracy(run_cli_module, tmp_path, fmnist_test.labels,
                                           tmp_path.parent / "jpg.parquet")
    assert accuracy >= metrics["accuracy"] - 0.02
    assert out_of_scope <= 0.03  # catalog photos of garments are rarely called out of scope
