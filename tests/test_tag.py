"""`catalog-tagger tag` end to end: rows, order, schema, formats, errors, durability."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from catalog_tagger.checkpoint import load_model
from catalog_tagger.schema import OUTPUT_COLUMNS
from catalog_tagger.synth import render_catalog_photo
from catalog_tagger.tagging import even_batch_size, worker_loads
from catalog_tagger.writers import WRITERS

from .conftest import SAMPLE

VOLATILE = ["run_id", "tagged_at"]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, fmnist_test) -> Path:
    """60 product photos in nested folders, plus a hidden file and a non-image."""
    root = tmp_path_factory.mktemp("catalog")
    for i in range(60):
        folder = root / ("tops" if i % 3 else "misc/sub")
        folder.mkdir(parents=True, exist_ok=True)
        render_catalog_photo(fmnist_test.images[i], 8, canvas=(260, 300)).save(folder / f"item-{i:03d}.jpg", quality=90)
    (root / ".hidden.jpg").write_bytes((root / "tops" / "item-001.jpg").read_bytes())
    (root / "notes.txt").write_text("not an image")
    return root


def _tag(run_cli, source, out, *extra):
    return run_cli("-q", "tag", source, "--out", out, "--workers", "0", *extra)


def _rows(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, keep_default_na=False)


def test_sample_catalog_gets_one_row_per_file_in_order_with_statuses(run_cli, tmp_path):
    out = tmp_path / "tags.parquet"
    result = _tag(run_cli, SAMPLE, out)
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    files = sorted(p.relative_to(SAMPLE).as_posix() for p in SAMPLE.rglob("*")
                   if p.suffix.lower() in (".jpg", ".png", ".webp", ".gif"))
    assert rows["image_id"].tolist() == files
    status = dict(zip(rows["image_id"], rows["status"]))
    assert status["images/broken/empty.png"] == "empty"
    assert status["images/broken/not-an-image.jpg"] == "unreadable"
    assert status["images/broken/truncated.jpg"] == "unreadable"
    assert list(rows.columns) == list(OUTPUT_COLUMNS)
    truth = pd.read_csv(SAMPLE / "labels.csv")
    merged = truth.merge(rows, left_on="path", right_on="image_id")
    assert len(merged) == 40 and (merged["status"] == "ok").all()
    accuracy = (merged["label_name"] == merged["label"]).mean()
    assert accuracy >= 0.8, merged[merged["label_name"] != merged["label"]][["path", "label_name", "label", "storage"]]
    summary = json.loads((tmp_path / "tags.parquet.summary.json").read_text())
    assert summary["total"] == 43 and summary["by_status"] == {"empty": 1, "ok": 40, "unreadable": 2}


def test_folder_walk_is_recursive_sorted_and_skips_hidden_and_other_files(run_cli, catalog, tmp_path):
    out = tmp_path / "t.parquet"
    assert _tag(run_cli, catalog, out).exit_code == 0
    ids = _rows(out)["image_id"].tolist()
    assert len(ids) == 60 and ids == sorted(ids)
    assert not any(i.startswith(".") or i.endswith(".txt") for i in ids)
    assert ids[0].startswith("misc/sub/")


def test_ext_option_selects_extensions(run_cli, tmp_path):
    out = tmp_path / "t.parquet"
    assert _tag(run_cli, SAMPLE, out, "--ext", "webp").exit_code == 0
    assert set(_rows(out)["image_id"].str.rsplit(".", n=1).str[-1]) == {"webp"}


def test_manifest_passes_columns_through_and_resolves_paths_against_its_folder(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths must not depend on the working directory
    out = tmp_path / "m.parquet"
    result = _tag(run_cli, SAMPLE / "manifest.csv", out, "--id-col", "sku")
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    manifest = pd.read_csv(SAMPLE / "manifest.csv", dtype=str)
    assert rows["image_id"].tolist() == manifest["sku"].tolist()
    assert rows["title"].tolist() == manifest["title"].tolist()
    assert rows["price_eur"].tolist() == manifest["price_eur"].tolist()  # text, exactly as written
    by_sku = rows.set_index("image_id")
    assert by_sku.loc["SKU-90002", "status"] == "missing"
    assert by_sku.loc["SKU-90001", "status"] == "unreadable"
    assert (by_sku.drop(["SKU-90001", "SKU-90002"])["status"] == "ok").all()
    assert list(rows.columns) == list(OUTPUT_COLUMNS) + ["title", "price_eur"]


def test_parquet_manifest_keeps_its_column_types_and_clashing_names_are_prefixed(run_cli, tmp_path):
    manifest = pd.DataFrame({"file": [str(p) for p in sorted((SAMPLE / "images").glob("*.png"))][:3],
                             "stock": [5, 0, 12], "label": ["ours", "ours", "theirs"]})
    manifest.to_parquet(tmp_path / "m.parquet")
    out = tmp_path / "out.parquet"
    assert _tag(run_cli, tmp_path / "m.parquet", out, "--path-col", "file").exit_code == 0
    table = pq.read_table(out)
    assert str(table.schema.field("stock").type) == "int64"
    assert table["manifest_label"].to_pylist() == ["ours", "ours", "theirs"]
    assert table["image_id"].to_pylist() == manifest["file"].tolist()


def test_csv_output_flattens_lists_and_opens_as_a_plain_table(run_cli, tmp_path):
    out = tmp_path / "tags.csv"
    assert _tag(run_cli, SAMPLE / "manifest.csv", out, "--top-k", "3").exit_code == 0
    with open(out, encoding="utf-8", newline="") as fh:
        records = list(csv.reader(fh))
    header, body = records[0], records[1:]
    assert len(body) == 42  # quoted commas in titles did not split or merge rows
    for name in ("label", "confidence", "label_2", "score_2", "label_3", "score_3", "title"):
        assert name in header
    assert "topk_labels" not in header
    rows = pd.read_csv(out, keep_default_na=False)
    ok = rows[rows["status"] == "ok"]
    assert (ok["confidence"] >= ok["score_2"]).all()
    assert pd.to_datetime(rows["tagged_at"]).notna().all()


def test_parquet_has_documented_types_and_metadata(run_cli, tmp_path):
    out = tmp_path / "t.parquet"
    assert _tag(run_cli, SAMPLE, out).exit_code == 0
    table = pq.read_table(out)
    types = {f.name: str(f.type) for f in table.schema}
    assert types["label_id"] == "int16" and types["confidence"] == "float"
    assert types["topk_labels"] == "list<element: string>" and types["needs_review"] == "bool"
    assert types["width"] == "int32" and types["file_size"] == "int64"
    assert types["mtime"] == "timestamp[us, tz=UTC]"
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert meta["catalog_tagger_schema_version"] == "2"
    assert json.loads(meta["classes"])[9] == "Ankle boot"
    card = json.loads(meta["model_card"])
    assert table["model"][0].as_py() == load_model().ident
    assert table["model"][0].as_py().startswith(f"{card['name']}@sha256:{card['weights_sha256'][:12]}+cal:")


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_every_registered_format_round_trips_the_same_rows(run_cli, tmp_path, fmt):
    out = tmp_path / "tags.out"
    assert _tag(run_cli, SAMPLE, out, "--format", fmt).exit_code == 0
    rows = pd.read_parquet(out) if fmt == "parquet" else pd.read_csv(out, keep_default_na=False)
    assert len(rows) == 43 and rows["status"].value_counts()["ok"] == 40


def test_review_threshold_marks_uncertain_and_failed_rows(run_cli, tmp_path):
    out = tmp_path / "t.parquet"
    assert _tag(run_cli, SAMPLE, out, "--review-threshold", "0.9").exit_code == 0
    rows = _rows(out)
    ok = rows[rows["status"] == "ok"]
    assert (ok["needs_review"] == (ok["confidence"] < 0.9)).all()
    assert rows[rows["status"] != "ok"]["needs_review"].all()


@pytest.mark.parametrize(
    ("args", "out_name", "code", "message"),
    [
        (["/no/such/folder"], "x.parquet", 5, "source not found"),
        ([str(SAMPLE / "labels.csv"), "--path-col", "nope"], "x.parquet", 5, "no column 'nope'"),
        ([str(SAMPLE)], "tags.txt", 2, "cannot tell the output format"),
    ],
)
def test_run_level_problems_exit_before_work_with_one_clear_line(run_cli, tmp_path, args, out_name, code, message):
    result = run_cli("tag", *args, "--out", tmp_path / out_name)
    assert result.exit_code == code
    assert message in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []  # no output, summary, lock or parts folder


def test_invalid_model_exits_with_the_model_code(run_cli, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a model")
    result = run_cli("tag", SAMPLE, "--out", tmp_path / "x.parquet", "--model", bad)
    assert result.exit_code == 4 and "card not found" in result.output


def test_max_error_rate_exits_7_after_writing_the_output(run_cli, tmp_path):
    out = tmp_path / "t.parquet"
    result = run_cli("tag", SAMPLE, "--out", out, "--workers", "0", "--max-error-rate", "0.01")
    assert result.exit_code == 7
    assert "3 of 43 images failed" in result.output
    assert len(_rows(out)) == 43
    assert run_cli("-q", "tag", SAMPLE, "--out", out, "--max-error-rate", "0.1").exit_code == 0


def test_empty_folder_stops_with_exit_5_and_writes_nothing(run_cli, tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "t.parquet"
    result = _tag(run_cli, tmp_path / "empty", out)
    assert result.exit_code == 5 and "no images to tag" in result.output
    assert not out.exists() and not (tmp_path / "t.parquet.parts").exists()


def test_labels_do_not_depend_on_batch_size_or_workers(run_cli, catalog, tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    assert run_cli("-q", "tag", catalog, "--out", a, "--batch-size", "1", "--workers", "0").exit_code == 0
    assert run_cli("-q", "tag", catalog, "--out", b, "--batch-size", "7", "--workers", "2",
                   "--shard-size", "16").exit_code == 0
    ra, rb = _rows(a), _rows(b)
    assert ra["label"].tolist() == rb["label"].tolist()
    np.testing.assert_allclose(ra["confidence"], rb["confidence"], atol=1e-5)


@pytest.mark.parametrize("n, workers, expected", [(1000, 2, 250), (300, 2, 150), (4096, 2, 256), (5, 1, 256),
                                                  (257, 2, 129), (1000, 8, 125)])
def test_batches_are_even_and_dealt_evenly_to_the_workers(n, workers, expected):
    assert even_batch_size(n, 256, workers) == expected


def test_even_batches_never_exceed_the_batch_size_nor_slow_the_slowest_worker():
    for workers in (2, 3, 4, 8):
        for n in range(1, 5000, 7):
            size = even_batch_size(n, 256, workers)
            loads = worker_loads(n, size, workers)
            assert size <= 256 and sum(loads) == n
            assert max(loads) <= max(worker_loads(n, 256, workers))  # the slowest worker finishes no later


def test_incremental_run_only_tags_new_and_changed_images(run_cli, catalog, tmp_path):
    work = tmp_path / "catalog"
    shutil.copytree(catalog, work)
    first = tmp_path / "first.parquet"
    assert _tag(run_cli, work, first).exit_code == 0
    changed = work / "tops" / "item-001.jpg"
    shutil.copy(work / "tops" / "item-002.jpg", changed)
    os.utime(changed, (time.time() + 5, time.time() + 5))
    shutil.copy(work / "tops" / "item-004.jpg", work / "tops" / "new.jpg")
    second = tmp_path / "second.parquet"
    assert _tag(run_cli, work, second, "--incremental", first).exit_code == 0
    summary = json.loads((tmp_path / "second.parquet.summary.json").read_text())
    assert summary["processed"] == 2 and summary["carried_over"] == 59 and summary["total"] == 61
    old, new = _rows(first).set_index("image_id"), _rows(second).set_index("image_id")
    assert new.loc["tops/item-001.jpg", "label"] == new.loc["tops/item-002.jpg", "label"]
    unchanged = old.index.drop("tops/item-001.jpg")
    pd.testing.assert_frame_equal(old.loc[unchanged, ["label", "confidence", "run_id"]],
                                  new.loc[unchanged, ["label", "confidence", "run_id"]])


def test_a_second_run_on_the_same_output_is_refused_while_the_first_holds_the_lock(run_cli, tmp_path):
    out = tmp_path / "t.parquet"
    # POSIX locks do not conflict within one process, so the holder is another process.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"fh = open({str(tmp_path / 't.parquet.lock')!r}, 'a+')\n"
        "fcntl.lockf(fh.fileno(), fcntl.LOCK_EX)\n"
        "fh.write('pid 4242 on cron-host'); fh.flush()\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = run_cli("tag", SAMPLE, "--out", out)
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 6 and "being written by another run" in result.output
    # A lock file left behind by a dead run holds no lock: the next run simply goes ahead.
    assert (tmp_path / "t.parquet.lock").exists()
    assert _tag(run_cli, SAMPLE, out).exit_code == 0


def test_a_failed_final_write_leaves_the_previous_output_untouched(run_cli, tmp_path, monkeypatch):
    out = tmp_path / "t.parquet"
    assert _tag(run_cli, SAMPLE, out).exit_code == 0
    before = out.read_bytes()
    from catalog_tagger import writers

    def full_disk(self, table):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writers.ParquetTableWriter, "write", full_disk)
    result = _tag(run_cli, SAMPLE, out)
    assert result.exit_code == 6 and "No space left on device" in result.output
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "catalog_tagger", "-q", "tag", *map(str, args)]


def _wait_for_shards(parts: Path, count: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if parts.exists() and len(list(parts.glob("shard-*.parquet"))) >= count:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {count} shards: {proc.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError("no shards appeared")


def test_kill_9_then_resume_equals_an_uninterrupted_run(catalog, tmp_path):
    reference = tmp_path / "ref.parquet"
    subprocess.run(_cli(catalog, "--out", reference, "--shard-size", "8", "--workers", "0"), check=True)
    out = tmp_path / "t.parquet"
    args = ("--out", out, "--shard-size", "8", "--batch-size", "4", "--workers", "0")
    proc = subprocess.Popen(_cli(catalog, *args), stderr=subprocess.PIPE, text=True)
    _wait_for_shards(tmp_path / "t.parquet.parts", 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    committed = len(list((tmp_path / "t.parquet.parts").glob("shard-*.parquet")))
    subprocess.run(_cli(catalog, *args, "--resume"), check=True)
    summary = json.loads((tmp_path / "t.parquet.summary.json").read_text())
    assert summary["resumed_rows"] >= 8 * committed - 8 and summary["resumed_rows"] > 0
    pd.testing.assert_frame_equal(_rows(out).drop(columns=VOLATILE), _rows(reference).drop(columns=VOLATILE))
    assert not (tmp_path / "t.parquet.parts").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_stop_cleanly_and_say_how_to_resume(catalog, tmp_path, sig):
    out = tmp_path / "t.parquet"
    args = ("--out", out, "--shard-size", "4", "--batch-size", "2", "--workers", "0")
    # Start the child with SIGINT at its default, as a shell starts a foreground job: a
    # test run launched in the background (`&`) has SIGINT ignored, exec passes that on,
    # and Python keeps an ignored SIGINT ignored. (A handled signal resets on exec.)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(_cli(catalog, *args), stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    _wait_for_shards(tmp_path / "t.parquet.parts", 1, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    assert list((tmp_path / "t.parquet.parts").glob("shard-*.parquet"))
    assert not out.exists()


def test_a_manifest_broken_midway_keeps_finished_shards_and_says_where(run_cli, tmp_path):
    # Large enough that the parser meets the broken line only after several shards are done.
    lines = ["path,note"] + [f"photos/{i}.jpg,fine" for i in range(30000)] + ['"unterminated,quote']
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    result = run_cli("tag", tmp_path / "m.csv", "--out", tmp_path / "t.parquet", "--workers", "0",
                     "--shard-size", "1000")
    assert result.exit_code == 5 and "malformed after row" in result.output and "Traceback" not in result.output
    assert len(list((tmp_path / "t.parquet.parts").glob("shard-*.parquet"))) >= 5
    assert not (tmp_path / "t.parquet").exists()


def test_non_utf8_manifest_is_refused_clearly(run_cli, tmp_path):
    (tmp_path / "m.csv").write_bytes(b"path,title\n" + "a.jpg,Pull\xe9\n".encode("latin-1"))
    result = run_cli("tag", tmp_path / "m.csv", "--out", tmp_path / "t.parquet", "--workers", "0")
    assert result.exit_code == 5 and "Traceback" not in result.output
