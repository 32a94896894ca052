"""One test per kind of bad input: each becomes a status, never an exception."""

import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from catalog_tagger.decode import decode_file
from catalog_tagger.model import ModelConfig
from catalog_tagger.synth import render_catalog_photo

CONFIG = ModelConfig()
LIMIT = 50_000_000


def _photo_bytes(fmt: str) -> bytes:
    buffer = io.BytesIO()
    item = np.zeros((28, 28), np.uint8)
    item[4:24, 8:20] = 220
    render_catalog_photo(item, 10).save(buffer, fmt)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG that declares huge dimensions: its IDAT is a few bytes of zlib."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + _png_chunk(b"IEND", b""))


CASES = {
    "missing": (None, "missing"),
    "zero-byte": (b"", "empty"),
    "truncated-jpeg": (_photo_bytes("JPEG")[:400], "unreadable"),
    "truncated-png": (_photo_bytes("PNG")[:200], "unreadable"),
    "corrupt-jpeg-body": (_photo_bytes("JPEG")[:200] + b"\xff\xd9", "unreadable"),
    "text-named-jpg": (b"<html><body>Access denied</body></html>\n", "unreadable"),
    "random-bytes": (bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)), "unreadable"),
    "bomb-png": (_bomb_png(60000, 60000), "too_large"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_files_become_a_status_with_a_message(tmp_path, case):
    payload, status = CASES[case]
    path = tmp_path / f"{case}.jpg"
    if payload is not None:
        path.write_bytes(payload)
    result = decode_file(str(path), CONFIG, LIMIT)
    assert result.status == status
    assert result.error and result.array is None


def test_unsupported_format_is_named(tmp_path):
    path = tmp_path / "icon.jpg"
    Image.new("RGB", (32, 32), "white").save(path, "ICO")
    result = decode_file(str(path), CONFIG, LIMIT)
    assert result.status == "unsupported" and "ICO" in result.error


def test_a_fifo_named_like_an_image_is_not_read(tmp_path):
    path = tmp_path / "pipe.jpg"
    os.mkfifo(path)
    result = decode_file(str(path), CONFIG, LIMIT)  # reading it would block forever
    assert result.status == "unsupported"


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_bomb_png(20000, 20000))
    result = decode_file(str(path), CONFIG, LIMIT)
    assert result.status == "too_large" and "20000x20000" in result.error
    assert (result.width, result.height) == (20000, 20000)


def test_unreadable_permissions(tmp_path, monkeypatch):
    path = tmp_path / "secret.jpg"
    path.write_bytes(_photo_bytes("JPEG"))
    path.chmod(0)
    if os.geteuid() == 0:
        # root reads any file, so make open() fail the way the kernel does for everyone else.
        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(Image, "open", denied)
    result = decode_file(str(path), CONFIG, LIMIT)
    assert result.status == "unreadable" and "permission denied" in result.error


def test_good_files_of_every_supported_format_decode(tmp_path):
    for fmt, suffix in [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("GIF", "gif"),
                        ("BMP", "bmp"), ("TIFF", "tif")]:
        path = tmp_path / f"ok.{suffix}"
        path.write_bytes(_photo_bytes(fmt))
        result = decode_file(str(path), CONFIG, LIMIT)
        assert result.status == "ok", (fmt, result.error)
        assert result.array.shape == (1, 28, 28)
        assert result.file_size == path.stat().st_size


def test_a_file_that_decodes_too_long_is_cut_off(tmp_path, monkeypatch):
    path = tmp_path / "slow.png"
    path.write_bytes(_photo_bytes("PNG"))
    import time as _time

    original = Image.Image.load

    def crawl(self):  # as a hostile file would: a decoder that keeps going, block after block
        while True:
            _time.sleep(0.01)

    monkeypatch.setattr(Image.Image, "load", crawl)
    start = _time.monotonic()
    result = decode_file(str(path), CONFIG, LIMIT, time_limit_s=0.3)
    assert result.status == "unreadable" and "longer than the 0.3 s limit" in result.error
    assert _time.monotonic() - start < 3
    monkeypatch.setattr(Image.Image, "load", original)
    assert decode_file(str(path), CONFIG, LIMIT, time_limit_s=0.3).status == "ok"


def test_a_colour_jpeg_gives_the_model_exactly_the_grey_a_grey_decode_gives(tmp_path):
    # A JPEG is decoded as YCbCr so that a cluttered photo's cutout can use its colours; a
    # plain photo must still convert bit for bit from the grey plane libjpeg gives.
    from catalog_tagger.preprocess import to_model_array

    rng = np.random.default_rng(2)
    item = np.zeros((28, 28), np.uint8)
    item[3:25, 6:22] = rng.integers(60, 255, (22, 16))
    grey = np.asarray(render_catalog_photo(item, 20, canvas=(600, 800)).convert("L"), np.float32)
    tint = np.array([1.0, 0.8, 0.55])  # a brown garment on white
    photo = 255 - (255 - grey[..., None]) * tint
    path = tmp_path / "colour.jpg"
    Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8), "RGB").save(path, quality=90)
    with Image.open(path) as img:
        img.draft("L", (4 * CONFIG.input_size,) * 2)
        want = to_model_array(img, CONFIG)
    assert (decode_file(str(path), CONFIG, LIMIT).array == want).all()


# --- learn's jittered views (photo_jitter.py) -------------------------------------------------

def _item_photo(path, mode: str) -> None:
    item = np.zeros((28, 28), np.uint8)
    item[4:24, 8:20] = 200
    photo = render_catalog_photo(item, 12).convert("RGB")
    if mode == "RGBA":  # a cut-out: the item on a transparent backdrop
        alpha = Image.fromarray(np.where(np.asarray(photo.convert("L")) < 250, 255, 0).astype(np.uint8), "L")
        photo.putalpha(alpha)
    elif mode != "RGB":
        photo = photo.convert(mode)
    photo.save(path)


@pytest.mark.parametrize("name,mode", [("photo.jpg", "RGB"), ("grey.png", "L"), ("palette.png", "P"),
                                       ("cutout.png", "RGBA"), ("sixteen.png", "I;16")])
def test_jittered_view_is_another_conversion_of_the_same_item(tmp_path, name, mode):
    path = str(tmp_path / name)
    _item_photo(path, mode)
    plain = decode_file(path, CONFIG, LIMIT).array
    views = [decode_file(path, CONFIG, LIMIT, jitter=(0, i)).array for i in range(6)]
    assert all(v.shape == plain.shape and v.dtype == np.uint8 for v in views)
    # Reproducible from its seed, different from the plain conversion and from each other.
    assert (decode_file(path, CONFIG, LIMIT, jitter=(0, 3)).array == views[3]).all()
    assert all((v != plain).any() for v in views)
    assert len({v.tobytes() for v in views}) == len(views)
    # Still the same item: light on black, and most of its ink where the plain one has it.
    for v in views:
        assert (v < 30).mean() > 0.3 and v.max() > 150
        overlap = ((v[0] > 60) & (plain[0] > 60)).sum() / max(1, (plain[0] > 60).sum())
        assert overlap > 0.6, overlap
