"""The tagging run: one plan for every engine, shards committed as they finish, one output.

    source --> shards of records --(not committed yet)--> carried over from --incremental
                                                      \\-> engine.tag: the rest, on this machine or a cluster
           --> commit_shard --> OUT.parts/shard-NNNNNN.parquet (the run's own shard store, see shards.py)
    all shards, in order --> writer --> temporary file --> renamed to OUT (atomic)

The engine (``engines``) only tags the shards it is handed; checking and locking the
output, resume, ``--incremental``, committing, assembling the file and the summary happen
here, once, so both engines write the same file with the same columns and summary.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import socket
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from .calibration import threshold_for_precision
from .checkpoint import LoadedModel, atomic_write_json, load_model, shareable_mode
from .config import TagConfig
from .engines import Engine, LocalEngine, PendingShard, ShardJob
from .errors import Interrupted, OutputError, SourceError, TooManyErrors, UsageError
from .incremental import PreviousOutput
from .outputs import (
    lock_path,
    open_lock,
    output_mode,
    parts_dir,
    refuse_foreign,
    refuse_inputs,
    resolve_output,
    summary_path,
)
from .precision_check import PrecisionCheck, check_target_precision
from .schema import MODEL_STATUSES, SCHEMA_VERSION, SCHEMA_VERSION_KEY, output_schema
from .shards import chunks, commit_shard, is_committed, prepare_parts, run_identity, shard_fingerprint, shard_path
from .sources import Record, open_source
from .tagging import TagSettings
from .writers import WRITERS, format_for, open_writer

log = logging.getLogger(__name__)


@dataclass
class Summary:
    output: str
    run_id: str
    total: int = 0
    by_status: Counter = field(default_factory=Counter)
    by_label: Counter = field(default_factory=Counter)
    needs_review: int = 0
    processed: int = 0
    carried_over: int = 0
    resumed_rows: int = 0
    seconds: float = 0.0
    review_threshold: float = 0.5
    review_rule: str = ""
    # Only with --target-precision: whether that precision holds on photos like today's.
    precision_check: PrecisionCheck | None = None
    engine: str = "local"
    # Images tagged on each machine of a cluster (Ray node id -> images); empty on one machine.
    images_by_node: dict[str, int] = field(default_factory=dict)

    @property
    def failed(self) -> int:
        """Rows whose file could not be tagged; an out-of-scope photo was read and judged."""
        return self.total - sum(self.by_status.get(s, 0) for s in MODEL_STATUSES)

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def count(self, table: pa.Table) -> None:
        self.total += table.num_rows
        self.by_status.update(s for s in table["status"].to_pylist())
        self.by_label.update(lbl for lbl in table["label"].to_pylist() if lbl is not None)
        self.needs_review += sum(1 for v in table["needs_review"].to_pylist() if v)

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.output, "run_id": self.run_id, "total": self.total,
            "by_status": dict(sorted(self.by_status.items())), "by_label": dict(sorted(self.by_label.items())),
            "needs_review": self.needs_review, "failed": self.failed, "processed": self.processed,
            "carried_over": self.carried_over, "resumed_rows": self.resumed_rows,
            "review_threshold": round(self.review_threshold, 6), "review_rule": self.review_rule,
            **({"target_precision_verified": self.precision_check.verified,
                "target_precision_note": self.precision_check.reason} if self.precision_check else {}),
            "seconds": round(self.seconds, 3), "images_per_second": round(self.images_per_second, 1),
            "engine": self.engine, **({"images_by_node": self.images_by_node} if self.images_by_node else {}),
        }

    def text(self) -> str:
        labels = ", ".join(f"{k} {v}" for k, v in self.by_label.most_common())
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(self.by_status.items()))
        return (f"tagged {self.total} images -> {self.output}\n"
                f"  status: {statuses or 'none'}\n  labels: {labels or 'none'}\n"
                f"  needs review: {self.needs_review} ({self.review_rule})\n"
                + (f"  precision {'verified' if self.precision_check.verified else 'NOT verified'}: "
                   f"{self.precision_check.reason}\n" if self.precision_check else "") +
                f"  {self.processed} decoded in {self.seconds:.1f}s ({self.images_per_second:.1f} images/s)"
                + (f", {self.carried_over} carried over" if self.carried_over else "")
                + (f", {self.resumed_rows} from committed shards" if self.resumed_rows else "")
                + (f", on {len(self.images_by_node)} {self.engine} nodes" if self.images_by_node else ""))


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """An exclusive POSIX lock on OUT.lock: the kernel drops it when its holder dies, so a
    lock file left by a killed run is recognised as free and simply taken over.

    POSIX (lockf) rather than flock: flock locks are shared with forked children, so
    decoding workers orphaned by a kill -9 would keep the lock for seconds.
    """
    fh = open_lock(lock_path(out))
    try:
        try:
            fcntl.lockf(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise OutputError(f"{out} is being written by another run ({holder}); "
                              "wait for it or remove that run") from None
        try:
            # Unbuffered: a buffered write that failed would fail again in close().
            os.ftruncate(fh.fileno(), 0)
            os.pwrite(fh.fileno(), f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        except OSError as exc:  # a disk already full: nothing of the run is written yet
            raise OutputError(f"cannot write the lock file {lock_path(out)}: {exc.strerror or exc}; "
                              "make room and run again") from exc
        yield
    finally:
        fh.close()  # releases the lock; the file may stay, it is harmless


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (what cron, systemd and kill send) stops the run like Ctrl-C does."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_tagging(config: TagConfig, progress: bool = True, engine: Engine | None = None) -> Summary:
    """Tag every record of ``config.source`` into ``config.out`` with ``engine`` (default: this
    machine); returns the summary.

    Raises ``Interrupted`` when stopped by a signal, after keeping the finished shards.
    """
    engine = engine or LocalEngine()
    out = resolve_output(Path(config.out))  # first: a folder at --out is refused as a folder
    fmt = format_for(Path(config.out), config.format)
    if fmt not in WRITERS:
        raise UsageError(f"cannot tell the output format from {Path(config.out).name!r}; "
                         "use a .parquet or .csv name or --format")
    source = open_source(config.source, config.extensions, config.path_col, config.id_col, config.root)
    loaded = load_model(config.model)
    check_inputs(config, out, loaded)
    refuse_foreign(out)  # after check_inputs, whose message is the more precise one
    threshold, rule = review_threshold(config, loaded)
    previous = (PreviousOutput.load(config.incremental, loaded.ident, config.hash, threshold, config.top_k)
                if config.incremental else None)
    settings = TagSettings(batch_size=config.batch_size, top_k=config.top_k, review_threshold=threshold,
                           max_pixels=config.max_pixels, hash=config.hash, time_limit=config.time_limit)
    metadata = {SCHEMA_VERSION_KEY: SCHEMA_VERSION, "classes": list(loaded.classes),
                "model_card": loaded.card}
    schema = output_schema(source.extra_schema, metadata)
    # Not part of the identity: the engine. A run killed on a cluster may be resumed here.
    identity = run_identity(config, fmt, loaded.ident, os.path.abspath(config.source))
    parts = parts_dir(out)

    try:
        engine.check(config)
        with output_lock(out), sigterm_as_interrupt():
            run_id = prepare_parts(parts, identity, config.resume or config.resume_if_possible,
                                   restart_other=config.resume_if_possible)
            summary = Summary(output=str(out), run_id=run_id, review_threshold=threshold, review_rule=rule,
                              engine=engine.name)
            started = time.perf_counter()
            shard_paths = _tag_pending(engine, ShardJob(loaded, settings, run_id, schema), source.records,
                                       config.shard_size, parts, previous, summary, progress)
            summary.seconds = time.perf_counter() - started
            summary.images_by_node = dict(engine.images_by_node)
            statuses = pa.concat_arrays([pq.read_table(p, columns=["status"])["status"].combine_chunks()
                                         for p in shard_paths]) if shard_paths else pa.array([], pa.string())
            check_not_shrunk(config, len(statuses), previous, parts, _found(statuses), out.exists())
            if config.target_precision is not None:
                summary.precision_check = check_target_precision(loaded.card, threshold, _confidences(shard_paths))
                if not summary.precision_check.verified:
                    log.warning("--target-precision %g: %s", config.target_precision,
                                summary.precision_check.reason)
                schema = schema.with_metadata({**schema.metadata, **summary.precision_check.metadata()})
            _assemble(shard_paths, out, fmt, schema, config.top_k, summary, config.escape_formulas)
            atomic_write_json(summary_path(out), summary.to_dict())
            shutil.rmtree(parts, ignore_errors=True)
    finally:
        engine.close()
    return summary


def _tag_pending(engine: Engine, job: ShardJob, records: Iterator[Record], shard_size: int, parts: Path,
                 previous: PreviousOutput | None, summary: Summary, progress: bool) -> list[Path]:
    """Hand every shard not committed yet to ``engine`` and commit what it returns; the
    paths of all the run's shards, in order."""
    shard_paths: list[Path] = []
    # Shards handed to the engine and not back yet: all their records, and which were carried over.
    waiting: dict[int, tuple[list[Record], dict[int, int], list[int]]] = {}
    bar = tqdm(desc="tag", unit="img", disable=not progress, smoothing=0.1)

    def pending() -> Iterator[PendingShard]:
        for index, shard in enumerate(chunks(records, shard_size)):
            path = shard_path(parts, index)
            shard_paths.append(path)
            if is_committed(path, shard):
                summary.resumed_rows += len(shard)
                bar.update(len(shard))
                continue
            carried, todo = previous.split(shard) if previous else ({}, list(range(len(shard))))
            summary.carried_over += len(carried)
            bar.update(len(carried))
            waiting[index] = (shard, carried, todo)
            yield PendingShard(index, [shard[i] for i in todo])

    try:
        for done, fresh in engine.tag(pending(), job, bar.update):
            shard, carried, todo = waiting.pop(done.index)
            _commit_tagged(shard_path(parts, done.index), shard, carried, todo, fresh, job.schema, previous)
            summary.processed += len(todo)
    except KeyboardInterrupt:
        bar.close()
        raise Interrupted(f"stopped; {len([p for p in shard_paths if p.exists()])} finished shard(s) kept in "
                          f"{parts}; run the same command with --resume to finish") from None
    bar.close()
    return shard_paths


def _confidences(shard_paths: list[Path]) -> np.ndarray:
    """The top-1 confidence of every labeled row in the shards (two columns read)."""
    tables = [pq.read_table(p, columns=["status", "confidence"]) for p in shard_paths]
    values = [t.filter(pc.equal(t["status"], "ok"))["confidence"].to_numpy(zero_copy_only=False) for t in tables]
    return np.concatenate(values) if values else np.empty(0)


def check_inputs(config: TagConfig, out: Path, loaded: LoadedModel) -> None:
    """Options that only the loaded model can judge, and outputs that would overwrite an input."""
    if config.top_k > len(loaded.classes):
        raise UsageError(f"--top-k {config.top_k} is more than the model's {len(loaded.classes)} classes")
    source = Path(config.source)
    refuse_inputs(out, [("the source", None if source.is_dir() else source),
                        ("the model's weights", loaded.weights_path), ("the model's card", loaded.card_path),
                        ("--root", config.root)], previous=config.incremental)


def _found(statuses: pa.Array) -> int:
    """Rows whose file was there (any status but ``missing``)."""
    return len(statuses) - int(pc.sum(pc.equal(statuses, "missing")).as_py() or 0)


def check_not_shrunk(config: TagConfig, total: int, previous: PreviousOutput | None, parts: Path,
                     found: int | None = None, out_exists: bool = False) -> None:
    """Stop before replacing the output when the source looks gone rather than changed.

    An unmounted share or an emptied folder looks like a source with no images; writing
    that would wipe yesterday's output (and, in a nightly job, the history it carries). A
    manifest whose share is unmounted still lists every photo, each one ``missing``: so the
    photos ``found`` count too, against the previous output's and, with an output to keep,
    against none at all.
    """
    if total == 0:
        if parts.is_dir() and len(list(parts.iterdir())) <= 1:  # nothing but our run state
            shutil.rmtree(parts, ignore_errors=True)
        raise SourceError(f"{config.source} has no images to tag (an unmounted share or an emptied folder?); "
                          "nothing was written and the previous output is kept")
    found = total if found is None else found
    if found == 0 and (out_exists or previous is not None):
        _drop_shards(parts)
        raise SourceError(f"none of the {total} files listed by {config.source} exists (an unmounted share?); "
                          "nothing was written and the previous output is kept")
    if previous is None or config.max_shrink >= 1:
        return
    before = previous.table.num_rows
    if before and total < before * (1 - config.max_shrink):
        raise SourceError(f"{config.source} has {total} images against {before} in {config.incremental}, "
                          f"{1 - total / before:.0%} fewer (more than --max-shrink {config.max_shrink:g}); "
                          "the previous output is kept: check the source, or re-run with --resume and "
                          "a larger --max-shrink if the catalog really shrank")
    found_before = _found(previous.table["status"].combine_chunks())
    if found_before and found < found_before * (1 - config.max_shrink):
        _drop_shards(parts)
        raise SourceError(f"only {found} of the {total} files listed by {config.source} exist, against "
                          f"{found_before} in {config.incremental}, {1 - found / found_before:.0%} fewer (more than "
                          f"--max-shrink {config.max_shrink:g}; an unmounted share?); the previous output is "
                          "kept: check the source, or re-run with a larger --max-shrink if the files are gone")


def _drop_shards(parts: Path) -> None:
    """Remove this run's shard store (ours: ``prepare_parts`` checked it): shards that
    recorded a share's files as missing must not be resumed once it is back."""
    shutil.rmtree(parts, ignore_errors=True)


def review_threshold(config: TagConfig, loaded: LoadedModel) -> tuple[float, str]:
    """The confidence below which rows need review, and a sentence saying where it came from."""
    if config.target_precision is None:
        return config.review_threshold, f"confidence < {config.review_threshold:g}"
    table = (loaded.card.get("calibration") or {}).get("review_table")
    if not table:
        raise UsageError("--target-precision needs a calibrated model (its card has no calibration table); "
                         "re-train it or use --review-threshold")
    chosen = threshold_for_precision(table, config.target_precision)
    if chosen is None:
        raise UsageError(f"no threshold reaches precision {config.target_precision:g} on this model's validation "
                         "data; lower --target-precision")
    threshold, precision, coverage = chosen
    fitted_on = (loaded.card.get("calibration") or {}).get("fitted_on") or "validation data"
    return threshold, (f"confidence < {threshold:.4f}, chosen for precision {config.target_precision:g} on "
                       f"{fitted_on}: {precision:.3f} precision, {coverage:.1%} auto-accepted there")


def check_error_rate(summary: Summary, max_error_rate: float | None) -> None:
    """Raise ``TooManyErrors`` when more than ``max_error_rate`` of the images failed.

    Called after the output is written, so cron can alert without losing the good rows.
    """
    if max_error_rate is None or not summary.total:
        return
    share = summary.failed / summary.total
    if share > max_error_rate:
        raise TooManyErrors(f"{summary.failed} of {summary.total} images failed ({share:.1%} > "
                            f"--max-error-rate {max_error_rate:.1%}); output written to {summary.output}")


def _commit_tagged(path: Path, records: list[Record], carried: dict[int, int], todo: list[int], fresh: pa.Table,
                   schema: pa.Schema, previous: PreviousOutput | None) -> None:
    """Commit a shard: the rows the engine tagged, with the carried-over rows merged in."""
    table = previous.merge(records, carried, todo, fresh, schema) if previous is not None else fresh
    commit_shard(path, table, shard_fingerprint(records))


def _assemble(shard_paths: list[Path], out: Path, fmt: str, schema: pa.Schema, top_k: int, summary: Summary,
              escape_formulas: bool = True) -> None:
    """Stream every shard, in order, into a temporary file, then rename it over OUT."""
    # Temporary files of runs killed during this step; we hold the lock, so none is live.
    for stale in out.parent.glob(f".{out.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        # Created here, exclusively and without following a link, so that nothing planted
        # under the temporary name can redirect the write.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, shareable_mode())
        with os.fdopen(fd, "wb") as sink:
            mode = output_mode(out)
            if mode is not None:  # the umask must not widen or narrow what the owner chose
                os.fchmod(fd, mode)
            writer = open_writer(fmt, sink, schema, top_k, escape_formulas)
            try:
                for path in shard_paths:
                    table = pq.read_table(path).cast(schema)
                    summary.count(table)
                    writer.write(table)
                if not shard_paths:
                    writer.write(schema.empty_table())
            finally:
                writer.close()
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}; the previous output is untouched and "
                          f"finished shards are kept in {parts_dir(out)}: free some space and re-run with "
                          "--resume") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
