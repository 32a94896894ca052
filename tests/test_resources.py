"""Resources stay bounded: catalog size does not grow memory or open files; a huge photo
is decoded at reduced size or refused, never decoded whole."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from catalog_tagger.synth import render_catalog_photo

# Runs in a fresh interpreter so that its peak memory is the tagging run's alone.
PROBE = """
import json, os, resource, sys
from pathlib import Path
from catalog_tagger.config import TagConfig
from catalog_tagger.run import run_tagging
fds_before = len(os.listdir("/proc/self/fd"))
summary = run_tagging(TagConfig(source=Path(sys.argv[1]), out=Path(sys.argv[2]), workers=int(sys.argv[3]),
                                shard_size=2048), progress=False)
print(json.dumps({"rows": summary.total, "ok": summary.by_status.get("ok", 0),
                  "too_large": summary.by_status.get("too_large", 0),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "fds_grew": len(os.listdir("/proc/self/fd")) - fds_before}))
"""


def _probe(folder: Path, out: Path, workers: int = 0) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, str(folder), str(out), str(workers)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _folder_of(n: int, root: Path, photo: bytes) -> Path:
    root.mkdir()
    for i in range(n):
        (root / f"img-{i:06d}.jpg").write_bytes(photo)
    return root


@pytest.fixture(scope="module")
def small_photo(fmnist_test) -> bytes:
    import io

    buffer = io.BytesIO()
    render_catalog_photo(fmnist_test.images[0], 2, canvas=(60, 80)).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def test_memory_and_open_files_do_not_grow_with_the_catalog(tmp_path, small_photo):
    small = _probe(_folder_of(5_000, tmp_path / "small", small_photo), tmp_path / "small.parquet")
    large = _probe(_folder_of(50_000, tmp_path / "large", small_photo), tmp_path / "large.parquet")
    print("memory probe", small, large)
    assert (small["rows"], large["rows"]) == (5_000, 50_000)
    assert large["peak_rss_mb"] <= 1.2 * small["peak_rss_mb"], (small, large)
    assert small["fds_grew"] <= 1 and large["fds_grew"] <= 1


def test_a_20000_pixel_square_photo_is_decoded_small_or_refused(tmp_path, small_photo):
    baseline = _probe(_folder_of(1, tmp_path / "normal", small_photo), tmp_path / "normal.parquet")
    folder = tmp_path / "huge"
    folder.mkdir()
    # Made in a child process so that the 400 MB canvas is not counted anywhere here.
    subprocess.run([sys.executable, "-c", (
        "from PIL import Image, ImageDraw\n"
        "img = Image.new('L', (20000, 20000), 255)\n"
        "ImageDraw.Draw(img).rectangle((6000, 3000, 14000, 17000), fill=40)\n"
        f"img.save({str(folder / 'huge.jpg')!r}, quality=80)\n"
        f"img.convert('1').save({str(folder / 'huge.png')!r})\n")], check=True)
    result = _probe(folder, tmp_path / "huge.parquet")  # decoded in the measured process itself
    print("huge probe", baseline, result)
    assert result["rows"] == 2
    # The JPEG decodes at 1/8 scale (2500x2500); the PNG would need 400 M pixels and is refused.
    assert result["ok"] == 1 and result["too_large"] == 1
    # Decoding either whole would take at least 400 MB more than tagging one small photo.
    assert result["peak_rss_mb"] - baseline["peak_rss_mb"] < 150
