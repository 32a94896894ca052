"""The shard store of a tagging run: ``OUT.parts/``, owned by the run, one file per shard.

    records --chunks--> shards --(an engine tags them)--> commit_shard --> OUT.parts/shard-NNNNNN.parquet

A shard file appears by rename only once complete, so after a crash or ``kill -9`` the
parts folder holds exactly the finished shards and ``--resume`` redoes none of them. Each
shard remembers the records it was made from (see ``shard_fingerprint``): when the folder
or manifest changed before the resume, the shards that no longer match are tagged again.
Every engine commits through these functions, so a run started on one engine can be
resumed on another.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .checkpoint import atomic_write_json
from .config import TagConfig
from .errors import OutputError, UsageError
from .outputs import RUN_STATE, owned_parts, refuse_foreign_parts
from .schema import SCHEMA_VERSION
from .sources import Record

log = logging.getLogger(__name__)


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


def shard_path(parts: Path, index: int) -> Path:
    return parts / f"shard-{index:06d}.parquet"
