"""Bad files at volume: seeded mutations of valid images in every supported format.

Every case must end as exactly one row with a status (an `ok` label or an error status):
no crash, no hang, no lost or duplicated row. CATALOG_TAGGER_FUZZ_CASES raises the count
for a longer run (the benchmark-sized run is 50,000).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pandas as pd

from catalog_tagger.decode import STATUSES
from catalog_tagger.schema import OUT_OF_SCOPE
from catalog_tagger.synth import render_catalog_photo

FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}
EXTENSIONS = list(FORMATS.values())
CASES = int(os.environ.get("CATALOG_TAGGER_FUZZ_CASES", "5000"))


def _bases() -> dict[str, bytes]:
    item = np.zeros((28, 28), np.uint8)
    item[3:25, 6:22] = np.linspace(90, 240, 16, dtype=np.uint8)[None, :]
    photo = render_catalog_photo(item, 3, canvas=(96, 120), noise=2.0)
    out = {}
    for fmt in FORMATS:
        buffer = io.BytesIO()
        photo.save(buffer, fmt)
        out[fmt] = buffer.getvalue()
    return out


def mutate(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """One seeded corruption of ``data``; returns the new bytes and the kind of change."""
    b = bytearray(data)
    kind = rng.choice(["flip", "truncate", "delete", "duplicate", "header", "zero", "append", "none"])
    n = len(b)
    if kind == "flip":
        for i in rng.integers(0, n, rng.integers(1, 20)):
            b[i] ^= 1 << int(rng.integers(0, 8))
    elif kind == "truncate":
        b = b[: int(rng.integers(0, n))]
    elif kind in ("delete", "duplicate", "zero"):
        start = int(rng.integers(0, n))
        length = int(rng.integers(1, max(2, n // 4)))
        chunk = b[start : start + length]
        if kind == "delete":
            del b[start : start + length]
        elif kind == "duplicate":
            b[start:start] = chunk
        else:
            b[start : start + length] = bytes(len(chunk))
    elif kind == "header":
        for i in range(min(n, 32)):
            if rng.random() < 0.3:
                b[i] = int(rng.integers(0, 256))
    elif kind == "append":
        b += rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes()
    return bytes(b), str(kind)


def test_thousands_of_mutated_files_each_get_exactly_one_row(tmp_path):
    bases = _bases()
    rng = np.random.default_rng(20261123)
    folder = tmp_path / "fuzz"
    folder.mkdir()
    names = []
    for i in range(CASES):
        fmt = list(FORMATS)[i % len(FORMATS)]
        data, _ = mutate(bases[fmt], rng)
        # One case in five carries the wrong extension.
        ext = FORMATS[fmt] if rng.random() > 0.2 else EXTENSIONS[int(rng.integers(0, len(EXTENSIONS)))]
        name = f"case-{i:06d}.{ext}"
        (folder / name).write_bytes(data)
        names.append(name)
    out = tmp_path / "fuzz.parquet"
    # A real subprocess: a crash of any kind (even a segfault in a decoder) would show here.
    proc = subprocess.run([sys.executable, "-m", "catalog_tagger", "-q", "tag", str(folder), "--out", str(out),
                           "--workers", "2", "--time-limit", "10", "--shard-size", "1000"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = pd.read_parquet(out)
    assert rows["image_id"].tolist() == sorted(names)  # none lost, none duplicated, in order
    assert set(rows["status"]) <= set(STATUSES) | {OUT_OF_SCOPE}  # a decodable oddity may be out of scope
    failed = rows[rows["status"] != "ok"]
    assert failed["error"].notna().all() and failed["label"].isna().all()
    ok = rows[rows["status"] == "ok"]
    assert ok["label"].notna().all() and (ok["confidence"] > 0).all()
    # The mix must really exercise both sides: plenty of survivors and plenty of failures.
    assert len(ok) > CASES * 0.1 and len(failed) > CASES * 0.1
