"""Durability at volume: random kills, full disks, kills during the final write."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from catalog_tagger.synth import render_catalog_photo

VOLATILE = ["run_id", "tagged_at"]
TRIALS = int(os.environ.get("CATALOG_TAGGER_KILL_TRIALS", "20"))


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, fmnist_test) -> Path:
    root = tmp_path_factory.mktemp("kill-catalog")
    for i in range(48):
        render_catalog_photo(fmnist_test.images[i], 6, canvas=(200, 240)).save(root / f"p{i:03d}.jpg", quality=90)
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    return root


def _cmd(*args) -> list[str]:
    return [sys.executable, "-m", "catalog_tagger", "-q", "tag", *map(str, args)]


def _rows(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path).drop(columns=VOLATILE)


@pytest.fixture(scope="module")
def reference(catalog, tmp_path_factory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("ref") / "ref.parquet"
    subprocess.run(_cmd(catalog, "--out", out, "--workers", "0"), check=True)
    return _rows(out)


def _kill_after(proc: subprocess.Popen, parts: Path, finished_shards: int, timeout: float = 300.0) -> None:
    """SIGKILL ``proc`` as soon as ``parts`` holds ``finished_shards`` shards (or it has exited)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if finished_shards == 0 or (parts.is_dir() and len(list(parts.glob("shard-*.parquet"))) >= finished_shards):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_random_sigkills_then_resume_always_equal_an_uninterrupted_run(catalog, reference, tmp_path):
    rng = random.Random(7)
    args = ("--shard-size", "4", "--batch-size", "4", "--workers", "1")
    killed_mid_run = 0
    shards = -(-len(list(catalog.iterdir())) // 4)
    for trial in range(TRIALS):
        out = tmp_path / f"t{trial}.parquet"
        proc = subprocess.Popen(_cmd(catalog, "--out", out, *args), stderr=subprocess.DEVNULL)
        # Anywhere from start-up to the final write, counted in finished shards, not seconds,
        # so the kills land inside runs on a fast machine and a slow one alike.
        _kill_after(proc, out.with_name(out.name + ".parts"), rng.randint(0, shards))
        killed_mid_run += not out.exists()
        subprocess.run(_cmd(catalog, "--out", out, *args, "--resume"), check=True)
        pd.testing.assert_frame_equal(_rows(out), reference)
        assert not out.with_name(out.name + ".parts").exists()
        assert not list(tmp_path.glob(".*.tmp"))
    assert killed_mid_run >= TRIALS // 4  # the kills really landed inside runs


def _limited(limit_bytes: int):
    def apply():
        # What a full disk does to a writer: writes past the limit fail with an error.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


def test_a_full_disk_fails_cleanly_and_keeps_the_previous_output(catalog, reference, tmp_path):
    out = tmp_path / "t.parquet"
    subprocess.run(_cmd(catalog, "--out", out, "--workers", "0"), check=True)
    before = out.read_bytes()
    # Shards are small, the final file is larger: the limit bites during the final write.
    proc = subprocess.run(_cmd(catalog, "--out", out, "--workers", "0", "--shard-size", "4"),
                          preexec_fn=_limited(len(before) // 3), capture_output=True, text=True)
    assert proc.returncode == 6, proc.stderr
    assert "cannot write" in proc.stderr and "Traceback" not in proc.stderr
    assert out.read_bytes() == before
    assert not list(tmp_path.glob(".t.parquet.*.tmp"))
    # With room again, --resume finishes the same run.
    subprocess.run(_cmd(catalog, "--out", out, "--workers", "0", "--shard-size", "4", "--resume"), check=True)
    pd.testing.assert_frame_equal(_rows(out), reference)


def test_a_disk_that_fills_while_shards_are_written_fails_cleanly_then_resumes(catalog, reference, tmp_path):
    out = tmp_path / "t.parquet"
    proc = subprocess.run(_cmd(catalog, "--out", out, "--workers", "0", "--shard-size", "4"),
                          preexec_fn=_limited(4_000), capture_output=True, text=True)
    assert proc.returncode == 6 and "--resume" in proc.stderr, proc.stderr
    assert "shard-000000" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.rglob("*.tmp"))
    subprocess.run(_cmd(catalog, "--out", out, "--workers", "0", "--shard-size", "4", "--resume"), check=True)
    pd.testing.assert_frame_equal(_rows(out), reference)


def test_kill_during_the_final_write_leaves_old_output_and_no_debris(catalog, reference, tmp_path):
    out = tmp_path / "t.parquet"
    subprocess.run(_cmd(catalog, "--out", out, "--workers", "0"), check=True)
    before = out.read_bytes()
    # A killed final write leaves its temporary file behind; the next run must clear it.
    (tmp_path / ".t.parquet.99999.tmp").write_bytes(before[: len(before) // 2])
    subprocess.run(_cmd(catalog, "--out", out, "--workers", "0"), check=True)
    assert not list(tmp_path.glob(".t.parquet.*.tmp"))
    pd.testing.assert_frame_equal(_rows(out), reference)
    summary = json.loads((tmp_path / "t.parquet.summary.json").read_text())
    assert summary["total"] == 49
