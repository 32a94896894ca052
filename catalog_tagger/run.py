"""The tagging run: shards committed as they finish, resume, incremental runs, one lock.

    source --> shards of records --> Tagger.tag_records --> OUT.parts/shard-NNNNNN.parquet
                                                       \\-> carried over from --incremental
    all shards, in order --> writer --> temporary file --> renamed to OUT (atomic)

A shard file appears by rename only once complete, so after a crash or ``kill -9`` the
parts folder holds exactly the finished shards and ``--resume`` redoes none of them. Each
shard remembers the records it was made from (see ``shard_fingerprint``): when the folder
or manifest changed before the resume, the shards that no longer match are tagged again.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
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
from .errors import Interrupted, OutputError, SourceError, TooManyErrors, UsageError
from .incremental import PreviousOutput
from .outputs import (
    RUN_STATE,
    lock_path,
    open_lock,
    owned_parts,
    parts_dir,
    refuse_foreign_parts,
    refuse_inputs,
    resolve_output,
    summary_path,
)
from .precision_check import PrecisionCheck, check_target_precision
from .runtime import resolve_device, resolve_workers
from .schema import MODEL_STATUSES, SCHEMA_VERSION, output_schema
from .sources import Record, open_source
from .tagging import Tagger, TagSettings
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
                + (f", {self.resumed_rows} from committed shards" if self.resumed_rows else ""))


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
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
        fh.flush()
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


def chunks(records: Iterator[Record], size: int) -> Iterator[list[Record]]:
    while chunk := list(itertools.islice(records, size)):
        yield chunk


def run_identity(config: TagConfig, fmt: str, model_ident: str, source: str) -> dict[str, Any]:
    """What must match for --resume to continue a run: same input, model and row-shaping options."""
    return {"source": source, "model": model_ident, "shard_size": config.shard_size, "top_k": config.top_k,
            "review_threshold": config.review_threshold, "target_precision": config.target_precision,
            "format": fmt, "hash": config.hash,
            "incremental": str(config.incremental) if config.incremental else None,
            "path_col": config.path_col, "id_col": config.id_col, "root": str(config.root) if config.root else None,
            "extensions": list(config.extensions), "max_pixels": config.max_pixels, "time_limit": config.time_limit,
            "escape_formulas": config.escape_formulas, "schema_version": SCHEMA_VERSION}


def prepare_parts(parts: Path, identity: dict[str, Any], resume: bool, restart_other: bool = False) -> str:
    """Create or reuse the parts folder; returns the run id.

    With ``resume``, an unfinished run of other inputs or options is refused, unless
    ``restart_other`` (--resume-if-possible, for unattended jobs) says to start over.
    Only a folder this program made is ever emptied (see ``outputs``).
    """
    refuse_foreign_parts(parts)
    # Underscore: Parquet dataset readers skip such files in a folder of parts.
    state_file = parts / RUN_STATE
    if owned_parts(parts) and resume:
        try:
            state = json.loads(state_file.read_text())
        except (OSError, json.JSONDecodeError):
            state = {}
        if state.get("identity") == identity:
            log.info("resuming run %s from %s", state["run_id"], parts)
            return str(state["run_id"])
        if not restart_other:
            raise UsageError(f"the unfinished run in {parts} used other inputs or options; "
                             "re-run with the same ones, or without --resume to start over")
    if owned_parts(parts):
        log.warning("discarding unfinished run in %s%s", parts,
                    " (it used other inputs or options)" if resume else " (pass --resume to continue it)")
        shutil.rmtree(parts)
    elif parts.is_dir():
        parts.rmdir()  # empty (refuse_foreign_parts let it through)
    parts.mkdir(parents=True)
    run_id = uuid.uuid4().hex[:16]
    atomic_write_json(state_file, {"run_id": run_id, "identity": identity})
    return run_id


# Key of the shard fingerprint in a shard file's Parquet metadata.
_FINGERPRINT_KEY = b"catalog_tagger_records"


def shard_fingerprint(records: Sequence[Record]) -> str:
    """A digest of what a shard was made from: each record's position, id, path and manifest
    columns, and its file's size and modification time.

    Between an interrupted run and its resume, files may be added, removed or replaced;
    the records then shift between shards. A committed shard is reused only when its
    fingerprint still matches, so a changed source can neither drop a row nor repeat one.
    """
    digest = hashlib.sha256()
    for record in records:
        stat = None
        if record.problem is None:
            try:
                st = os.stat(record.path)
                stat = (st.st_size, st.st_mtime_ns)
            except OSError:
                pass
        key = (record.ordinal, record.image_id, record.path, record.problem, list(record.extra.items()), stat)
        digest.update(repr(key).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def commit_shard(path: Path, table: pa.Table, fingerprint: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), _FINGERPRINT_KEY: fingerprint})
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # disk full, quota, file size limit, read-only folder
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}; finished shards are kept, "
                          "free some space and re-run with --resume") from exc


def is_committed(path: Path, records: Sequence[Record]) -> bool:
    """Whether a finished shard made from exactly ``records`` is on disk (reads only its footer)."""
    if not path.exists():
        return False
    try:
        metadata = pq.read_metadata(path)
    except (OSError, pa.ArrowException):
        log.warning("shard %s is unreadable; redoing it", path)
        return False
    stored = (metadata.metadata or {}).get(_FINGERPRINT_KEY, b"").decode()
    if metadata.num_rows != len(records) or stored != shard_fingerprint(records):
        log.info("the images of %s changed since it was written; tagging them again", path.name)
        return False
    return True


def run_tagging(config: TagConfig, progress: bool = True) -> Summary:
    """Tag every record of ``config.source`` into ``config.out``; returns the summary.

    Raises ``Interrupted`` when stopped by a signal, after keeping the finished shards.
    """
    fmt = format_for(Path(config.out), config.format)
    if fmt not in WRITERS:
        raise UsageError(f"cannot tell the output format from {Path(config.out).name!r}; "
                         "use a .parquet or .csv name or --format")
    out = resolve_output(Path(config.out))
    source = open_source(config.source, config.extensions, config.path_col, config.id_col, config.root)
    loaded = load_model(config.model)
    check_inputs(config, out, loaded)
    device = resolve_device(config.device)
    threshold, rule = review_threshold(config, loaded)
    previous = (PreviousOutput.load(config.incremental, loaded.ident, config.hash, threshold, config.top_k)
                if config.incremental else None)
    settings = TagSettings(batch_size=config.batch_size,
                           workers=resolve_workers(config.workers),
                           top_k=config.top_k, review_threshold=threshold,
                           max_pixels=config.max_pixels, hash=config.hash, time_limit=config.time_limit)
    metadata = {"catalog_tagger_schema_version": SCHEMA_VERSION, "classes": list(loaded.classes),
                "model_card": loaded.card}
    schema = output_schema(source.extra_schema, metadata)
    identity = run_identity(config, fmt, loaded.ident, os.path.abspath(config.source))
    parts = parts_dir(out)

    with output_lock(out), sigterm_as_interrupt():
        run_id = prepare_parts(parts, identity, config.resume or config.resume_if_possible,
                               restart_other=config.resume_if_possible)
        tagger = Tagger(loaded, device, settings, run_id)
        summary = Summary(output=str(out), run_id=run_id, review_threshold=threshold, review_rule=rule)
        started = time.perf_counter()
        shard_paths: list[Path] = []
        bar = tqdm(desc="tag", unit="img", disable=not progress, smoothing=0.1)
        try:
            for index, records in enumerate(chunks(source.records, config.shard_size)):
                path = parts / f"shard-{index:06d}.parquet"
                shard_paths.append(path)
                if is_committed(path, records):
                    summary.resumed_rows += len(records)
                    bar.update(len(records))
                    continue
                table = _tag_shard(tagger, records, schema, previous, summary, bar)
                commit_shard(path, table, shard_fingerprint(records))
        except KeyboardInterrupt:
            bar.close()
            raise Interrupted(f"stopped; {len([p for p in shard_paths if p.exists()])} finished shard(s) kept in "
                              f"{parts}; run the same command with --resume to finish") from None
        bar.close()
        summary.seconds = time.perf_counter() - started
        check_not_shrunk(config, sum(pq.read_metadata(p).num_rows for p in shard_paths), previous, parts)
        if config.target_precision is not None:
            summary.precision_check = check_target_precision(loaded.card, threshold, _confidences(shard_paths))
            if not summary.precision_check.verified:
                log.warning("--target-precision %g: %s", config.target_precision, summary.precision_check.reason)
            schema = schema.with_metadata({**schema.metadata, **summary.precision_check.metadata()})
        _assemble(shard_paths, out, fmt, schema, config.top_k, summary, config.escape_formulas)
        atomic_write_json(summary_path(out), summary.to_dict())
        shutil.rmtree(parts, ignore_errors=True)
    return summary


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


def check_not_shrunk(config: TagConfig, total: int, previous: PreviousOutput | None, parts: Path) -> None:
    """Stop before replacing the output when the source looks gone rather than changed.

    An unmounted share or an emptied folder looks like a source with no images; writing
    that would wipe yesterday's output (and, in a nightly job, the history it carries).
    """
    if total == 0:
        if parts.is_dir() and len(list(parts.iterdir())) <= 1:  # nothing but our run state
            shutil.rmtree(parts, ignore_errors=True)
        raise SourceError(f"{config.source} has no images to tag (an unmounted share or an emptied folder?); "
                          "nothing was written and the previous output is kept")
    if previous is None or config.max_shrink >= 1:
        return
    before = previous.table.num_rows
    if before and total < before * (1 - config.max_shrink):
        raise SourceError(f"{config.source} has {total} images against {before} in {config.incremental}, "
                          f"{1 - total / before:.0%} fewer (more than --max-shrink {config.max_shrink:g}); "
                          "the previous output is kept: check the source, or re-run with --resume and "
                          "a larger --max-shrink if the catalog really shrank")


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


def _tag_shard(tagger: Tagger, records: list[Record], schema: pa.Schema, previous: PreviousOutput | None,
               summary: Summary, bar: tqdm) -> pa.Table:
    """Tag a shard, taking unchanged images from the previous output when incremental."""
    if previous is None:
        table = tagger.tag_records(records, schema, on_batch=bar.update)
        summary.processed += len(records)
        return table
    carried, todo = previous.split(records)
    fresh = tagger.tag_records([records[i] for i in todo], schema, on_batch=bar.update)
    summary.processed += len(todo)
    summary.carried_over += len(carried)
    bar.update(len(carried))
    return previous.merge(records, carried, todo, fresh, schema)


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
