"""Where images come from: a folder walk or a manifest, as a stream of records.

Finding files is kept apart from decoding them (as timm's readers do): a source only
lists paths, in a deterministic order, so that shard N of a run always holds the same
records and ``--resume`` can skip what was committed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import SourceError

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
_CSV_CHUNK = 10_000


@dataclass(frozen=True)
class Record:
    """One image to tag: its position in the run, its id, where it is, and pass-through columns."""

    ordinal: int
    image_id: str
    path: str
    extra: dict[str, Any] = field(default_factory=dict)
    # Set when the record must not be opened at all: (status, message) for its row.
    problem: tuple[str, str] | None = None


@dataclass
class Source:
    """A stream of records plus the Arrow schema of the manifest columns it passes through."""

    records: Iterator[Record]
    extra_schema: pa.Schema
    kind: str
    description: str


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _list_folder(folder: str) -> list[os.DirEntry]:
    with os.scandir(folder) as it:
        return sorted((e for e in it if not _hidden(e.name)), key=lambda e: e.name)


def _folder_identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks: catalogs are often assembled from linked folders
    except OSError:
        return False


def walk_folder(root: Path, extensions: tuple[str, ...]) -> Iterator[Record]:
    """Files under ``root`` with a wanted extension, hidden ones skipped, in sorted-name
    depth-first order (a sub-folder's files come where its name sorts).

    Linked folders are followed, except a link back into the folders being walked. A
    sub-folder that cannot be listed becomes one "unreadable" row rather than a silent
    gap; a root that cannot be listed is a ``SourceError``, not an empty output. Only the
    folders on the current path are listed in memory, never the whole tree.
    """
    root_abs = os.path.abspath(root)
    try:
        top = _list_folder(root_abs)
    except OSError as exc:
        raise SourceError(f"cannot read folder {root}: {exc.strerror or exc}") from exc
    return _walk(root_abs, top, {e.lower().lstrip(".") for e in extensions})


def _walk(root: str, top: list[os.DirEntry], wanted: set[str]) -> Iterator[Record]:
    ordinal = 0
    # Each level: its remaining entries and the folder's (device, inode), to spot link loops.
    stack = [(iter(top), _folder_identity(root))]
    while stack:
        entry = next(stack[-1][0], None)
        if entry is None:
            stack.pop()
            continue
        if _is_folder(entry):
            identity = _folder_identity(entry.path)
            if identity is not None and identity in {level[1] for level in stack}:
                log.warning("skipping %s: it links back to a folder that contains it", entry.path)
                continue
            try:
                stack.append((iter(_list_folder(entry.path)), identity))
            except OSError as exc:
                yield Record(ordinal, _relative(entry.path, root), entry.path,
                             problem=("unreadable", f"cannot list folder: {exc.strerror or exc}"))
                ordinal += 1
        elif "." in entry.name and entry.name.rsplit(".", 1)[-1].lower() in wanted:
            yield Record(ordinal, _relative(entry.path, root), entry.path)
            ordinal += 1


def _relative(path: str, root: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def _missing(value: Any) -> bool:
    """A manifest cell with no value: None, or NaN from a Parquet manifest."""
    return value is None or (isinstance(value, float) and pd.isna(value))


def _resolve(value: Any, base: str, confined: bool) -> tuple[str, tuple[str, str] | None]:
    """The path to open, and a problem when there is none to open.

    With ``confined`` (--root given), paths must stay inside ``base``: absolute paths and
    paths that climb out with '..' are refused, so a manifest cannot reach other files.
    """
    text = "" if _missing(value) else str(value).strip()
    if not text:
        return "", ("missing", "empty path in manifest")
    if os.path.isabs(text):
        if confined:
            return text, ("unsupported", "absolute path refused: paths must be relative to --root")
        return text, None
    path = os.path.normpath(os.path.join(base, text))
    if confined and os.path.commonpath([path, os.path.normpath(base)]) != os.path.normpath(base):
        return path, ("unsupported", "path climbs out of --root with '..': refused")
    return path, None


def _manifest_columns(columns: list[str], path_col: str, id_col: str | None, manifest: Path) -> list[str]:
    if path_col not in columns:
        raise SourceError(f"manifest {manifest} has no column {path_col!r} (columns: {', '.join(columns)}); "
                          "choose one with --path-col")
    if id_col is not None and id_col not in columns:
        raise SourceError(f"manifest {manifest} has no column {id_col!r} for --id-col")
    return [c for c in columns if c not in (path_col, id_col)]


def _record(ordinal: int, row: dict[str, Any], path_col: str, id_col: str | None, base: str,
            extras: list[str], confined: bool) -> Record:
    raw_path = row[path_col]
    path, problem = _resolve(raw_path, base, confined)
    image_id = row.get(id_col) if id_col else None
    if _missing(image_id) or str(image_id) == "":
        image_id = "" if _missing(raw_path) else str(raw_path)
    return Record(ordinal, str(image_id), path, {c: row[c] for c in extras}, problem)


def _base_folder(manifest: Path, root: Path | None) -> str:
    """Where relative manifest paths point: --root when given, else the manifest's folder."""
    return os.path.abspath(root) if root is not None else os.path.dirname(os.path.abspath(manifest))


def read_csv_manifest(manifest: Path, path_col: str, id_col: str | None, root: Path | None = None) -> Source:
    """CSV rows read in chunks; every pass-through column stays text, exactly as written
    (a SKU like 00123 must not become the number 123)."""
    try:
        header = pd.read_csv(manifest, nrows=0, encoding="utf-8-sig").columns.tolist()
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise SourceError(f"cannot read manifest {manifest}: {exc}") from exc
    extras = _manifest_columns(header, path_col, id_col, manifest)
    base = _base_folder(manifest, root)

    def records() -> Iterator[Record]:
        ordinal = 0
        reader = pd.read_csv(manifest, dtype=str, keep_default_na=False, chunksize=_CSV_CHUNK,
                             encoding="utf-8-sig")
        try:
            for chunk in reader:
                for row in chunk.to_dict("records"):
                    yield _record(ordinal, row, path_col, id_col, base, extras, root is not None)
                    ordinal += 1
        except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
            # Found mid-run: the shards before this point stay committed for --resume.
            raise SourceError(f"manifest {manifest} is malformed after row {ordinal}: {exc}") from exc

    schema = pa.schema([(c, pa.string()) for c in extras])
    return Source(records(), schema, "manifest", str(manifest))


def read_parquet_manifest(manifest: Path, path_col: str, id_col: str | None, root: Path | None = None) -> Source:
    """Parquet rows streamed batch by batch; pass-through columns keep their Arrow types."""
    try:
        parquet = pq.ParquetFile(manifest)
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"cannot read manifest {manifest}: {exc}") from exc
    schema = parquet.schema_arrow
    extras = _manifest_columns(schema.names, path_col, id_col, manifest)
    base = _base_folder(manifest, root)

    def records() -> Iterator[Record]:
        ordinal = 0
        try:
            for batch in parquet.iter_batches(batch_size=_CSV_CHUNK):
                for row in batch.to_pylist():
                    yield _record(ordinal, row, path_col, id_col, base, extras, root is not None)
                    ordinal += 1
        except (OSError, pa.ArrowException) as exc:
            raise SourceError(f"manifest {manifest} is unreadable after row {ordinal}: {exc}") from exc

    return Source(records(), pa.schema([schema.field(c) for c in extras]), "manifest", str(manifest))


def open_source(source: Path, extensions: tuple[str, ...], path_col: str = "path",
                id_col: str | None = None, root: Path | None = None) -> Source:
    """A folder is walked; a .csv/.parquet file is read as a manifest; anything else is refused."""
    source = Path(source)
    if source.is_dir():
        return Source(walk_folder(source, extensions), pa.schema([]), "folder", str(source))
    if not source.exists():
        raise SourceError(f"source not found: {source}")
    kind = MANIFEST_SUFFIXES.get(source.suffix.lower())
    if root is not None and not Path(root).is_dir():
        raise SourceError(f"--root {root} is not a folder")
    if kind == "csv":
        return read_csv_manifest(source, path_col, id_col, root)
    if kind == "parquet":
        return read_parquet_manifest(source, path_col, id_col, root)
    raise SourceError(f"{source} is neither a folder nor a manifest (.csv or .parquet)")
