"""User mistakes and hostile files, through the real command line (a subprocess each).

Each test makes the mistake a person or their environment makes (an unmounted share, a
typo in --out, a planted link, a crafted card) and checks the rule: nothing the user owns
is destroyed, nothing false is written, and the run ends in one sentence and a
documented exit code rather than a traceback.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalog_tagger.checkpoint import BUNDLED_DIR

from .conftest import REPO, SAMPLE

TAGGER = str(Path(sys.executable).with_name("catalog-tagger"))
GOOD = ["images/sku-10001.jpg", "images/sku-10002.png", "images/sku-10004.jpg"]
IS_ROOT = os.geteuid() == 0


def cli(*args: object, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([TAGGER, "-q", *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          **kwargs)


def one_sentence(proc: subprocess.CompletedProcess, code: int) -> str:
    """The run failed with ``code`` and said why in one line, without a traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(("error:", "Error:")), proc.stderr
    return lines[-1]


@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in GOOD:
        shutil.copy(SAMPLE / name, folder / Path(name).name)
    return folder


@pytest.fixture()
def model_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(BUNDLED_DIR, folder)
    return folder


def kill_after_first_shard(catalog: Path, out: Path) -> None:
    """Start tagging ``catalog`` into ``out`` and kill -9 it once a shard is committed."""
    proc = subprocess.Popen([TAGGER, "-q", "tag", str(catalog), "--out", str(out), "--workers", "0",
                             "--shard-size", "4", "--batch-size", "2"])
    deadline = time.monotonic() + 120
    while not list(out.with_name(out.name + ".parts").glob("shard-*.parquet")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def edit_card(folder: Path, change) -> None:
    card_path = folder / "model.json"
    card = json.loads(card_path.read_text())
    change(card)
    card_path.write_text(json.dumps(card))


# -- 1, 2: outputs that are not ours to replace ------------------------------------------------


@pytest.mark.skipif(not IS_ROOT, reason="making a device node needs root; the FIFO test covers non-root")
def test_out_that_is_a_device_node_is_refused_and_left_alone(photos, tmp_path):
    device = tmp_path / "null"
    os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a second /dev/null
    line = one_sentence(cli("tag", photos, "--out", device, "--format", "csv"), 6)
    assert "device" in line
    assert stat.S_ISCHR(os.lstat(device).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null", "photos"]  # no lock, parts or summary


def test_out_that_is_a_pipe_or_a_folder_is_refused_before_any_work(photos, tmp_path):
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    assert "pipe" in one_sentence(cli("tag", photos, "--out", fifo, timeout=60), 6)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    (tmp_path / "existing.parquet").mkdir()
    assert "folder" in one_sentence(cli("tag", photos, "--out", tmp_path / "existing.parquet"), 6)
    assert "folder" in one_sentence(cli("tag", photos, "--out", ".", "--format", "csv", cwd=tmp_path), 6)
    assert not list(tmp_path.glob("*.parts")) and not list(tmp_path.glob("*.lock"))


def test_out_that_is_a_symlink_is_written_through_to_its_target(photos, tmp_path):
    target = tmp_path / "real" / "tags.parquet"
    target.parent.mkdir()
    assert cli("tag", SAMPLE / "images" / "broken", "--out", target).returncode == 0  # yesterday's
    link = tmp_path / "tags.parquet"
    link.symlink_to(target)
    proc = cli("tag", photos, "--out", link, "--workers", "0")
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert len(pd.read_parquet(target)) == 3
    assert (target.parent / "tags.parquet.summary.json").is_file()
    assert not (tmp_path / "tags.parquet.summary.json").exists()


def test_out_that_is_an_input_is_refused_and_the_input_kept(photos, tmp_path, model_copy):
    manifest = tmp_path / "products.csv"
    pd.DataFrame({"path": [f"photos/{Path(n).name}" for n in GOOD], "sku": ["1", "2", "3"]}).to_csv(
        manifest, index=False)
    before = manifest.read_bytes()
    one_sentence(cli("tag", manifest, "--out", manifest), 2)
    (tmp_path / "alias.csv").hardlink_to(manifest)
    one_sentence(cli("tag", manifest, "--out", tmp_path / "alias.csv"), 2)
    one_sentence(cli("tag", photos, "--model", model_copy, "--out", model_copy / "model.json", "--format", "csv"), 2)
    assert manifest.read_bytes() == before
    assert json.loads((model_copy / "model.json").read_text())["name"]


def test_tags_parquet_and_tags_csv_keep_their_own_summaries(photos, tmp_path):
    assert cli("tag", photos, "--out", tmp_path / "tags.parquet", "--workers", "0").returncode == 0
    assert cli("tag", photos, "--out", tmp_path / "tags.csv", "--workers", "0").returncode == 0
    for name in ("tags.parquet", "tags.csv"):
        assert json.loads((tmp_path / f"{name}.summary.json").read_text())["output"].endswith(name)


def test_out_that_names_someone_elses_file_is_refused_and_the_file_kept(photos, tmp_path):
    prices = tmp_path / "prices.csv"
    prices.write_text("sku,price\nA1,10\n")
    stock = tmp_path / "stock.parquet"
    pd.DataFrame({"sku": ["A1"], "qty": [3]}).to_parquet(stock)
    for victim, extra in ((prices, ()), (stock, ()), (photos / "sku-10001.jpg", ("--format", "csv"))):
        before = victim.read_bytes()
        proc = cli("tag", photos, "--out", victim, "--workers", "0", *extra)
        assert "not a catalog-tagger output" in one_sentence(proc, 6)
        assert victim.read_bytes() == before
    # its own outputs, and an empty file, are replaced as before
    (tmp_path / "empty.csv").touch()
    for out in ("tags.parquet", "tags.csv", "empty.csv"):
        for _ in range(2):
            proc = cli("tag", photos, "--out", tmp_path / out, "--workers", "0")
            assert proc.returncode == 0, proc.stderr


def test_a_file_derived_from_an_output_is_not_replaced(photos, tmp_path):
    """Its leading columns are an output's, but pandas or a spreadsheet wrote it: a person's file."""
    corrected = tmp_path / "corrected_labels.parquet"
    pd.DataFrame({"image_id": ["a"], "path": ["a.jpg"], "status": ["ok"], "label": ["Coat"],
                  "checked_by": ["maria"]}).to_parquet(corrected)
    assert cli("tag", photos, "--out", tmp_path / "tags.csv", "--workers", "0").returncode == 0
    resaved = tmp_path / "resaved.csv"  # the CSV output with its runner-up columns dropped
    pd.read_csv(tmp_path / "tags.csv", dtype=str).drop(columns=["label_2", "score_2", "label_3", "score_3",
                                                                "needs_review"]).to_csv(resaved, index=False)
    for victim in (corrected, resaved):
        before = victim.read_bytes()
        assert "not a catalog-tagger output" in one_sentence(cli("tag", photos, "--out", victim, "--workers", "0"), 6)
        assert victim.read_bytes() == before


def test_outputs_of_every_schema_version_and_top_k_are_replaced(photos, tmp_path):
    old = tmp_path / "v1.parquet"
    assert cli("tag", photos, "--out", old, "--workers", "0").returncode == 0
    table = pq.read_table(old)  # as version 1 wrote it: the same key, another value
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"catalog_tagger_schema_version": b"1"}),
                   old)
    top1 = tmp_path / "top1.csv"
    assert cli("tag", photos, "--out", top1, "--workers", "0", "--top-k", "1").returncode == 0
    for out in (old, top1):
        proc = cli("tag", photos, "--out", out, "--workers", "0", "--top-k", "2")
        assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", ["frozen.parquet", "frozen.csv"])
def test_an_output_its_owner_made_read_only_is_refused_even_as_root(photos, tmp_path, name):
    out = tmp_path / name
    assert cli("tag", photos, "--out", out, "--workers", "0").returncode == 0
    out.chmod(0o444)  # a month-end snapshot, frozen on purpose; root could rename over it all the same
    before = out.read_bytes()
    line = one_sentence(cli("tag", photos, "--out", out, "--workers", "0", "--top-k", "1"), 6)
    assert "read-only" in line
    assert out.read_bytes() == before and stat.S_IMODE(out.stat().st_mode) == 0o444
    assert not out.with_name(name + ".parts").exists()
    # A writable output is replaced, and keeps the permission bits its owner chose.
    for mode in (0o600, 0o664):
        out.chmod(mode)
        proc = cli("tag", photos, "--out", out, "--workers", "0", "--top-k", "1")
        assert proc.returncode == 0, proc.stderr
        assert out.read_bytes() != before and stat.S_IMODE(out.stat().st_mode) == mode


def test_an_out_name_too_long_once_its_suffixes_are_added_is_one_sentence(photos, tmp_path):
    out = tmp_path / ("a" * 245 + ".csv")  # fits, but OUT.summary.json does not
    assert "too long" in one_sentence(cli("tag", photos, "--out", out, "--workers", "0"), 6)
    assert not out.exists()


# -- 3: an empty or shrunken source keeps yesterday's output -----------------------------------


@pytest.mark.parametrize("option", [["--root", "."], ["--id-col", "sku"], ["--path-col", "file"]])
def test_manifest_options_with_a_folder_are_refused_not_ignored(photos, tmp_path, option):
    # "--id-col sku" on a folder would silently give path ids where the user asked for SKUs.
    out = tmp_path / "tags.parquet"
    assert option[0] in one_sentence(cli("tag", photos, "--out", out, *option), 2)
    assert not out.exists()


def test_an_empty_source_stops_with_exit_5_and_keeps_the_previous_output(photos, tmp_path):
    out = tmp_path / "tags.parquet"
    assert cli("tag", photos, "--out", out, "--workers", "0").returncode == 0
    before = out.read_bytes()
    share = tmp_path / "unmounted"
    share.mkdir()
    assert "no images" in one_sentence(cli("tag", share, "--out", out, "--incremental", out), 5)
    assert out.read_bytes() == before


def test_a_source_that_shrank_beyond_max_shrink_keeps_the_previous_output(photos, tmp_path):
    out = tmp_path / "tags.parquet"
    assert cli("tag", photos, "--out", out, "--workers", "0").returncode == 0
    before = out.read_bytes()
    (photos / "sku-10001.jpg").unlink()
    (photos / "sku-10002.png").unlink()  # 1 image left of 3: 67% fewer
    assert "--max-shrink" in one_sentence(cli("tag", photos, "--out", out, "--incremental", out), 5)
    assert out.read_bytes() == before
    proc = cli("tag", photos, "--out", out, "--incremental", out, "--max-shrink", "0.7")
    assert proc.returncode == 0, proc.stderr
    assert len(pd.read_parquet(out)) == 1


def test_a_manifest_whose_share_is_unmounted_keeps_the_previous_output(photos, tmp_path):
    # The manifest still lists every photo, so the run is not empty: every row would be
    # "missing", and the nightly job would then back that file up over yesterday's too.
    manifest = tmp_path / "products.csv"
    pd.DataFrame({"path": [str(p) for p in sorted(photos.iterdir())]}).to_csv(manifest, index=False)
    out = tmp_path / "tags.parquet"
    assert cli("tag", manifest, "--out", out, "--workers", "0").returncode == 0
    before = out.read_bytes()
    photos.rename(tmp_path / "unmounted")
    for extra in ((), ("--incremental", out), ("--incremental", out, "--resume-if-possible")):
        assert "unmounted share" in one_sentence(cli("tag", manifest, "--out", out, "--workers", "0", *extra), 5)
        assert out.read_bytes() == before and not (tmp_path / "tags.parquet.parts").exists()
    # one of three left: beyond --max-shrink 0.5; then the share is back and the night goes on
    (tmp_path / "unmounted").rename(photos)
    moved = sorted(photos.iterdir())[:2]
    for p in moved:
        p.rename(tmp_path / p.name)
    assert "--max-shrink" in one_sentence(cli("tag", manifest, "--out", out, "--incremental", out,
                                              "--workers", "0"), 5)
    for p in moved:
        (tmp_path / p.name).rename(p)
    proc = cli("tag", manifest, "--out", out, "--incremental", out, "--resume-if-possible", "--workers", "0")
    assert proc.returncode == 0, proc.stderr
    assert set(pd.read_parquet(out)["status"]) == {"ok"}


# -- 6: the nightly job after a killed night and a change ---------------------------------------


def _nightly(catalog: Path, output_dir: Path, extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "jobs" / "nightly-tag.sh")], capture_output=True, text=True,
                          env={**os.environ, "CATALOG_DIR": str(catalog), "OUTPUT_DIR": str(output_dir),
                               "TAGGER": TAGGER, "EXTRA_ARGS": extra, "MAX_ERROR_RATE": "0.1"}, timeout=300)


def test_nightly_job_recovers_after_a_killed_night_and_a_change_of_options(tmp_path):
    catalog = tmp_path / "catalog"
    shutil.copytree(SAMPLE / "images", catalog)
    out_dir = tmp_path / "state"
    out_dir.mkdir()
    out = out_dir / "tags.parquet"
    # A night killed after its first shard: the shard store stays behind.
    kill_after_first_shard(catalog, out)
    # The next night runs with other options (EXTRA_ARGS changed): it must start over, not fail.
    night = _nightly(catalog, out_dir, "--workers 0 --top-k 2")
    assert night.returncode == 0, night.stderr
    assert len(pd.read_parquet(out)) == 43
    # A failed night (the share is gone) must not log last night's summary as its own.
    empty = tmp_path / "gone"
    empty.mkdir()
    failed = _nightly(empty, out_dir, "--workers 0 --top-k 2")
    assert failed.returncode == 5
    log = sorted((out_dir / "logs").glob("tag-*.log"))[-1].read_text()
    assert '"total"' not in log and "unchanged" in log and log.rstrip().endswith("exit 5")
    assert len(pd.read_parquet(out)) == 43


# -- 5: publishing a model is atomic as seen by a reader -----------------------------------------


def test_retrain_publishes_a_versioned_folder_behind_one_link(tmp_path, photos):
    fake = tmp_path / "fake-tagger"
    # "Training" copies the bundled model (with a better validation accuracy) into --out.
    fake.write_text(f"""#!/usr/bin/env bash
set -e
out=$4
mkdir -p "$out"
cp {BUNDLED_DIR}/model.safetensors "$out/"
python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); c["metrics"]["val_accuracy"]=0.99; \
json.dump(c, open(sys.argv[2], "w"))' {BUNDLED_DIR}/model.json "$out/model.json"
""")
    fake.chmod(0o755)
    model_dir = tmp_path / "published"
    shutil.copytree(BUNDLED_DIR, model_dir)  # a plain folder, as older versions of the job left it
    env = {**os.environ, "MODEL_DIR": str(model_dir), "RUNS_DIR": str(tmp_path / "runs"), "TAGGER": str(fake)}
    job = subprocess.run(["bash", str(REPO / "jobs" / "retrain.sh")], capture_output=True, text=True, env=env)
    assert job.returncode == 0, job.stderr
    assert model_dir.is_symlink()
    first = os.readlink(model_dir)
    versions = sorted(p.name for p in (tmp_path / "published.versions").iterdir())
    assert len(versions) == 2 and not [v for v in versions if v.startswith(".")]  # old, new; no debris
    assert cli("tag", photos, "--model", model_dir, "--out", tmp_path / "t.parquet").returncode == 0
    time.sleep(1.1)  # versions are named by the second
    job = subprocess.run(["bash", str(REPO / "jobs" / "retrain.sh")], capture_output=True, text=True, env=env)
    assert job.returncode == 0, job.stderr
    assert os.readlink(model_dir) != first and Path(first).is_dir()  # the old version stays for rollback


# -- 7, 9, 10: runs that would mix or misreport ---------------------------------------------------


def test_a_recalibrated_model_is_a_new_model_for_incremental_runs(photos, tmp_path, model_copy):
    out = tmp_path / "tags.parquet"
    assert cli("tag", photos, "--model", model_copy, "--out", out, "--workers", "0").returncode == 0
    edit_card(model_copy, lambda c: c["calibration"].update(temperature=2.5))
    proc = cli("tag", photos, "--model", model_copy, "--out", out, "--incremental", out, "--workers", "0")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "tags.parquet.summary.json").read_text())
    assert summary["carried_over"] == 0 and summary["processed"] == 3
    assert len(set(pd.read_parquet(out)["model"])) == 1


def test_resume_with_other_decoding_limits_is_refused(tmp_path):
    catalog = tmp_path / "catalog"
    shutil.copytree(SAMPLE / "images", catalog)
    out = tmp_path / "tags.parquet"
    kill_after_first_shard(catalog, out)
    for option in (("--max-pixels", "1000"), ("--time-limit", "5")):
        one_sentence(cli("tag", catalog, "--out", out, "--shard-size", "4", "--resume", *option), 2)
    proc = cli("tag", catalog, "--out", out, "--shard-size", "4", "--resume", "--workers", "0")
    assert proc.returncode == 0 and len(pd.read_parquet(out)) == 43


@pytest.mark.parametrize("args", [
    ("--review-threshold", "nan"), ("--max-error-rate", "nan"), ("--time-limit", "nan"), ("--time-limit", "inf"),
    ("--target-precision", "nan"), ("--max-shrink", "nan"), ("--top-k", "11"),
])
def test_nonsense_numbers_are_refused_before_any_work(photos, tmp_path, args):
    one_sentence(cli("tag", photos, "--out", tmp_path / "t.parquet", *args), 2)
    assert not (tmp_path / "t.parquet").exists()


@pytest.mark.parametrize("args", [("--lr", "nan"), ("--val-fraction", "nan"), ("--worn-prob", "nan")])
def test_train_refuses_nan(tmp_path, args):
    one_sentence(cli("train", "--out", tmp_path / "m", "--epochs", "1", *args), 2)
    assert not (tmp_path / "m").exists()


# -- 11: spreadsheet formulas ---------------------------------------------------------------------


def _photos_named(tmp_path: Path, hostile_name: str) -> Path:
    """A folder of two good photos, one of them under ``hostile_name``, one as plain.jpg."""
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(SAMPLE / GOOD[0], images / hostile_name)
    shutil.copy(SAMPLE / GOOD[2], images / "plain.jpg")
    return images


def test_csv_cells_that_a_spreadsheet_would_run_are_neutralised(tmp_path):
    hostile_name = "=HYPERLINK(\"http:x\")a.jpg"
    images = _photos_named(tmp_path, hostile_name)
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": [f"images/{hostile_name}", "images/plain.jpg"],
                  "title": ["=cmd|' /C calc'!A0", "@SUM(1+1)"], "price": ["-5", "12"]}).to_csv(manifest, index=False)
    out = tmp_path / "t.csv"
    assert cli("tag", manifest, "--out", out, "--workers", "0").returncode == 0
    rows = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert rows["title"].tolist() == ["'=cmd|' /C calc'!A0", "'@SUM(1+1)"]
    assert rows["price"].tolist() == ["'-5", "12"]
    for value in rows.to_numpy().ravel():
        assert not str(value).startswith(("=", "+", "-", "@", "\t", "\r")), value
    folder = tmp_path / "folder.csv"
    assert cli("tag", images, "--out", folder, "--workers", "0").returncode == 0
    assert pd.read_csv(folder, dtype=str)["image_id"].tolist() == ["'" + hostile_name, "plain.jpg"]
    raw = tmp_path / "raw.csv"
    assert cli("tag", manifest, "--out", raw, "--workers", "0", "--raw-csv").returncode == 0
    assert pd.read_csv(raw, dtype=str)["title"].tolist() == ["=cmd|' /C calc'!A0", "@SUM(1+1)"]
    parquet = tmp_path / "t.parquet"
    assert cli("tag", manifest, "--out", parquet, "--workers", "0").returncode == 0
    assert pd.read_parquet(parquet)["title"].tolist() == ["=cmd|' /C calc'!A0", "@SUM(1+1)"]


# -- 12: the lock file ------------------------------------------------------------------------------


def test_a_lock_file_planted_as_a_link_or_hard_link_is_refused(photos, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "tags.parquet.lock").symlink_to(victim)
    one_sentence(cli("tag", photos, "--out", tmp_path / "tags.parquet"), 6)
    (tmp_path / "tags.parquet.lock").unlink()
    (tmp_path / "tags.parquet.lock").hardlink_to(victim)
    one_sentence(cli("tag", photos, "--out", tmp_path / "tags.parquet"), 6)
    assert victim.read_text() == "precious\n"


# -- 13: crafted model cards --------------------------------------------------------------------------


@pytest.mark.parametrize("change", [
    lambda c: c["model_config"].update(input_size=200_000),
    lambda c: c["model_config"].update(widths=[100_000, 100_000, 100_000]),
    lambda c: c["model_config"].update(stem_width="16"),
    lambda c: c["model_config"].update(classes=["a"] * 3),
    lambda c: c.update(calibration={"temperature": 0}),
    lambda c: c.update(calibration={"temperature": 1, "review_table": [[float("nan"), 1, 1]]}),
    lambda c: c.update(calibration="hot"),
], ids=["input_size", "widths", "stem_type", "duplicate_classes", "temperature_0", "nan_table", "not_a_dict"])
def test_crafted_cards_are_refused_with_exit_4(photos, tmp_path, model_copy, change):
    edit_card(model_copy, change)
    one_sentence(cli("tag", photos, "--model", model_copy, "--out", tmp_path / "t.parquet", timeout=120), 4)


def test_cards_that_are_not_regular_files_or_too_deep_are_refused(photos, tmp_path, model_copy):
    card = model_copy / "model.json"
    out = tmp_path / "t.parquet"
    card.write_text("[" * 100_000 + "]" * 100_000)
    one_sentence(cli("tag", photos, "--model", card, "--out", out, timeout=60), 4)
    card.unlink()
    card.symlink_to("/dev/zero")
    one_sentence(cli("tag", photos, "--model", card, "--out", out, timeout=60), 4)
    card.unlink()
    os.mkfifo(card)
    one_sentence(cli("tag", photos, "--model", card, "--out", out, timeout=60), 4)


def test_a_card_without_calibration_tags_with_raw_confidence(photos, tmp_path, model_copy):
    edit_card(model_copy, lambda c: c.update(calibration=None))
    proc = cli("tag", photos, "--model", model_copy, "--out", tmp_path / "t.parquet", "--workers", "0")
    assert proc.returncode == 0, proc.stderr
    assert "calibrated" in one_sentence(cli("tag", photos, "--model", model_copy, "--out", tmp_path / "u.parquet",
                                            "--target-precision", "0.9"), 2)


# -- 14, 16, 18, 19: manifests ----------------------------------------------------------------------


def test_a_parquet_manifest_that_expands_to_gigabytes_is_refused_in_one_sentence(tmp_path):
    rows = 200_000
    bomb = pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, dtype=np.int32)), pa.array(["x" * (1 << 20)]))
    manifest = tmp_path / "bomb.parquet"
    pq.write_table(pa.table({"path": pa.array(["a.jpg"] * rows), "title": bomb}), manifest, compression="zstd")
    assert manifest.stat().st_size < 200_000  # 200 GB once expanded
    line = one_sentence(cli("tag", manifest, "--out", tmp_path / "t.parquet", timeout=120), 5)
    assert "title" in line


def test_a_nul_byte_in_a_manifest_path_is_one_failed_row(tmp_path):
    shutil.copytree(SAMPLE / "images", tmp_path / "images")
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": [GOOD[0], "images/bad\x00name.jpg", GOOD[1]]}), manifest)
    proc = cli("tag", manifest, "--out", tmp_path / "t.parquet", "--workers", "0")
    assert proc.returncode == 0, proc.stderr
    assert pd.read_parquet(tmp_path / "t.parquet")["status"].tolist() == ["ok", "unsupported", "ok"]


def test_a_parquet_manifest_with_a_repeated_column_name_is_refused(tmp_path):
    table = pa.Table.from_arrays([pa.array([GOOD[0]]), pa.array(["a"]), pa.array(["b"])], names=["path", "x", "x"])
    pq.write_table(table, tmp_path / "m.parquet")
    assert "'x'" in one_sentence(cli("tag", tmp_path / "m.parquet", "--out", tmp_path / "t.parquet"), 5)


def test_a_csv_manifest_with_a_repeated_column_name_is_refused(tmp_path):
    shutil.copy(SAMPLE / GOOD[0], tmp_path / "a.jpg")
    (tmp_path / "m.csv").write_text("sku,path,path\nA,old/missing.jpg,a.jpg\n")
    assert "'path'" in one_sentence(cli("tag", tmp_path / "m.csv", "--out", tmp_path / "t.parquet"), 5)
    assert not (tmp_path / "t.parquet").exists()


def test_a_trailing_delimiter_on_every_manifest_row_shifts_no_column(photos, tmp_path):
    manifest = photos / "m.csv"
    names = sorted(p.name for p in photos.iterdir() if p.suffix != ".csv")
    manifest.write_text("sku,path\n" + "".join(f"{n.split('.')[0]},{n},\n" for n in names))
    proc = cli("tag", manifest, "--id-col", "sku", "--out", tmp_path / "t.csv", "--workers", "0")
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr
    rows = pd.read_csv(tmp_path / "t.csv", dtype=str)
    assert rows["image_id"].tolist() == [n.split(".")[0] for n in names]
    assert rows["status"].tolist() == ["ok"] * len(names)
    # extra fields that hold something are no trailing delimiter: refused, not dropped
    manifest.write_text("sku,path\n" + "".join(f"{n.split('.')[0]},{n},Winter\n" for n in names))
    assert "header" in one_sentence(cli("tag", manifest, "--out", tmp_path / "u.csv", "--workers", "0"), 5)


def test_a_tag_csv_with_trailing_delimiters_is_read_in_place(photos, tmp_path):
    tags = tmp_path / "tags.csv"
    assert cli("tag", photos, "--out", tags, "--workers", "0").returncode == 0
    resaved = tmp_path / "resaved.csv"  # as an exporter writes it: a delimiter after every data row
    header, *rows = tags.read_text().splitlines()
    resaved.write_text("\n".join([header, *(r + "," for r in rows)]) + "\n")
    proc = cli("review", resaved, "--budget", "2", "--out", tmp_path / "r.xlsx")
    assert proc.returncode == 0, proc.stderr


def test_a_review_csv_with_trailing_delimiters_is_read_in_place(photos, tmp_path):
    tags = tmp_path / "tags.parquet"
    assert cli("tag", photos, "--out", tags, "--workers", "0").returncode == 0
    filled = tmp_path / "filled.csv"
    filled.write_text("path,correct_label\n" + "".join(f"{p},Coat,\n" for p in sorted(photos.iterdir())))
    line = one_sentence(cli("review", tags, "--exclude", filled, "--out", tmp_path / "s.xlsx"), 3)
    assert f"{len(GOOD)} already reviewed" in line


def test_manifest_columns_named_like_csv_runner_ups_do_not_replace_them(photos, tmp_path):
    (photos / "pim.csv").write_text("sku,path,label_2,score_2\nA,sku-10001.jpg,Winter,5\nB,sku-10002.png,Summer,3\n")
    proc = cli("tag", photos / "pim.csv", "--id-col", "sku", "--out", tmp_path / "out.csv", "--workers", "0")
    assert proc.returncode == 0, proc.stderr
    rows = pd.read_csv(tmp_path / "out.csv", dtype=str)
    assert len(rows.columns) == len(set(rows.columns))
    assert rows["manifest_label_2"].tolist() == ["Winter", "Summer"] and rows["manifest_score_2"].tolist() == ["5", "3"]
    assert "Winter" not in rows["label_2"].tolist() and pd.to_numeric(rows["score_2"]).lt(1).all()


def test_a_csv_output_fed_back_keeps_the_new_runner_ups(photos, tmp_path):
    first, second, now = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "now.parquet"
    assert cli("tag", photos, "--out", first, "--workers", "0").returncode == 0
    shutil.copy(SAMPLE / "images" / "sku-10010.png", photos / "sku-10002.png")  # the photo changes
    for src, dst in ((first, second), (photos, now)):
        proc = cli("tag", src, "--out", dst, "--workers", "0")
        assert proc.returncode == 0, proc.stderr
    rows = pd.read_csv(second, dtype=str)
    assert len(rows.columns) == len(set(rows.columns))
    assert rows["manifest_label_2"].tolist() == pd.read_csv(first, dtype=str)["label_2"].tolist()
    assert rows["label_2"].tolist() == [t[1] for t in pd.read_parquet(now)["topk_labels"]]


def test_an_output_fed_back_as_a_manifest_twice_keeps_every_column(tmp_path):
    first, second, third = (tmp_path / f"{n}.parquet" for n in ("a", "b", "c"))
    assert cli("tag", SAMPLE / "manifest.csv", "--out", first, "--workers", "0").returncode == 0
    for src, dst in ((first, second), (second, third)):
        proc = cli("tag", src, "--out", dst, "--workers", "0")
        assert proc.returncode == 0, proc.stderr
    names = pq.read_schema(third).names
    assert len(names) == len(set(names)) and "manifest_label_id" in names and "manifest_manifest_label_id" in names
    rows = pd.read_parquet(third)
    assert rows["sku"].tolist()[:2] == ["SKU-10001", "SKU-10002"]
    assert rows["manifest_label"].tolist() == pd.read_parquet(second)["label"].tolist()


# -- 15: --root --------------------------------------------------------------------------------------


def test_root_cannot_be_left_through_a_symlink(tmp_path):
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    shutil.copy(SAMPLE / GOOD[0], outside / "secret.jpg")
    shutil.copy(SAMPLE / GOOD[1], root / "fine.png")
    (root / "link").symlink_to(outside)
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": ["fine.png", "link/secret.jpg"]}).to_csv(manifest, index=False)
    out = tmp_path / "t.parquet"
    proc = cli("tag", manifest, "--root", root, "--hash", "--out", out, "--workers", "0")
    assert proc.returncode == 0, proc.stderr
    rows = pd.read_parquet(out)
    assert rows["status"].tolist() == ["ok", "unsupported"]
    assert rows["sha256"].isna().tolist() == [False, True] and rows["file_size"].isna().tolist() == [False, True]


# -- 17: Ray with nothing decodable ---------------------------------------------------------------------


def test_ray_engine_with_only_broken_files_writes_their_rows(tmp_path):
    pytest.importorskip("ray")
    broken = tmp_path / "broken"
    shutil.copytree(SAMPLE / "images" / "broken", broken)
    out = tmp_path / "ray-out.parquet"
    proc = cli("tag", broken, "--out", out, "--engine", "ray", timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(pd.read_parquet(out)["status"]) == ["empty", "unreadable", "unreadable"]


def test_ray_engine_leaves_a_folder_it_did_not_make_alone(photos, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "important.txt").write_text("keep me")
    one_sentence(cli("tag", photos, "--out", folder, "--engine", "ray", timeout=240), 6)
    assert [p.name for p in folder.iterdir()] == ["important.txt"]
    assert (folder / "important.txt").read_text() == "keep me"


# -- 4, 19, 20: train and calibrate ------------------------------------------------------------------


def test_calibrate_on_a_folder_it_cannot_write_is_one_sentence(tmp_path, model_copy):
    if IS_ROOT:
        pytest.skip("root can write any folder; the other-account test below covers permissions as root")
    model_copy.chmod(0o555)
    try:
        one_sentence(cli("calibrate", "--model", model_copy), 6)
    finally:
        model_copy.chmod(0o755)


def test_calibrate_leaves_a_read_only_card_as_it_is(tmp_path, model_copy):
    card = model_copy / "model.json"
    before = card.read_bytes()
    card.chmod(0o444)  # root included: the owner said "keep this as it is"
    assert "read-only" in one_sentence(cli("calibrate", "--model", model_copy), 6)
    assert card.read_bytes() == before and stat.S_IMODE(card.stat().st_mode) == 0o444


def test_evaluate_leaves_report_files_it_did_not_write_alone(tmp_path, tiny_data_dir):
    out = tmp_path / "results"
    out.mkdir()
    theirs = out / "metrics.json"
    theirs.write_text('{"revenue": 12}')
    evaluate = ("evaluate", "--data-dir", tiny_data_dir, "--device", "cpu", "--out", out)
    assert "metrics.json" in one_sentence(cli(*evaluate), 6)
    assert theirs.read_text() == '{"revenue": 12}'
    theirs.unlink()
    (out / "predictions.png").write_bytes(b"their picture")  # no metrics.json of ours beside it
    assert "predictions.png" in one_sentence(cli(*evaluate), 6)
    assert (out / "predictions.png").read_bytes() == b"their picture"
    (out / "predictions.png").unlink()
    for _ in range(2):  # a report of ours is replaced by the next run
        proc = cli(*evaluate)
        assert proc.returncode == 0, proc.stderr
    assert json.loads(theirs.read_text())["n"] > 0


def test_a_trained_model_is_readable_by_other_accounts(tmp_path, tiny_data_dir):
    model = tmp_path / "model"
    proc = cli("train", "--out", model, "--data-dir", tiny_data_dir, "--epochs", "1", "--val-size", "200",
               "--device", "cpu", "--no-mixed-precision")
    assert proc.returncode == 0, proc.stderr
    for name in ("model.json", "model.safetensors"):
        assert (model / name).stat().st_mode & 0o044 == 0o044, oct((model / name).stat().st_mode)


# Root without its capabilities is bound by file permissions like any other account, so
# that root (CI) can play "another account" on files owned by nobody.
WITHOUT_CAPS = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"]


@pytest.mark.skipif(not IS_ROOT or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_unreadable_weights_and_an_unwritable_model_folder_are_one_sentence(tmp_path, photos, model_copy):
    nobody = 65534
    for f in model_copy.iterdir():
        os.chown(f, nobody, nobody)
    os.chown(model_copy, nobody, nobody)
    tag = [*WITHOUT_CAPS, TAGGER, "-q", "tag", str(photos), "--model", str(model_copy),
           "--out", str(tmp_path / "t.parquet"), "--workers", "0"]
    proc = subprocess.run(tag, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr  # rw-r--r-- weights of another account
    (model_copy / "model.safetensors").chmod(0o600)
    one_sentence(subprocess.run(tag, capture_output=True, text=True, timeout=300), 4)
    (model_copy / "model.safetensors").chmod(0o644)
    calibrate = [*WITHOUT_CAPS, TAGGER, "-q", "calibrate", "--model", str(model_copy)]
    assert "not writable" in one_sentence(subprocess.run(calibrate, capture_output=True, text=True, timeout=300), 6)


def _file_size_limit(limit_bytes: int):
    def apply():
        # What a full disk does to a writer: writes past the limit fail with an error.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


def test_a_full_disk_under_reports_and_checkpoints_is_one_sentence(tmp_path, tiny_data_dir):
    report = tmp_path / "report"
    proc = cli("evaluate", "--data-dir", tiny_data_dir, "--device", "cpu", "--out", report,
               preexec_fn=_file_size_limit(4096))  # metrics.json fits, the confusion matrix PNG does not
    assert "cannot write" in one_sentence(proc, 6)
    assert not list(report.glob(".*.tmp"))
    run = tmp_path / "run"
    proc = cli("train", "--out", run, "--data-dir", tiny_data_dir, "--epochs", "1", "--val-size", "200",
               "--device", "cpu", "--no-mixed-precision", preexec_fn=_file_size_limit(64 * 1024))
    assert "cannot write" in one_sentence(proc, 6)
    assert not list(run.glob(".*.tmp"))


def test_train_never_overwrites_a_model_unless_asked(tmp_path, tiny_data_dir, model_copy):
    before = {p.name: p.read_bytes() for p in model_copy.iterdir()}
    train = ("train", "--data-dir", tiny_data_dir, "--epochs", "1", "--val-size", "200", "--device", "cpu",
             "--no-mixed-precision")
    assert "--overwrite" in one_sentence(cli(*train, "--out", model_copy), 6)
    assert {p.name: p.read_bytes() for p in model_copy.iterdir()} == before
    proc = cli(*train, "--out", model_copy, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    card = json.loads((model_copy / "model.json").read_text())
    assert card["weights_sha256"] != json.loads(before["model.json"])["weights_sha256"]
    # The card names the weights it vouches for; the replaced weights are gone.
    assert sorted(p.name for p in model_copy.glob("*.safetensors")) == [card["weights_file"]]
    proc = cli("tag", SAMPLE / "images" / "broken", "--model", model_copy, "--out", tmp_path / "t.parquet")
    assert proc.returncode == 0, proc.stderr


def test_a_review_workbook_keeps_formula_like_names_as_text(tmp_path):
    from openpyxl import load_workbook

    hostile = "=HYPERLINK(\"http:x\",\"click\")a.jpg"
    images = _photos_named(tmp_path, hostile)
    tags = tmp_path / "tags.parquet"
    assert cli("tag", images, "--out", tags, "--workers", "0").returncode == 0
    book = tmp_path / "review.xlsx"
    proc = cli("review", tags, "--budget", "2", "--out", book)
    assert proc.returncode == 0, proc.stderr
    cells = [c for row in load_workbook(book).worksheets[0].iter_rows() for c in row
             if isinstance(c.value, str) and hostile in c.value]
    assert cells, "the hostile name is missing from the workbook"
    assert all(c.data_type == "s" and c.value.endswith(hostile) for c in cells), [(c.data_type, c.value) for c in cells]


def test_a_photo_with_a_latin1_name_keeps_its_thumbnail_and_its_label(tmp_path):
    """A name from a Windows share (b'caf\\xe9.jpg') is written as text 'caf\\\\xe9.jpg'; review
    and learn must still open the photo, not call it gone."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(12):
        shutil.copy(SAMPLE / GOOD[i % len(GOOD)], images / f"plain-{i:02d}.jpg")
    latin1 = os.fsdecode(b"caf\xe9.jpg")
    shutil.copy(SAMPLE / GOOD[0], images / latin1)
    tags, book = tmp_path / "tags.parquet", tmp_path / "review.xlsx"
    assert cli("tag", images, "--out", tags, "--workers", "0").returncode == 0
    assert "caf\\xe9.jpg" in set(pd.read_parquet(tags)["path"].map(os.path.basename))
    proc = cli("review", tags, "--budget", "13", "--out", book)
    assert proc.returncode == 0 and "no thumbnail" not in proc.stderr, proc.stderr
    from openpyxl import load_workbook

    wb = load_workbook(book)
    ws = wb.worksheets[0]
    assert len(ws._images) == 13  # every photo has its thumbnail, the Latin-1 one included
    col = {c.value: c.column for c in ws[2]}
    for r in range(3, ws.max_row + 1):
        ws.cell(r, col["correct_label"]).value = "Coat" if r % 2 else "Bag"
    wb.save(book)
    proc = cli("learn", book, "--out", tmp_path / "model", "--epochs", "1", "--folds", "2", "--views", "0",
               "--workers", "0", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    card = json.loads((tmp_path / "model" / "model.json").read_text())
    assert card["training"]["labels"] == 13 and card["training"]["missing_photos"] == 0
