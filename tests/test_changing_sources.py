"""What a nightly run meets in the wild: folders that change between runs, file names that
are not UTF-8, linked and unreadable folders, failures that pass, manifests with nested
columns. Every image keeps exactly one row."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalog_tagger import run as run_module
from catalog_tagger import sources

from .conftest import SAMPLE

VOLATILE = ["run_id", "tagged_at"]
IMAGES = SAMPLE / "images"


@pytest.fixture()
def folder(tmp_path) -> Path:
    """Ten of the sample catalog's photos in a folder of their own."""
    work = tmp_path / "catalog"
    work.mkdir()
    for path in sorted(IMAGES.glob("sku-1000*"))[:5] + sorted(IMAGES.glob("sku-1001*"))[:5]:
        shutil.copy(path, work / path.name)
    return work


def _tag(run_cli, source, out, *extra):
    return run_cli("-q", "tag", source, "--out", out, "--workers", "0", *extra)


def _rows(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path).drop(columns=VOLATILE)


def _summary(out: Path) -> dict:
    return json.loads(out.with_name(out.name + ".summary.json").read_text())


def _interrupt_at_the_third_shard(run_cli, folder: Path, out: Path, monkeypatch) -> None:
    """Run with shards of 2 and stop (as Ctrl-C does) before the third shard is committed."""
    real_commit = run_module._commit_tagged
    calls = []

    def stop_at_the_third_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_commit(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(run_module, "_commit_tagged", stop_at_the_third_shard)
        assert _tag(run_cli, folder, out, "--shard-size", "2").exit_code == 130


def test_resume_after_the_folder_changed_neither_drops_nor_repeats_a_row(run_cli, folder, tmp_path, monkeypatch):
    out = tmp_path / "t.parquet"
    _interrupt_at_the_third_shard(run_cli, folder, out, monkeypatch)
    # Before the resume: a file that sorts first shifts every record by one, and a file of
    # the second shard is replaced by another photo.
    shutil.copy(folder / "sku-10013.jpg", folder / "aaa-new.jpg")
    replaced = folder / "sku-10004.jpg"
    shutil.copy(folder / "sku-10011.jpg", replaced)
    os.utime(replaced, (time.time() + 5, time.time() + 5))

    assert _tag(run_cli, folder, out, "--shard-size", "2", "--resume").exit_code == 0
    reference = tmp_path / "ref.parquet"
    assert _tag(run_cli, folder, reference, "--shard-size", "2").exit_code == 0
    resumed = _rows(out)
    assert resumed["image_id"].is_unique and len(resumed) == 11
    pd.testing.assert_frame_equal(resumed, _rows(reference))


def test_resume_reuses_the_shards_of_an_unchanged_folder(run_cli, folder, tmp_path, monkeypatch):
    out = tmp_path / "t.parquet"
    _interrupt_at_the_third_shard(run_cli, folder, out, monkeypatch)
    assert _tag(run_cli, folder, out, "--shard-size", "2", "--resume").exit_code == 0
    assert _summary(out)["resumed_rows"] == 4


def test_a_file_name_that_is_not_utf8_gets_its_row(run_cli, folder, tmp_path):
    latin1 = os.fsdecode(b"pull-caf\xe9.jpg")  # as copied from an old Windows share
    shutil.copy(folder / "sku-10001.jpg", folder / latin1)
    for out in (tmp_path / "t.parquet", tmp_path / "t.csv"):
        result = _tag(run_cli, folder, out)
        assert result.exit_code == 0, result.output
        rows = pd.read_parquet(out) if out.suffix == ".parquet" else pd.read_csv(out)
        assert len(rows) == 11
        row = rows.set_index("image_id").loc["pull-caf\\xe9.jpg"]
        assert row["status"] == "ok" and row["path"].endswith("pull-caf\\xe9.jpg")
    # --incremental recognises it the next night instead of tagging it again.
    again = tmp_path / "again.parquet"
    assert _tag(run_cli, folder, again, "--incremental", tmp_path / "t.parquet").exit_code == 0
    assert _summary(again)["processed"] == 0


def _refuse_listing(monkeypatch, refused: Path) -> None:
    """Make listing ``refused`` fail as a folder without read permission does (tests run as root)."""
    real_scandir = os.scandir

    def scandir(path):
        if isinstance(path, (str, Path)) and os.path.abspath(path) == str(refused):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(sources.os, "scandir", scandir)


def test_an_unreadable_source_folder_is_an_error_not_an_empty_output(run_cli, folder, tmp_path, monkeypatch):
    out = tmp_path / "t.csv"
    _refuse_listing(monkeypatch, folder)
    result = _tag(run_cli, folder, out)
    assert result.exit_code == 5 and "cannot read folder" in result.output and "Permission denied" in result.output
    assert not out.exists()


def test_an_unreadable_sub_folder_becomes_an_unreadable_row(run_cli, folder, tmp_path, monkeypatch):
    (folder / "brand-b").mkdir()
    shutil.copy(folder / "sku-10001.jpg", folder / "brand-b" / "x.jpg")
    _refuse_listing(monkeypatch, folder / "brand-b")
    out = tmp_path / "t.parquet"
    assert _tag(run_cli, folder, out).exit_code == 0
    rows = pd.read_parquet(out).set_index("image_id")
    assert len(rows) == 11
    assert rows.loc["brand-b", "status"] == "unreadable" and "cannot list folder" in rows.loc["brand-b", "error"]


def test_linked_folders_are_followed_and_a_link_loop_is_not(run_cli, folder, tmp_path):
    brand = tmp_path / "brand-a"
    brand.mkdir()
    shutil.copy(folder / "sku-10001.jpg", brand / "linked.jpg")
    (folder / "brand-a").symlink_to(brand, target_is_directory=True)
    (brand / "back-up").symlink_to(folder, target_is_directory=True)  # a loop through the link
    out = tmp_path / "t.parquet"
    assert _tag(run_cli, folder, out).exit_code == 0
    ids = pd.read_parquet(out)["image_id"].tolist()
    assert ids[0] == "brand-a/linked.jpg" and len(ids) == 11


def test_incremental_tries_failures_again(run_cli, folder, tmp_path):
    first, second = tmp_path / "first.parquet", tmp_path / "second.parquet"
    assert _tag(run_cli, folder, first, "--max-pixels", "1000").exit_code == 0
    assert set(pd.read_parquet(first)["status"]) == {"too_large"}
    assert _tag(run_cli, folder, second, "--incremental", first).exit_code == 0
    assert _summary(second)["processed"] == 10
    assert set(pd.read_parquet(second)["status"]) == {"ok"}


def test_incremental_rows_follow_todays_review_threshold_and_top_k(run_cli, folder, tmp_path):
    first, second = tmp_path / "first.parquet", tmp_path / "second.parquet"
    assert _tag(run_cli, folder, first).exit_code == 0
    assert _tag(run_cli, folder, second, "--incremental", first, "--review-threshold", "0.9999",
                "--top-k", "2").exit_code == 0
    assert _summary(second)["carried_over"] == 10
    rows = pd.read_parquet(second)
    assert rows["needs_review"].all()
    assert set(rows["topk_labels"].map(len)) == {2} and set(rows["topk_scores"].map(len)) == {2}


def test_csv_holds_a_manifests_nested_columns_as_json_and_dates_as_plain_seconds(run_cli, folder, tmp_path):
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({
        "sku": ["A1", "A2"],
        "path": [str(folder / "sku-10001.jpg"), str(folder / "sku-10002.png")],
        "colors": [["navy", "écru"], None],
        "dims": [{"w": 30, "h": 40}, {"w": 1, "h": 2}],
        "thumb": [b"\x00\xff", None],
    }), manifest)
    out = tmp_path / "t.csv"
    result = run_cli("-q", "tag", manifest, "--id-col", "sku", "--out", out, "--workers", "0")
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(out, keep_default_na=False, dtype=str).set_index("image_id")
    assert json.loads(rows.loc["A1", "colors"]) == ["navy", "écru"] and rows.loc["A2", "colors"] == ""
    assert json.loads(rows.loc["A2", "dims"]) == {"w": 1, "h": 2}
    assert rows.loc["A1", "thumb"] == "00ff"
    for column in ("mtime", "tagged_at"):
        assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", v) for v in rows[column]), rows[column]
