"""Training and evaluating on a retailer's own labeled photos (folders or manifest)."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from catalog_tagger.checkpoint import load_model
from catalog_tagger.config import TrainConfig
from catalog_tagger.data.labeled import class_key, stratified_split
from catalog_tagger.errors import DataError, ModelError
from catalog_tagger.train import fit

SHAPES = {"hats": "ellipse", "scarves": "rectangle", "belts": "line"}
COLOURS = {"hats": (200, 30, 30), "scarves": (30, 160, 30), "belts": (40, 40, 200)}


def _photo(kind: str, rng: np.random.Generator) -> Image.Image:
    img = Image.new("RGB", (120, 160), "white")
    draw = ImageDraw.Draw(img)
    x0, y0 = rng.integers(5, 30, 2)
    box = (int(x0), int(y0), int(x0 + 60 + rng.integers(0, 25)), int(y0 + 80 + rng.integers(0, 40)))
    if SHAPES[kind] == "ellipse":
        draw.ellipse(box, fill=COLOURS[kind])
    elif SHAPES[kind] == "rectangle":
        draw.rectangle(box, fill=COLOURS[kind])
    else:
        draw.line(box, fill=COLOURS[kind], width=12)
    return img


@pytest.fixture(scope="module")
def own_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    rng = np.random.default_rng(0)
    for kind in SHAPES:
        (root / kind).mkdir()
        for i in range(24):
            _photo(kind, rng).save(root / kind / f"{i:02d}.jpg", quality=90)
    (root / "hats" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def _config(tmp_path, **kw):
    base = dict(out=tmp_path / "own-model", epochs=6, batch_size=16, lr=0.05, workers=0, device="cpu",
                widths=(8, 16), stem_width=8, val_fraction=0.25)
    return TrainConfig(**{**base, **kw})


def test_image_folder_training_learns_its_own_classes_and_skips_bad_images(own_folder, tmp_path):
    card = fit(_config(tmp_path, data=own_folder, input_size=32, channels=3), progress=False)
    assert card["classes"] == ["belts", "hats", "scarves"]
    assert card["model_config"]["input_size"] == 32 and card["model_config"]["channels"] == 3
    assert card["training"]["skipped_images"] == 1
    assert card["training"]["skipped_examples"][0]["path"].endswith("broken.jpg")
    assert card["metrics"]["test_accuracy"] is None and card["metrics"]["val_accuracy"] > 0.6
    assert load_model(tmp_path / "own-model").config.channels == 3


def test_evaluate_on_a_labeled_folder(own_folder, tmp_path, run_cli):
    fit(_config(tmp_path, data=own_folder, epochs=20), progress=False)
    result = run_cli("-q", "evaluate", "--model", tmp_path / "own-model", "--data", own_folder, "--json",
                     "--workers", "0")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["n"] == 72 and metrics["dataset"]["skipped_images"] == 1
    assert metrics["accuracy"] > 0.6  # three well-separated classes; chance is 1/3


def test_manifest_training_and_fine_tuning_from_a_model_with_the_same_classes(own_folder, tmp_path):
    rows = [{"file": str(p), "kind": p.parent.name} for p in sorted(own_folder.rglob("*.jpg"))]
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    first = fit(_config(tmp_path, manifest=tmp_path / "labels.csv", path_col="file", label_col="kind",
                        out=tmp_path / "a"), progress=False)
    tuned = fit(_config(tmp_path, manifest=tmp_path / "labels.csv", path_col="file", label_col="kind",
                        out=tmp_path / "b", init=tmp_path / "a", epochs=1), progress=False)
    assert tuned["classes"] == first["classes"]
    assert tuned["training"]["init"].startswith("a@sha256:")


def test_fine_tuning_needs_matching_classes(own_folder, tmp_path):
    bundled = load_model().weights_path  # Fashion-MNIST classes; the folder has hats, scarves, belts
    with pytest.raises(DataError, match="not among the model's classes"):
        fit(_config(tmp_path, data=own_folder, init=bundled, out=tmp_path / "x"), progress=False)


def test_fashion_mnist_training_refuses_an_init_with_other_classes(own_folder, tmp_path, tiny_data_dir):
    fit(_config(tmp_path, data=own_folder, out=tmp_path / "own"), progress=False)
    with pytest.raises(ModelError, match="not Fashion-MNIST"):
        fit(_config(tmp_path, data_dir=tiny_data_dir, init=tmp_path / "own", out=tmp_path / "fm"), progress=False)


def test_folder_names_match_class_names_loosely():
    assert class_key("T-shirt_top") == class_key("T-shirt/top") == class_key("t shirt top")
    assert class_key("Ankle boot") != class_key("Sneaker")


def test_stratified_split_keeps_every_class_on_both_sides():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 2)
    train, val = stratified_split(labels, 0.2, seed=1)
    assert set(labels[val]) == {0, 1, 2} and set(labels[train]) == {0, 1, 2}
    assert not set(train) & set(val) and len(train) + len(val) == len(labels)


def _small_folder(root, counts: dict[str, int]):
    rng = np.random.default_rng(1)
    for folder, n in counts.items():
        (root / folder).mkdir(parents=True)
        for i in range(n):
            _photo(folder.split("/")[-1], rng).save(root / folder / f"{i:02d}.png")
    return root


def test_two_spellings_of_one_label_are_refused_and_rows_without_a_label_are_reported(own_folder, tmp_path):
    rows = [{"file": str(p), "kind": p.parent.name} for p in sorted(own_folder.rglob("*.jpg"))]
    rows[0]["kind"] = rows[0]["kind"].upper()  # "BELTS" beside "belts"
    pd.DataFrame(rows).to_csv(tmp_path / "clash.csv", index=False)
    with pytest.raises(DataError, match="name the same class"):
        fit(_config(tmp_path, manifest=tmp_path / "clash.csv", path_col="file", label_col="kind"), progress=False)
    rows[0]["kind"], rows[1]["kind"] = "", "nan"  # a blank cell, and what pandas writes for a missing one
    pd.DataFrame(rows).to_csv(tmp_path / "gaps.csv", index=False)
    card = fit(_config(tmp_path, manifest=tmp_path / "gaps.csv", path_col="file", label_col="kind", epochs=1),
               progress=False)
    assert card["classes"] == ["belts", "hats", "scarves"]
    assert [s["status"] for s in card["training"]["skipped_examples"]].count("unlabeled") == 2


def test_a_class_whose_images_all_fail_to_decode_is_refused(tmp_path):
    root = _small_folder(tmp_path / "d", {"hats": 6, "belts": 6})
    for path in (root / "belts").iterdir():
        path.write_bytes(b"not an image")
    with pytest.raises(DataError, match="no image of class 'belts'"):
        fit(_config(tmp_path, data=root), progress=False)


@pytest.mark.parametrize("layout, message", [
    ({"hats": 4, "belts": 0}, "holds no images"),
    ({"train/hats": 4, "train/belts": 4, "val/hats": 2, "val/belts": 2}, "dataset splits"),
    ({"hats": 1, "belts": 1}, "too few images for a validation split"),
])
def test_a_folder_layout_that_would_train_a_wrong_model_is_refused(tmp_path, run_cli, layout, message):
    root = _small_folder(tmp_path / "d", layout)
    result = run_cli("-q", "train", "--data", root, "--out", tmp_path / "run", "--epochs", "1", "--workers", "0")
    assert result.exit_code == 3 and message in result.output and "Traceback" not in result.output


def test_evaluate_on_photos_of_a_single_class(own_folder, tmp_path, run_cli):
    fit(_config(tmp_path, data=own_folder, epochs=1), progress=False)
    root = _small_folder(tmp_path / "one", {"hats": 5})
    result = run_cli("-q", "evaluate", "--model", tmp_path / "own-model", "--data", root, "--json", "--workers", "0")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n"] == 5


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_an_out_that_is_a_file_is_an_output_error_before_any_work(own_folder, tmp_path, run_cli, command):
    (tmp_path / "taken").write_text("")
    args = ["--data", own_folder] if command == "train" else []
    result = run_cli("-q", command, *args, "--out", tmp_path / "taken", "--workers", "0")
    assert result.exit_code == 6 and "is a file" in result.output and "Traceback" not in result.output


def test_fine_tuning_records_the_init_models_shape_not_ignored_options(own_folder, tmp_path):
    fit(_config(tmp_path, data=own_folder, out=tmp_path / "a", epochs=1), progress=False)
    tuned = fit(_config(tmp_path, data=own_folder, out=tmp_path / "b", init=tmp_path / "a", epochs=1,
                        input_size=64, channels=3, flip_tta=False), progress=False)
    used, recorded = tuned["model_config"], tuned["training"]["config"]
    assert (recorded["input_size"], recorded["channels"], recorded["flip_tta"]) == \
        (used["input_size"], used["channels"], used["flip_tta"]) == (28, 1, True)


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_an_out_inside_the_labeled_folder_is_refused_before_it_is_made(own_folder, tmp_path, run_cli, command):
    data = tmp_path / "held-out"
    shutil.copytree(own_folder, data)
    before = sorted(p.name for p in data.iterdir())
    result = run_cli("-q", command, "--data", data, "--out", data / "report", "--workers", "0")
    assert result.exit_code == 2 and "is inside --data" in result.output, result.output
    assert sorted(p.name for p in data.iterdir()) == before  # no empty class folder "report" left behind
