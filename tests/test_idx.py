import gzip

import numpy as np
import pytest

from catalog_tagger.data.idx import read_idx, read_idx_bytes, write_idx
from catalog_tagger.errors import DataError


@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
def test_write_then_read_round_trips(tmp_path, name):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / name, array)
    np.testing.assert_array_equal(read_idx(tmp_path / name), array)


def test_gzip_is_detected_from_content_not_name(tmp_path):
    array = np.ones((5,), dtype=np.uint8)
    write_idx(tmp_path / "labels-idx1-ubyte", array, compress=True)
    np.testing.assert_array_equal(read_idx(tmp_path / "labels-idx1-ubyte"), array)


def _valid_bytes() -> bytes:
    return bytes([0, 0, 0x08, 2]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(range(6))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"<html>", "magic"),
        (b"\x00", "too short"),
        (bytes([0, 0, 0x42, 1]) + (1).to_bytes(4, "big") + b"\x00", "unknown IDX data type"),
        (bytes([0, 0, 0x08, 3]) + (1).to_bytes(4, "big"), "truncated header"),
        (_valid_bytes()[:-1], "truncated"),
        (_valid_bytes() + b"\x00", "trailing bytes"),
    ],
)
def test_corrupt_payloads_say_what_is_wrong(payload, message):
    with pytest.raises(DataError, match=message):
        read_idx_bytes(payload, "f")


def test_corrupt_gzip_is_reported_with_the_file_name(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(_valid_bytes())[:-8])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: corrupt or truncated gzip"):
        read_idx(path)


def test_big_endian_values_are_decoded(tmp_path):
    array = np.array([1, 256, -3], dtype=np.int32)
    write_idx(tmp_path / "ints", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "ints"), array)
