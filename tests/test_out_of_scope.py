"""Out-of-scope scores: the arithmetic on small arrays, the bundled model on real images, then
photos of no garment through the real `catalog-tagger tag`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from catalog_tagger import out_of_scope as oos
from catalog_tagger.checkpoint import BUNDLED_DIR, load_model
from catalog_tagger.preprocess import to_model_array
from catalog_tagger.runtime import prepare_model
from catalog_tagger.synth import render_catalog_photo


def test_threshold_flags_the_requested_share_of_in_scope_scores() -> None:
    scores = np.arange(1000, dtype=float)
    threshold = oos.fit_threshold(scores, flag_share=0.05)
    assert (scores > threshold).mean() == pytest.approx(0.05, abs=0.002)
    assert oos.fit_threshold(scores, 0.0) == scores.max()


@pytest.mark.parametrize("scores, share", [(np.array([]), 0.05), (np.ones(3), 1.0), (np.ones(3), -0.1)])
def test_threshold_refuses_what_cannot_set_it(scores: np.ndarray, share: float) -> None:
    with pytest.raises(ValueError):
        oos.fit_threshold(scores, share)


def test_mahalanobis_is_the_distance_to_the_nearest_class_mean() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 400)
    centres = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0]])
    scale = np.array([1.0, 2.0, 0.5])
    feats = centres[labels] + rng.normal(size=(len(labels), 3)) * scale
    g = oos.fit_feature_gaussian(feats, labels, 3)
    assert np.allclose(g.means, centres, atol=0.2)
    # at a class mean the distance is 0; one standard deviation away along any axis it is 1
    probes = np.array([centres[1], centres[1] + [scale[0], 0, 0], centres[2] + [0, 0, scale[2]]])
    assert np.allclose(oos.mahalanobis(probes, g), [0.0, 1.0, 1.0], atol=0.15)
    # the same Euclidean step costs more along the axis with the smallest spread
    step = np.array([[0, 0, 3.0], [3.0, 0, 0]])
    far_thin, far_wide = oos.mahalanobis(step, g)
    assert far_thin > 3 * far_wide  # (3 / 0.5)^2 = 36 against (3 / 1)^2 = 9
    brute = min(float((probes[1] - m) @ g.precision @ (probes[1] - m)) for m in g.means)
    assert oos.mahalanobis(probes[1:2], g)[0] == pytest.approx(brute)


def test_feature_statistics_survive_the_model_card_round_trip() -> None:
    rng = np.random.default_rng(1)
    g = oos.fit_feature_gaussian(rng.normal(size=(200, 4)), np.arange(200) % 2, 2)
    back = oos.FeatureGaussian.from_dict(json_round_trip(g.to_dict()))
    x = rng.normal(size=(5, 4))
    assert np.allclose(oos.mahalanobis(x, back), oos.mahalanobis(x, g), rtol=1e-5)
    with pytest.raises(ValueError):
        oos.FeatureGaussian.from_dict({"means": [[0.0, 0.0]], "precision": [[1.0]]})
    with pytest.raises(ValueError, match="class"):
        oos.fit_feature_gaussian(rng.normal(size=(10, 4)), np.zeros(10, int), 2)


def json_round_trip(obj: dict) -> dict:
    return json.loads(json.dumps(obj))


def test_logit_scores_rank_a_flat_prediction_above_a_peaked_one() -> None:
    logits = np.array([[12.0, 0.0, 0.0], [1.0, 0.9, 0.8]])
    assert oos.energy(logits)[1] > oos.energy(logits)[0]
    assert oos.max_softmax(logits)[1] > oos.max_softmax(logits)[0]
    assert oos.energy(np.zeros((1, 4)))[0] == pytest.approx(-np.log(4))
    assert oos.max_softmax(np.zeros((1, 4)))[0] == pytest.approx(0.75)


def test_short_side_measures_the_box_around_the_ink() -> None:
    images = np.zeros((3, 28, 28), np.uint8)
    images[1, 10:14, 0:28] = 200  # a line of text: 28 wide, 4 high
    images[2, 2:26, 5:20] = 200
    assert oos.short_side(images).tolist() == [0, 4, 15]
    assert oos.short_side(images[:, None]).tolist() == [0, 4, 15]


def test_ink_fraction_counts_lit_pixels_only() -> None:
    images = np.zeros((3, 1, 28, 28), np.uint8)
    images[1, 0, :14] = 255  # top half lit
    images[2, 0] = oos.INK_LEVEL  # at the level: still background
    assert oos.ink_fraction(images).tolist() == [0.0, 0.5, 0.0]


# ---------------------------------------------------------------- the bundled model


def _noise_photo(seed: int, shape: tuple[int, ...] = (120, 90)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))


def _text_photo(text: str) -> Image.Image:
    img = Image.new("RGB", (240, 80), "white")
    ImageDraw.Draw(img).text((10, 20), text, fill="black", font=ImageFont.load_default(size=24))
    return img


OUT_OF_SCOPE = {
    "blank white": lambda: Image.new("RGB", (80, 60), "white"),
    "pure noise": lambda: _noise_photo(0),
    "other noise": lambda: _noise_photo(1),
    "text on white": lambda: _text_photo("SALE 50% off"),
    "other text": lambda: _text_photo("catalog p. 12"),
}


@pytest.fixture(scope="module")
def bundled_outputs(fmnist_test):
    """The bundled model (as tagging prepares it) and its features and logits for 4,000 test images."""
    loaded = load_model()
    net = prepare_model(loaded.model, torch.device("cpu"))
    feats, logits = oos.features_and_logits(net, fmnist_test.images[:4000])
    return loaded, net, feats, logits


@pytest.fixture(scope="module", params=oos.METHODS)
def bundled(request, bundled_outputs, fmnist_test):
    """A detector of each method for the bundled model: statistics from 2,000 test images,
    thresholds from 1,000 others (1% flagged)."""
    loaded, net, feats, logits = bundled_outputs
    detector = oos.fit_detector(request.param, feats[2000:3000], logits[2000:3000], fmnist_test.images[2000:3000],
                                feats[:2000], fmnist_test.labels[:2000], len(loaded.classes), flag_share=0.01)
    return loaded, net, detector


def test_features_reproduce_the_models_logits(bundled, fmnist_test) -> None:
    loaded, net, _ = bundled
    images = fmnist_test.images[:64]
    feats, logits = oos.features_and_logits(net, images)
    with torch.inference_mode():
        expected = loaded.model(torch.from_numpy(images).unsqueeze(1).float() / 255).numpy()
    assert feats.shape == (64, loaded.model.head.in_features)
    assert np.allclose(logits, expected, atol=1e-4)


def test_real_fashion_mnist_images_are_in_scope(bundled, bundled_outputs, fmnist_test) -> None:
    _, _, detector = bundled
    _, _, all_feats, all_logits = bundled_outputs
    images, feats, logits = fmnist_test.images[3000:4000], all_feats[3000:4000], all_logits[3000:4000]
    flagged = np.array([r is not None for r in detector.reasons(feats, logits, images)])
    assert flagged.mean() < 0.04  # 1% (+0.4% ink) by construction, plus sampling noise


@pytest.mark.parametrize("name", list(OUT_OF_SCOPE))
def test_things_that_are_no_garment_are_out_of_scope(bundled, name: str) -> None:
    loaded, net, detector = bundled
    array = to_model_array(OUT_OF_SCOPE[name](), loaded.config)[None]
    feats, logits = oos.features_and_logits(net, array)
    assert detector.reasons(feats, logits, array)[0] is not None


def test_detector_survives_the_model_card_round_trip(bundled, fmnist_test) -> None:
    _, net, detector = bundled
    back = oos.Detector.from_dict(json_round_trip(detector.to_dict()))
    images = np.concatenate([fmnist_test.images[4000:4050], np.zeros((2, 28, 28), np.uint8)])
    feats, logits = oos.features_and_logits(net, images)
    assert back.reasons(feats, logits, images) == detector.reasons(feats, logits, images)
    assert np.allclose(back.scores(feats, logits), detector.scores(feats, logits), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("bad", [{"method": "vibes"}, {"method": "relative_mahalanobis"}])
def test_detector_refuses_an_incomplete_description(bad: dict) -> None:
    with pytest.raises(ValueError):
        oos.Detector(**{"threshold": 1.0, "ink_low": 0.1, "ink_high": 0.8, **bad})


def test_grain_tells_noise_from_shading() -> None:
    rng = np.random.default_rng(0)
    shaded = np.zeros((1, 28, 28), np.uint8)
    shaded[0, 4:24, 6:22] = np.linspace(80, 240, 20).astype(np.uint8)[:, None]  # a smooth vertical gradient
    noise = rng.integers(60, 256, (1, 28, 28), dtype=np.uint8)
    flat = np.full((1, 28, 28), 200, np.uint8)  # no variation: nothing to say
    values = oos.grain(np.concatenate([shaded, noise, flat]))
    assert values[0] > 0.9 and abs(values[1]) < 0.15 and values[2] == 1.0


@pytest.mark.parametrize("broken", [
    {"threshold": "high"}, {"threshold": float("nan")}, {"method": "vibes"}, {"ink_low": 0.9},
    {"ink_level": 64}, {"min_grain": 2.0}, {"min_side": -1},
    {"class_gaussian": {"means": {"shape": [10, 4], "float32_base64": "not base64!"}, "precision": [[1.0]]}},
    {"class_gaussian": {"means": {"shape": [10, 4], "float32_base64": "AAAA"}, "precision": [[1.0]]}},
])
def test_a_detector_description_that_tagging_could_not_use_is_refused(broken: dict) -> None:
    good = _tiny_detector(4).to_dict()
    oos.Detector.from_dict(json_round_trip(good))  # the unbroken one loads
    with pytest.raises(ValueError):
        oos.Detector.from_dict(json_round_trip({**good, **broken}))


def _tiny_detector(dim: int) -> oos.Detector:
    eye = np.eye(dim)
    return oos.Detector("relative_mahalanobis", 50.0, 0.1, 0.8, 3.0, oos.FeatureGaussian(np.zeros((10, dim)), eye),
                        oos.FeatureGaussian(np.zeros((1, dim)), eye), "by hand", min_grain=0.02)


# ---------------------------------------------------------------- through the real CLI

def _belt_photo() -> Image.Image:
    img = Image.new("RGB", (600, 300), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle((20, 130, 580, 170), fill=(70, 40, 20))
    draw.rectangle((40, 115, 100, 185), outline=(180, 160, 60), width=8)
    return img


def _chessboard_photo() -> Image.Image:
    img = Image.new("RGB", (400, 400), "white")
    draw = ImageDraw.Draw(img)
    for i in range(8):
        for j in range(8):
            if (i + j) % 2:
                draw.rectangle((i * 50, j * 50, i * 50 + 50, j * 50 + 50), fill=(0, 0, 0))
    return img


# Each caught by the bundled card's detector, and by which rule (measured).
NO_GARMENT_PHOTOS = {
    "blank.png": (lambda: Image.new("RGB", (80, 60), "white"), "blank"),
    "noise.png": (lambda: _noise_photo(0), "blank"),  # the conversion empties a noise field
    "noise-large.jpg": (lambda: _noise_photo(2, (900, 1200, 3)), "blank"),
    "text.png": (lambda: _text_photo("SALE 50% off"), "blank"),
    "belt.jpg": (_belt_photo, "blank"),
    "chessboard.png": (_chessboard_photo, "unlike"),  # relative Mahalanobis 155, threshold 120
}


def _tag_rows(run_cli, source, out, *extra):
    result = run_cli("-q", "tag", source, "--out", out, "--workers", "0", *extra)
    assert result.exit_code == 0, result.output
    return pd.read_parquet(out) if str(out).endswith(".parquet") else pd.read_csv(out, keep_default_na=False)


@pytest.fixture(scope="module")
def no_garments(tmp_path_factory):
    folder = tmp_path_factory.mktemp("no-garments")
    for name, (make, _) in NO_GARMENT_PHOTOS.items():
        make().save(folder / name)
    return folder


def test_photos_of_no_garment_are_rows_out_of_scope_with_a_reason(run_cli, no_garments, tmp_path):
    # --max-error-rate 0: an out-of-scope photo was read and judged, it is no failure
    rows = _tag_rows(run_cli, no_garments, tmp_path / "t.parquet", "--max-error-rate", "0").set_index("image_id")
    assert sorted(rows.index) == sorted(NO_GARMENT_PHOTOS)
    for name, (_, rule) in NO_GARMENT_PHOTOS.items():
        row = rows.loc[name]
        assert row["status"] == "out_of_scope", (name, row["label"], row["error"])
        assert row["error"].startswith(rule + ":"), (name, row["error"])
        assert pd.isna(row["label"]) and pd.isna(row["label_id"]) and pd.isna(row["confidence"])
        assert row["needs_review"] and len(row["topk_labels"]) == 3  # the nearest classes stay, as a hint
    summary = json.loads((tmp_path / "t.parquet.summary.json").read_text())
    assert summary["by_status"] == {"out_of_scope": len(NO_GARMENT_PHOTOS)} and summary["failed"] == 0
    csv_rows = _tag_rows(run_cli, no_garments, tmp_path / "t.csv")
    assert set(csv_rows["status"]) == {"out_of_scope"} and set(csv_rows["label"]) == {""}


def test_rendered_catalog_photos_are_mostly_in_scope(run_cli, fmnist_test, tmp_path):
    folder = tmp_path / "catalog"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, index in enumerate(rng.choice(len(fmnist_test.images), 150, replace=False)):
        render_catalog_photo(fmnist_test.images[index], int(rng.integers(2, 9)), rng=rng).save(folder / f"{i:03d}.jpg")
    rows = _tag_rows(run_cli, folder, tmp_path / "t.parquet")
    flagged = rows["status"] == "out_of_scope"
    assert set(rows["status"]) <= {"ok", "out_of_scope"}
    assert flagged.mean() <= 0.04  # measured 0.2% threshold + 0.8% bounds: about 1% of rendered items
    assert rows.loc[~flagged, "label"].notna().all()


def _bundled_copy(tmp_path, change) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(BUNDLED_DIR, folder)
    card = json.loads((folder / "model.json").read_text())
    change(card)
    (folder / "model.json").write_text(json.dumps(card))
    return folder


def test_the_cards_threshold_is_the_one_tagging_applies(run_cli, fmnist_test, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        render_catalog_photo(fmnist_test.images[i], 6).save(folder / f"{i}.jpg")
    model = _bundled_copy(tmp_path, lambda card: card["out_of_scope"].update(threshold=-1e9))
    rows = _tag_rows(run_cli, folder, tmp_path / "t.parquet", "--model", model)
    assert set(rows["status"]) == {"out_of_scope"} and set(rows["error"]) == {oos.REASON_UNLIKE}


def test_a_card_without_a_detector_tags_every_photo_with_a_class(run_cli, no_garments, tmp_path):
    model = _bundled_copy(tmp_path, lambda card: card.pop("out_of_scope"))
    rows = _tag_rows(run_cli, no_garments, tmp_path / "t.parquet", "--model", model)
    assert set(rows["status"]) == {"ok"} and rows["label"].notna().all()


def test_a_broken_detector_in_the_card_stops_tagging_with_the_model_code(run_cli, no_garments, tmp_path):
    model = _bundled_copy(tmp_path, lambda card: card["out_of_scope"].update(ink_low=2.0))
    result = run_cli("-q", "tag", no_garments, "--out", tmp_path / "t.parquet", "--model", model)
    assert result.exit_code == 4 and "out_of_scope" in result.output


def test_incremental_runs_carry_out_of_scope_rows_over(run_cli, no_garments, tmp_path):
    first = _tag_rows(run_cli, no_garments, tmp_path / "first.parquet")
    second = _tag_rows(run_cli, no_garments, tmp_path / "second.parquet", "--incremental", tmp_path / "first.parquet")
    summary = json.loads((tmp_path / "second.parquet.summary.json").read_text())
    assert summary["carried_over"] == len(NO_GARMENT_PHOTOS) and summary["processed"] == 0
    columns = ["image_id", "status", "error", "needs_review", "run_id"]
    pd.testing.assert_frame_equal(first[columns], second[columns])


def test_evaluate_reports_the_in_scope_images_the_detector_flags(run_cli, fmnist_test, tmp_path):
    data = tmp_path / "labeled"
    for k, name in ((0, "T-shirt/top"), (1, "Trouser")):
        folder = data / name.replace("/", "-")
        folder.mkdir(parents=True)
        for i in np.flatnonzero(fmnist_test.labels == k)[:6]:
            render_catalog_photo(fmnist_test.images[i], 6).save(folder / f"{i}.png")
    report = json.loads(run_cli("-q", "evaluate", "--data", data, "--json").output)["out_of_scope"]
    assert set(report["per_class"]) == set(load_model().classes) and report["in_scope_flagged"] <= 0.25
    everything = _bundled_copy(tmp_path, lambda card: card["out_of_scope"].update(threshold=-1e9))
    report = json.loads(run_cli("-q", "evaluate", "--data", data, "--model", everything, "--json").output)
    assert report["out_of_scope"]["in_scope_flagged"] == 1.0 and report["out_of_scope"]["by_reason"] == {"unlike": 12}
    assert report["out_of_scope"]["per_class"]["Trouser"] == 1.0 and report["out_of_scope"]["per_class"]["Bag"] is None
