import numpy as np
import pytest

from catalog_tagger.data import fashion_mnist as fm
from catalog_tagger.errors import DataError


@pytest.fixture()
def no_default_places(monkeypatch, tmp_path):
    """Point the cache and the Debian folder at empty places and make downloads fail fast."""
    monkeypatch.delenv(fm.ENV_VAR, raising=False)
    monkeypatch.setattr(fm, "cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setattr(fm, "MIRRORS", ("http://127.0.0.1:9/",))


def test_data_dir_wins_over_environment(tiny_data_dir, tmp_path, monkeypatch, no_default_places):
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path / "elsewhere"))
    assert fm.locate(tiny_data_dir) == tiny_data_dir


def test_environment_variable_is_used(tiny_data_dir, monkeypatch, no_default_places):
    monkeypatch.setenv(fm.ENV_VAR, str(tiny_data_dir))
    assert fm.locate() == tiny_data_dir


def test_missing_data_names_every_place_tried_and_the_fix(tmp_path, no_default_places):
    with pytest.raises(DataError) as err:
        fm.locate(tmp_path / "nowhere")
    message = str(err.value)
    for place in ("--data-dir", "user cache", "dataset-fashion-mnist", "download from the official mirrors"):
        assert place in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_download_failure_is_reported_not_raised(tmp_path):
    problems = fm.download(tmp_path, mirrors=("http://127.0.0.1:9/",), timeout=2.0)
    assert problems and "127.0.0.1" in problems[0]
    assert not list(tmp_path.glob("*.gz"))


def test_labels_and_images_must_agree(tmp_path, tiny_data_dir):
    import shutil

    from catalog_tagger.data.idx import write_idx

    for f in tiny_data_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(7, dtype=np.uint8))
    with pytest.raises(DataError, match="300 test images but 7 labels"):
        fm.load_split("test", tmp_path, allow_download=False)


def test_split_is_seeded_disjoint_and_complete():
    train, val = fm.train_val_indices(1000, 100, seed=3)
    again, _ = fm.train_val_indices(1000, 100, seed=3)
    other, _ = fm.train_val_indices(1000, 100, seed=4)
    assert len(val) == 100 and len(train) == 900
    assert not set(train) & set(val)
    assert sorted(np.concatenate([train, val])) == list(range(1000))
    np.testing.assert_array_equal(train, again)
    assert not np.array_equal(train, other)


def test_real_data_is_the_official_release(fmnist_test):
    assert fmnist_test.images.shape == (10000, 28, 28)
    assert np.bincount(fmnist_test.labels).tolist() == [1000] * 10
    assert fmnist_test.checksums == {k: v for k, v in fm.CONTENT_SHA256.items() if k.startswith("t10k")}
