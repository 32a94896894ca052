import json

import numpy as np
import pandas as pd
import pytest

from catalog_tagger.calibration import (
    calibrate,
    expected_calibration_error,
    fit_temperature,
    review_table,
    softmax,
    threshold_for_precision,
)

from .conftest import SAMPLE


def _synthetic(n: int, true_temperature: float, seed: int = 0):
    """Labels drawn from softmax(logits / T): logits that are over-confident by a factor T."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, 10))
    probs = softmax(logits, true_temperature)
    labels = np.array([rng.choice(10, p=p) for p in probs])
    return logits, labels


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fitted_temperature_recovers_the_true_one(true_t):
    logits, labels = _synthetic(20000, true_t)
    assert fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.08)


def test_no_temperature_is_fitted_when_validation_has_no_mistake():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(40, 5))
    labels = logits.argmax(1)  # every validation prediction right: NLL falls without end as T -> 0
    assert fit_temperature(logits, labels) is None
    card = calibrate(logits, labels)
    assert card["temperature"] == 1.0 and card["method"].startswith("none")


def test_calibration_lowers_the_error_of_overconfident_scores():
    logits, labels = _synthetic(20000, 2.5)
    result = calibrate(logits, labels)
    assert result["val_ece_before"] > 0.1 and result["val_ece_after"] < 0.02


def test_ece_is_zero_for_perfect_and_large_for_always_wrong_certainty():
    conf = np.full(1000, 0.7)
    correct = np.arange(1000) < 700
    assert expected_calibration_error(conf, correct) == pytest.approx(0.0, abs=1e-9)
    assert expected_calibration_error(np.ones(100), np.zeros(100, bool)) == pytest.approx(1.0)


def test_review_table_and_threshold_choice():
    conf = np.linspace(0.1, 1.0, 1000)
    correct = conf > 0.4  # everything above 0.4 is right
    table = review_table(conf, correct)
    coverages = [row[2] for row in table]
    assert coverages == sorted(coverages)
    threshold, precision, coverage = threshold_for_precision(table, 0.99)
    assert precision >= 0.99 and threshold >= 0.39 and coverage > 0.6
    assert threshold_for_precision(table, 1.01) is None


def test_trained_cards_carry_calibration_and_tag_uses_it(tmp_path, tiny_data_dir, run_cli):
    from catalog_tagger.config import TrainConfig
    from catalog_tagger.train import fit

    card = fit(TrainConfig(out=tmp_path / "m", data_dir=tiny_data_dir, epochs=3, batch_size=64, val_size=200,
                           widths=(8, 16), stem_width=8, device="cpu", worn_prob=0.0), progress=False)
    cal = card["calibration"]
    assert cal["temperature"] > 0 and len(cal["review_table"]) == 101
    out = tmp_path / "t.parquet"
    result = run_cli("-q", "tag", SAMPLE, "--out", out, "--model", tmp_path / "m", "--workers", "0",
                     "--target-precision", "0.6")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "t.parquet.summary.json").read_text())
    assert "chosen for precision 0.6" in summary["review_rule"]
    threshold, _, _ = threshold_for_precision(cal["review_table"], 0.6)
    assert summary["review_threshold"] == pytest.approx(threshold, abs=1e-6)
    rows = pd.read_parquet(out)
    ok = rows[rows["status"] == "ok"]
    assert (ok["needs_review"] == (ok["confidence"] < threshold)).all()


def test_target_precision_needs_a_calibrated_model(tmp_path, run_cli):
    from catalog_tagger.checkpoint import save_model
    from catalog_tagger.model import ModelConfig, build_model

    save_model(build_model(ModelConfig(widths=(8,), stem_width=8)), {"name": "raw"}, tmp_path / "model.safetensors")
    result = run_cli("tag", SAMPLE, "--out", tmp_path / "t.parquet", "--model", tmp_path, "--target-precision", "0.95")
    assert result.exit_code == 2 and "needs a calibrated model" in result.output


def test_calibrate_command_adds_calibration_to_an_existing_card(tmp_path, tiny_data_dir, run_cli):
    from catalog_tagger.checkpoint import load_model
    from catalog_tagger.config import TrainConfig
    from catalog_tagger.train import fit

    card = fit(TrainConfig(out=tmp_path / "m", data_dir=tiny_data_dir, epochs=1, batch_size=64, val_size=200,
                           widths=(8, 16), stem_width=8, device="cpu"), progress=False)
    card_path = tmp_path / "m" / "model.json"
    stripped = {k: v for k, v in card.items() if k != "calibration"}
    card_path.write_text(json.dumps(stripped))
    assert load_model(tmp_path / "m").temperature == 1.0
    result = run_cli("-q", "calibrate", "--model", tmp_path / "m", "--data-dir", tiny_data_dir)
    assert result.exit_code == 0, result.output
    again = load_model(tmp_path / "m")  # still loads: the weights and their hash are untouched
    assert again.card["calibration"]["temperature"] == card["calibration"]["temperature"]
    assert again.sha256 == card["weights_sha256"]
