"""The Ray engine against the local engine on the same catalog (a local Ray with 2 CPUs)."""

from __future__ import annotations

import json
import sys

import pandas as pd
import pyarrow.parquet as pq
import pytest

from catalog_tagger.config import TagConfig
from catalog_tagger.errors import UsageError
from catalog_tagger.run import run_tagging

from .conftest import SAMPLE

ray = pytest.importorskip("ray", reason="make test installs the [ray] extra; this only skips outside it")

COMPARED = ["image_id", "path", "status", "error", "label", "label_id", "width", "height", "file_size", "title"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _config(out, **kw):
    return TagConfig(source=SAMPLE / "manifest.csv", out=out, id_col="sku", shard_size=16, workers=0, **kw)


def test_ray_engine_rows_equal_the_local_engine(local_ray, tmp_path):
    from catalog_tagger.ray_engine import run_tagging_ray

    run_tagging(_config(tmp_path / "local.parquet"), progress=False)
    summary = run_tagging_ray(_config(tmp_path / "ray"), progress=False)
    local = pd.read_parquet(tmp_path / "local.parquet")
    parts = sorted(p.name for p in (tmp_path / "ray").glob("part-*.parquet"))
    assert parts == ["part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]  # 42 rows / 16
    remote = pd.read_parquet(tmp_path / "ray").sort_values("ordinal").reset_index(drop=True)
    assert remote["ordinal"].tolist() == list(range(42))
    pd.testing.assert_frame_equal(remote[COMPARED], local[COMPARED])
    pd.testing.assert_series_equal(remote["confidence"], local["confidence"], atol=1e-5)
    assert summary.total == 42 and summary.by_status == {"ok": 40, "unreadable": 1, "missing": 1}
    assert json.loads((tmp_path / "ray.summary.json").read_text())["total"] == 42
    meta = pq.read_schema(tmp_path / "ray" / parts[0]).metadata
    assert b"model_card" in meta and b"classes" in meta


def test_ray_resume_skips_finished_parts(local_ray, tmp_path):
    from catalog_tagger.ray_engine import run_tagging_ray

    out = tmp_path / "ray"
    run_tagging_ray(_config(out), progress=False)
    first = (out / "part-000000.parquet").stat().st_mtime_ns
    (out / "part-000002.parquet").unlink()  # as if the run had died before its last part
    summary = run_tagging_ray(_config(out, resume=True), progress=False)
    assert summary.resumed_rows == 32 and summary.processed == 10 and summary.total == 42
    assert (out / "part-000000.parquet").stat().st_mtime_ns == first


def test_without_ray_the_engine_says_how_to_install_it(monkeypatch, tmp_path):
    from catalog_tagger import ray_engine

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(UsageError, match=r"pip install 'catalog-tagger\[ray\]'"):
        ray_engine.run_tagging_ray(_config(tmp_path / "x"))
