import json
import os
import pickle

import numpy as np
import pytest
import torch

from catalog_tagger.checkpoint import load_model, load_training_state, save_model
from catalog_tagger.errors import ModelError
from catalog_tagger.model import ModelConfig, build_model
from catalog_tagger.out_of_scope import Detector, FeatureGaussian


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(widths=(8, 16), stem_width=8))
    card = save_model(model, {"name": "tiny"}, tmp_path / "m" / "model.safetensors")
    return model, card, tmp_path / "m"


@pytest.mark.parametrize("which", ["folder", "weights", "card"])
def test_saved_model_loads_from_folder_weights_or_card(saved, which):
    model, card, folder = saved
    path = {"folder": folder, "weights": folder / "model.safetensors", "card": folder / "model.json"}[which]
    loaded = load_model(path)
    assert loaded.config == model.config
    assert loaded.sha256 == card["weights_sha256"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value)


def test_card_carries_config_classes_and_hash(saved):
    _, card, folder = saved
    on_disk = json.loads((folder / "model.json").read_text())
    assert on_disk["classes"] == list(ModelConfig().classes)
    assert on_disk["model_config"]["widths"] == [8, 16]
    assert len(on_disk["weights_sha256"]) == 64


def test_weights_that_do_not_match_the_card_are_refused(saved):
    _, _, folder = saved
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="does not match its card"):
        load_model(folder)


def _rehash(folder):
    from catalog_tagger.checkpoint import sha256_file

    card = json.loads((folder / "model.json").read_text())
    card["weights_sha256"] = sha256_file(folder / "model.safetensors")
    (folder / "model.json").write_text(json.dumps(card))


def test_truncated_safetensors_is_refused_even_with_a_matching_hash(saved):
    _, _, folder = saved
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    _rehash(folder)
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        load_model(folder)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_renamed_as_a_model_is_refused_without_running_it(saved, tmp_path, monkeypatch):
    _, _, folder = saved
    monkeypatch.chdir(tmp_path)
    (folder / "model.safetensors").write_bytes(pickle.dumps(_Payload()))
    _rehash(folder)
    with pytest.raises(ModelError):
        load_model(folder)
    assert not (tmp_path / "PWNED").exists()


def test_pickle_as_training_checkpoint_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "checkpoint.pt"
    torch.save({"x": _Payload()}, path)
    with pytest.raises(ModelError, match="not a valid catalog-tagger checkpoint"):
        load_training_state(path)
    assert not (tmp_path / "PWNED").exists()


def test_card_from_another_class_list_is_refused_where_classes_are_expected(tmp_path):
    model = build_model(ModelConfig(classes=("shoe", "bag"), widths=(8,), stem_width=8))
    save_model(model, {"name": "two"}, tmp_path / "model.safetensors")
    with pytest.raises(ModelError, match="do not begin with the expected"):
        load_model(tmp_path, expected_classes=ModelConfig().classes)


def test_weights_of_another_shape_are_refused(saved, tmp_path):
    _, _, folder = saved
    card = json.loads((folder / "model.json").read_text())
    card["model_config"]["widths"] = [8, 32]
    (folder / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="do not fit the card"):
        load_model(folder)


def test_missing_card_is_a_clear_error(saved):
    _, _, folder = saved
    (folder / "model.json").unlink()
    with pytest.raises(ModelError, match="card not found"):
        load_model(folder / "model.safetensors")


def test_a_card_whose_class_list_does_not_fit_the_weights_is_refused(saved):
    _, _, folder = saved
    card = json.loads((folder / "model.json").read_text())
    card["model_config"]["classes"] = card["classes"] = ["shoe", "bag", "hat"]  # weights have 10 outputs
    (folder / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="do not fit the card"):
        load_model(folder)


def _detector(dim: int, classes: int = 10) -> dict:
    eye = np.eye(dim)
    return Detector("relative_mahalanobis", 50.0, 0.1, 0.8, 3.0, FeatureGaussian(np.zeros((classes, dim)), eye),
                    FeatureGaussian(np.zeros((1, dim)), eye), "by hand", min_grain=0.02).to_dict()


def _with_card_entry(folder, key, value):
    card = json.loads((folder / "model.json").read_text())
    card[key] = value
    (folder / "model.json").write_text(json.dumps(card))


def test_the_out_of_scope_detector_travels_in_the_card_and_names_the_model(saved):
    _, _, folder = saved
    plain = load_model(folder)
    assert plain.detector is None and "+oos:" not in plain.ident  # no detector: every photo gets a class
    _with_card_entry(folder, "out_of_scope", _detector(16))
    loaded = load_model(folder)
    assert loaded.detector is not None and loaded.detector.threshold == 50.0
    # rows tagged with and without the detector must not count as the same model for --incremental
    assert loaded.ident.startswith(plain.ident) and "+oos:" in loaded.ident


def test_rows_converted_by_another_version_of_the_conversion_name_another_model(saved, monkeypatch):
    # An upgrade that changes the conversion changes what the same weights see: --incremental
    # and resume must not carry rows of the old conversion over.
    from catalog_tagger import preprocess

    _, _, folder = saved
    before = load_model(folder).ident
    monkeypatch.setitem(preprocess.PREPROCESSING, "version", preprocess.PREPROCESSING["version"] + 1)
    assert load_model(folder).ident != before


@pytest.mark.parametrize("entry, message", [
    (_detector(8), "does not fit the model"),               # features of another network (16 here)
    (_detector(16, classes=3), "does not fit the model"),   # statistics of another class list
    ({**_detector(16), "threshold": None}, "invalid out_of_scope"),
    ({**_detector(16), "ink_high": 1.5}, "invalid out_of_scope"),
    ({"method": "energy"}, "invalid out_of_scope"),
    ("on", "invalid out_of_scope"),
])
def test_a_card_whose_detector_tagging_could_not_use_is_refused(saved, entry, message):
    _, _, folder = saved
    _with_card_entry(folder, "out_of_scope", entry)
    with pytest.raises(ModelError, match=message):
        load_model(folder)
