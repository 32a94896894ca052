"""The Ray engine writes what the local engine writes, on a real two-node Ray cluster.

A cluster of two Ray nodes (one CPU each) runs on this machine for the module; every Ray
run is the real command line joining it with --ray-address. Each comparison is column for
column, run_id and tagged_at aside (they say when and by which run a row was tagged).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from catalog_tagger.config import TagConfig
from catalog_tagger.errors import UsageError

from .conftest import SAMPLE

TAGGER = str(Path(sys.executable).with_name("catalog-tagger"))
VOLATILE = ["run_id", "tagged_at"]
# Summary entries that say how and when a run went, not what it wrote.
RUN_FACTS = {"output", "run_id", "seconds", "images_per_second", "engine", "images_by_node"}
# Ray's Unix sockets live under its temp dir, and a socket path may not exceed 107 bytes:
# a short folder under /tmp rather than pytest's long tmp_path.
NODE = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
# Find a dead node within about two seconds instead of Ray's default thirty.
FAST_FAILURE = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_timeout_ms": 500,
                "health_check_failure_threshold": 3}


def cli(*args: object, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([TAGGER, "-q", *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on this machine, one CPU each; torn down whatever the tests do."""
    pytest.importorskip("ray", reason="make test installs the [ray] extra; this only skips outside it")
    from ray.cluster_utils import Cluster

    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_TMPDIR", ray_tmp)  # session files and the address file, not /tmp/ray
        started = None
        try:
            started = Cluster(initialize_head=True, head_node_args={
                **NODE, "include_dashboard": False, "_system_config": FAST_FAILURE})
            started.add_node(**NODE)
            started.wait_for_nodes()
            yield started
        finally:
            if started is not None:
                started.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)


def ray_cli(cluster, *args: object) -> subprocess.CompletedProcess:
    return cli(*args, "--engine", "ray", "--ray-address", cluster.address,
               env={**os.environ, "RAY_TMPDIR": os.environ["RAY_TMPDIR"]})


@pytest.fixture()
def catalog(tmp_path: Path) -> Path:
    """40 good photos and 3 broken files (empty, truncated, not an image)."""
    folder = tmp_path / "catalog"
    shutil.copytree(SAMPLE / "images", folder)
    return folder


def summary(out: Path) -> dict:
    return json.loads(out.with_name(out.name + ".summary.json").read_text())


def rows(out: Path) -> pd.DataFrame:
    if out.suffix == ".csv":
        return pd.read_csv(out, dtype=str, keep_default_na=False).drop(columns=VOLATILE)
    return pd.read_parquet(out).drop(columns=VOLATILE)


def assert_same_output(ray_out: Path, local_out: Path, resumed: bool = False) -> None:
    remote, local = rows(ray_out), rows(local_out)
    assert list(remote.columns) == list(local.columns)
    pd.testing.assert_frame_equal(remote, local)
    # A resumed run took some rows from its committed shards instead of decoding them.
    skip = RUN_FACTS | ({"processed", "resumed_rows"} if resumed else set())
    ray_summary, local_summary = summary(ray_out), summary(local_out)
    assert {k: v for k, v in ray_summary.items() if k not in skip} == \
           {k: v for k, v in local_summary.items() if k not in skip}


def node_ids(cluster) -> set[str]:
    return {node.node_id for node in cluster.list_all_nodes()}


@pytest.mark.slow
@pytest.mark.parametrize(("fmt", "options", "code"), [
    ("parquet", (), 0),
    ("csv", ("--hash", "--max-error-rate", "0.01"), 7),  # 3 of 43 failed: written, then exit 7
])
def test_both_engines_write_the_same_file_and_both_nodes_work(cluster, catalog, tmp_path, fmt, options, code):
    local_out, ray_out = tmp_path / f"local.{fmt}", tmp_path / f"ray.{fmt}"
    assert cli("tag", catalog, "--out", local_out, "--shard-size", "6", *options).returncode == code
    proc = ray_cli(cluster, "tag", catalog, "--out", ray_out, "--shard-size", "6", *options)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert_same_output(ray_out, local_out)
    assert (summary(ray_out)["engine"], summary(local_out)["engine"]) == ("ray", "local")
    assert summary(ray_out)["by_status"] == {"empty": 1, "ok": 40, "unreadable": 2}
    by_node = summary(ray_out)["images_by_node"]
    assert set(by_node) == node_ids(cluster) and sum(by_node.values()) == 43  # 8 shards over both nodes
    assert not ray_out.with_name(ray_out.name + ".parts").exists()


@pytest.mark.slow
def test_both_engines_carry_over_the_same_rows_with_incremental(cluster, catalog, tmp_path):
    previous = tmp_path / "yesterday.parquet"
    assert cli("tag", catalog, "--out", previous, "--shard-size", "6").returncode == 0
    shutil.copy(catalog / "sku-10013.jpg", catalog / "aaa-new.jpg")  # one new photo, one replaced, one gone
    shutil.copy(catalog / "sku-10011.jpg", catalog / "sku-10004.jpg")
    os.utime(catalog / "sku-10004.jpg", (time.time() + 5, time.time() + 5))
    (catalog / "sku-10020.webp").unlink()
    local_out, ray_out = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    common = ("--shard-size", "6", "--incremental", previous)
    assert cli("tag", catalog, "--out", local_out, *common).returncode == 0
    # One decoding process inside each Ray task (a DataLoader worker, as the local engine has).
    proc = ray_cli(cluster, "tag", catalog, "--out", ray_out, *common, "--workers", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_output(ray_out, local_out)
    # 38 unchanged labeled photos carried over; the new, the replaced and the 3 broken files tagged again.
    assert (summary(ray_out)["carried_over"], summary(ray_out)["processed"]) == (38, 5)


def stop_after_first_shard(command: list[str], out: Path, signum: int) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parts = out.with_name(out.name + ".parts")
    deadline = time.monotonic() + 180
    while not list(parts.glob("shard-*.parquet")):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first shard"
        time.sleep(0.05)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "resume_on"), [(signal.SIGKILL, "local"), (signal.SIGTERM, "ray")],
                         ids=["SIGKILL-resumed-locally", "SIGTERM-resumed-on-ray"])
def test_a_stopped_ray_run_resumes_to_the_local_engines_output(cluster, catalog, tmp_path, signum, resume_on):
    local_out, ray_out = tmp_path / "local.csv", tmp_path / "ray.csv"
    assert cli("tag", catalog, "--out", local_out, "--shard-size", "4").returncode == 0
    command = [TAGGER, "-q", "tag", str(catalog), "--out", str(ray_out), "--shard-size", "4", "--engine", "ray",
               "--ray-address", cluster.address]
    stopped = stop_after_first_shard(command, ray_out, signum)
    if signum == signal.SIGTERM:  # as cron or systemd stop it: one sentence, exit 130, shards kept
        assert stopped.returncode == 130 and "--resume" in stopped.stderr.splitlines()[-1], stopped.stderr[-3000:]
    else:
        assert stopped.returncode == -signal.SIGKILL
    assert not ray_out.exists()
    # The engine is no part of the run's identity: the shards Ray committed are reused either way.
    resume = ray_cli if resume_on == "ray" else lambda _, *args: cli(*args)
    proc = resume(cluster, "tag", catalog, "--out", ray_out, "--shard-size", "4", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_output(ray_out, local_out, resumed=True)
    assert 4 <= summary(ray_out)["resumed_rows"] < 43 and summary(ray_out)["engine"] == resume_on


def running_a_shard(raylet: int) -> bool:
    """Whether a worker of this raylet is running a shard task now (Ray titles a busy worker
    ``ray::TASK_NAME`` and an idle one ``ray::IDLE``), from /proc."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == raylet \
                    and (entry / "cmdline").read_bytes().startswith(b"ray::tag_shard_task"):
                return True
        except (OSError, IndexError, ValueError):
            continue
    return False


@pytest.mark.slow
def test_losing_a_node_part_way_loses_no_row(cluster, catalog, tmp_path):
    """A third node joins and is killed (raylet and workers, SIGKILL) while it tags a shard:
    Ray runs that shard again elsewhere, or the run stops and --resume finishes it."""
    local_out, ray_out = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    assert cli("tag", catalog, "--out", local_out, "--shard-size", "2").returncode == 0
    doomed = cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    raylet = doomed.all_processes["raylet"][0].process.pid
    command = [TAGGER, "-q", "tag", str(catalog), "--out", str(ray_out), "--shard-size", "2", "--engine", "ray",
               "--ray-address", cluster.address]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        parts = ray_out.with_name(ray_out.name + ".parts")
        deadline = time.monotonic() + 180
        # Part-way: shards are being committed and the node is in the middle of one.
        while not (list(parts.glob("shard-*.parquet")) and running_a_shard(raylet)):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the node was used"
            time.sleep(0.005)
        committed_before = len(list(parts.glob("shard-*.parquet")))
        cluster.remove_node(doomed, allow_graceful=False)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert committed_before < 22  # 43 images in shards of 2: the node died with work left
    if proc.returncode != 0:  # Ray gave up on the shard: the run says so and --resume finishes it
        assert proc.returncode == 130 and "--resume" in stderr, stderr[-3000:]
        proc2 = ray_cli(cluster, "tag", catalog, "--out", ray_out, "--shard-size", "2", "--resume")
        assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert_same_output(ray_out, local_out, resumed=proc.returncode != 0)


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_an_existing_folder_at_out_is_refused_and_left_alone(catalog, tmp_path, engine):
    """The issue's reproduction: --out naming a folder that holds the user's file."""
    folder = tmp_path / "that-folder"
    folder.mkdir()
    (folder / "important.txt").write_text("keep me")
    proc = cli("tag", catalog, "--out", folder, "--engine", engine)
    assert proc.returncode == 6, proc.stderr
    assert "is a folder, not a file" in proc.stderr.splitlines()[-1]
    assert sorted(p.name for p in folder.iterdir()) == ["important.txt"]
    assert (folder / "important.txt").read_text() == "keep me"


@pytest.mark.parametrize(("args", "named"), [
    (["--ray-address", "auto"], "--ray-address"),
    (["--concurrency", "2"], "--concurrency"),
    (["--num-gpus-per-worker", "1"], "--num-gpus-per-worker"),
    (["--engine", "ray", "--device", "cuda"], "--num-gpus-per-worker above 0"),
    (["--engine", "ray", "--device", "cpu", "--num-gpus-per-worker", "1"], "--device cpu"),
])
def test_an_option_an_engine_cannot_honour_is_refused(run_cli, catalog, tmp_path, args, named):
    pytest.importorskip("ray")
    result = run_cli("tag", catalog, "--out", tmp_path / "t.parquet", *args)
    assert result.exit_code == 2, result.output
    assert named in result.output
    assert not (tmp_path / "t.parquet").exists() and not (tmp_path / "t.parquet.parts").exists()


def test_a_ray_address_nobody_answers_is_refused_at_once(catalog, tmp_path):
    """Ray itself would retry it for ever; a typo in --ray-address is one sentence instead."""
    pytest.importorskip("ray")
    started = time.monotonic()
    proc = cli("tag", catalog, "--out", tmp_path / "t.parquet", "--engine", "ray", "--ray-address", "127.0.0.1:1")
    assert proc.returncode == 2 and "cannot reach the Ray cluster at 127.0.0.1:1" in proc.stderr, proc.stderr
    assert time.monotonic() - started < 60 and not (tmp_path / "t.parquet.parts").exists()


def test_without_ray_the_engine_says_how_to_install_it(monkeypatch, tmp_path):
    from catalog_tagger.ray_engine import RayEngine
    from catalog_tagger.run import run_tagging

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(UsageError, match=r"pip install 'catalog-tagger\[ray\]'"):
        run_tagging(TagConfig(source=SAMPLE / "images", out=tmp_path / "x.parquet"), engine=RayEngine())
