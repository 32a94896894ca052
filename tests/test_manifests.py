"""Manifest edge cases: each has a defined behaviour."""

from __future__ import annotations

import pandas as pd
import pytest

from .conftest import SAMPLE

GOOD = sorted(str(p) for p in (SAMPLE / "images").glob("*.png"))[:3]


def _tag(run_cli, manifest, out, *extra):
    return run_cli("-q", "tag", manifest, "--out", out, "--workers", "0", *extra)


def test_byte_order_mark_is_ignored(run_cli, tmp_path):
    (tmp_path / "m.csv").write_bytes("\ufeffpath,sku\n".encode() + f"{GOOD[0]},A1\n".encode())
    assert _tag(run_cli, tmp_path / "m.csv", tmp_path / "t.parquet", "--id-col", "sku").exit_code == 0
    rows = pd.read_parquet(tmp_path / "t.parquet")
    assert rows["image_id"].tolist() == ["A1"] and rows["status"].tolist() == ["ok"]


def test_quoted_commas_and_newlines_stay_inside_their_field(run_cli, tmp_path):
    frame = pd.DataFrame({"path": GOOD[:2], "title": ['Shirt, "slim fit"', "two\nlines"]})
    frame.to_csv(tmp_path / "m.csv", index=False)
    assert _tag(run_cli, tmp_path / "m.csv", tmp_path / "t.parquet").exit_code == 0
    assert pd.read_parquet(tmp_path / "t.parquet")["title"].tolist() == frame["title"].tolist()


def test_empty_paths_and_duplicate_ids_keep_their_rows(run_cli, tmp_path):
    frame = pd.DataFrame({"path": [GOOD[0], "", GOOD[1], GOOD[2]], "sku": ["A", "B", "A", ""]})
    frame.to_csv(tmp_path / "m.csv", index=False)
    assert _tag(run_cli, tmp_path / "m.csv", tmp_path / "t.parquet", "--id-col", "sku").exit_code == 0
    rows = pd.read_parquet(tmp_path / "t.parquet")
    # Duplicate ids are the manifest's business: both rows are kept, in order. An empty
    # id falls back to the path; an empty path is a 'missing' row.
    assert rows["image_id"].tolist() == ["A", "B", "A", GOOD[2]]
    assert rows["status"].tolist() == ["ok", "missing", "ok", "ok"]
    assert rows["error"][1] == "empty path in manifest"


def test_missing_id_column_is_a_run_error(run_cli, tmp_path):
    pd.DataFrame({"path": GOOD}).to_csv(tmp_path / "m.csv", index=False)
    result = run_cli("tag", tmp_path / "m.csv", "--out", tmp_path / "t.parquet", "--id-col", "sku")
    assert result.exit_code == 5 and "no column 'sku'" in result.output


def test_empty_manifest_file_is_a_run_error(run_cli, tmp_path):
    (tmp_path / "m.csv").write_bytes(b"")
    result = run_cli("tag", tmp_path / "m.csv", "--out", tmp_path / "t.parquet")
    assert result.exit_code == 5 and "Traceback" not in result.output


def test_header_only_manifest_is_refused_and_keeps_the_previous_output(run_cli, tmp_path):
    (tmp_path / "m.csv").write_text("path,sku\n")
    assert _tag(run_cli, SAMPLE / "images" / "broken", tmp_path / "t.parquet").exit_code == 0
    yesterday = (tmp_path / "t.parquet").read_bytes()  # an output of an earlier run
    result = _tag(run_cli, tmp_path / "m.csv", tmp_path / "t.parquet")
    assert result.exit_code == 5 and "no images to tag" in result.output
    assert (tmp_path / "t.parquet").read_bytes() == yesterday
    assert not (tmp_path / "t.parquet.parts").exists()


def test_a_very_wide_manifest_passes_every_column_through(run_cli, tmp_path):
    frame = pd.DataFrame({"path": GOOD, **{f"attr_{i}": [f"v{i}"] * len(GOOD) for i in range(300)}})
    frame.to_csv(tmp_path / "m.csv", index=False)
    assert _tag(run_cli, tmp_path / "m.csv", tmp_path / "t.parquet").exit_code == 0
    rows = pd.read_parquet(tmp_path / "t.parquet")
    assert rows["attr_299"].tolist() == ["v299"] * len(GOOD) and rows.shape[1] == 18 + 300


@pytest.mark.parametrize(
    ("path", "status"),
    [("images/sku-10002.png", "ok"), ("../sample_catalog/images/sku-10002.png", "ok"), ("../README.md", "unsupported"),
     ("images/../../README.md", "unsupported"), ("/etc/passwd", "unsupported")],
)
def test_root_confines_manifest_paths(run_cli, tmp_path, path, status):
    pd.DataFrame({"path": [path]}).to_csv(tmp_path / "m.csv", index=False)
    assert _tag(run_cli, tmp_path / "m.csv", tmp_path / "t.parquet", "--root", SAMPLE).exit_code == 0
    row = pd.read_parquet(tmp_path / "t.parquet").iloc[0]
    assert row["status"] == status
    if status != "ok":
        assert "refused" in row["error"]
