"""Where images come from: a folder walk or a manifest, as a stream of records.

Finding files is kept apart from decoding them (as timm's readers do): a source only
lists paths, in a deterministic order, so that shard N of a run always holds the same
records and ``--resume`` can skip what was committed.
"""

from __future__ import annotations

import csv
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import SourceError, UsageError
from .schema import pass_through_names

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
_CSV_CHUNK = 10_000
# Parquet manifests are read in small batches with text columns kept dictionary-encoded
# until each cell is checked: a few KB of file can expand to gigabytes (one long value
# repeated in every row), which must become a clear refusal rather than an abort.
_PARQUET_BATCH = 1024
MAX_MANIFEST_CELL = 64 * 1024  # bytes of one text cell; paths, ids and titles are far shorter


@dataclass(frozen=True)
class Record:
    """One image to tag: its position in the run, its id, where it is, and pass-through
    columns (keyed by their output names, see ``schema.pass_through_names``)."""

    ordinal: int
    image_id: str
    path: str
    extra: dict[str, Any] = field(default_factory=dict)
    # Set when the record must not be opened at all: (status, message) for its row.
    problem: tuple[str, str] | None = None
    # Training and evaluation data only: the class name (its sub-folder or label cell);
    # None when the record has none.
    label: str | None = None


@dataclass
class Source:
    """A stream of records plus the Arrow schema of the manifest columns it passes through."""

    records: Iterator[Record]
    # The pass-through columns, under their output names.
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


def walk_folder(root: Path, extensions: tuple[str, ...], label_by_folder: bool = False) -> Iterator[Record]:
    """Files under ``root`` with a wanted extension, hidden ones skipped, in sorted-name
    depth-first order (a sub-folder's files come where its name sorts).

    With ``label_by_folder`` (an image-folder dataset, one sub-folder per class), each
    record's label is the name of the sub-folder of ``root`` it lies in, at any depth, and
    files directly in ``root`` are no records: they belong to no class.

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
    return _walk(root_abs, top, {e.lower().lstrip(".") for e in extensions}, label_by_folder)


def _walk(root: str, top: list[os.DirEntry], wanted: set[str], label_by_folder: bool) -> Iterator[Record]:
    ordinal = 0
    # Each level: its remaining entries, the folder's (device, inode) to spot link loops, and
    # (with label_by_folder) the class sub-folder it lies in, None at the root.
    stack: list[tuple[Iterator[os.DirEntry], tuple[int, int] | None, str | None]] = [
        (iter(top), _folder_identity(root), None)]
    while stack:
        entries, _, label = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        if _is_folder(entry):
            identity = _folder_identity(entry.path)
            if identity is not None and identity in {level[1] for level in stack}:
                log.warning("skipping %s: it links back to a folder that contains it", entry.path)
                continue
            folder_label = (entry.name if label is None else label) if label_by_folder else None
            try:
                stack.append((iter(_list_folder(entry.path)), identity, folder_label))
            except OSError as exc:
                yield Record(ordinal, _relative(entry.path, root), entry.path,
                             problem=("unreadable", f"cannot list folder: {exc.strerror or exc}"), label=folder_label)
                ordinal += 1
        elif "." in entry.name and entry.name.rsplit(".", 1)[-1].lower() in wanted:
            if label_by_folder and label is None:
                continue
            yield Record(ordinal, _relative(entry.path, root), entry.path, label=label)
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
    if "\0" in text:
        return text, ("unsupported", "path contains a NUL byte, which no file name can")
    if os.path.isabs(text):
        if confined:
            return text, ("unsupported", "absolute path refused: paths must be relative to --root")
        return text, None
    path = os.path.normpath(os.path.join(base, text))
    if confined:
        if not _inside(path, base):
            return path, ("unsupported", "path climbs out of --root with '..': refused")
        # A link inside the root may point anywhere: what is opened is where it leads.
        if not _inside(os.path.realpath(path), os.path.realpath(base)):
            return path, ("unsupported", "path leads out of --root through a symbolic link: refused")
    return path, None


def _inside(path: str, folder: str) -> bool:
    folder = os.path.normpath(folder)
    return os.path.commonpath([path, folder]) == folder


def _refuse_repeated(columns: list[str], manifest: Path) -> None:
    repeated = sorted({c for c in columns if c and columns.count(c) > 1})
    if repeated:
        raise SourceError(f"manifest {manifest} has more than one column named {', '.join(map(repr, repeated))}; "
                          "rename them so each column has its own name")


def _manifest_columns(columns: list[str], path_col: str, id_col: str | None, manifest: Path,
                      label_col: str | None = None) -> dict[str, str]:
    """The pass-through columns: manifest name -> output name."""
    _refuse_repeated(columns, manifest)
    if path_col not in columns:
        raise SourceError(f"manifest {manifest} has no column {path_col!r} (columns: {', '.join(columns)}); "
                          "choose one with --path-col")
    if id_col is not None and id_col not in columns:
        raise SourceError(f"manifest {manifest} has no column {id_col!r} for --id-col")
    if label_col is not None and label_col not in columns:
        raise SourceError(f"manifest {manifest} has no column {label_col!r} (columns: {', '.join(columns)}); "
                          "choose one with --label-col")
    return pass_through_names([c for c in columns if c not in (path_col, id_col, label_col)])


# Label cells that mean "no label" (pandas and spreadsheets write missing values so).
_NO_LABEL = {"", "nan", "none", "null"}


def _label(value: Any) -> str | None:
    """A label cell, stripped; None for an empty or missing one."""
    text = "" if _missing(value) else str(value).strip()
    return None if text.lower() in _NO_LABEL else text


def _record(ordinal: int, row: dict[str, Any], path_col: str, id_col: str | None, base: str,
            extras: dict[str, str], confined: bool, label_col: str | None = None) -> Record:
    raw_path = row[path_col]
    path, problem = _resolve(raw_path, base, confined)
    image_id = row.get(id_col) if id_col else None
    if _missing(image_id) or str(image_id) == "":
        image_id = "" if _missing(raw_path) else str(raw_path)
    label = _label(row[label_col]) if label_col is not None else None
    return Record(ordinal, str(image_id), path, {name: row[c] for c, name in extras.items()}, problem, label)


def _base_folder(manifest: Path, root: Path | None) -> str:
    """Where relative manifest paths point: --root when given, else the manifest's folder."""
    return os.path.abspath(root) if root is not None else os.path.dirname(os.path.abspath(manifest))


def read_csv_text(path: Path) -> pd.DataFrame:
    """A whole CSV file (a review file, a tag output) as text cells, exactly as written.

    ``index_col=False``: a delimiter at the end of every data row is dropped rather than
    turning the first column into the index and shifting every other one place left.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pd.errors.ParserWarning)  # "data lost": the empty trailing field
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig", index_col=False)


def _csv_head(manifest: Path) -> tuple[list[str], list[str]]:
    """The header's names as written (pandas has already renamed a repeated ``path`` to
    ``path.1``) and the first data row's fields."""
    with open(manifest, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        return next(reader, []), next(reader, [])


def read_csv_manifest(manifest: Path, path_col: str, id_col: str | None, root: Path | None = None,
                      label_col: str | None = None) -> Source:
    """CSV rows read in chunks; every pass-through column stays text, exactly as written
    (a SKU like 00123 must not become the number 123). With ``label_col``, each record's
    label is read from that column (which then is no pass-through column).

    A delimiter at the end of every data row (``a,b,`` under ``sku,path``, as many
    exporters write) is dropped: pandas would otherwise make the first column the index and
    shift every other one place left. Extra fields that hold text are refused instead.
    """
    try:
        header = pd.read_csv(manifest, nrows=0, encoding="utf-8-sig").columns.tolist()
        written, first = _csv_head(manifest)
    except (OSError, UnicodeDecodeError, csv.Error, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise SourceError(f"cannot read manifest {manifest}: {exc}") from exc
    _refuse_repeated(written, manifest)
    if any(field.strip() for field in first[len(written):]):
        raise SourceError(f"manifest {manifest} has {len(first)} fields in its first row but {len(written)} "
                          "names in its header; name every column or remove the extra fields")
    extras = _manifest_columns(header, path_col, id_col, manifest, label_col)
    base = _base_folder(manifest, root)

    def records() -> Iterator[Record]:
        ordinal = 0
        reader = pd.read_csv(manifest, dtype=str, keep_default_na=False, chunksize=_CSV_CHUNK,
                             encoding="utf-8-sig", index_col=False)
        try:
            while True:
                with warnings.catch_warnings():
                    # The dropped trailing delimiter, checked above to hold nothing.
                    warnings.simplefilter("ignore", pd.errors.ParserWarning)
                    chunk = next(reader, None)
                if chunk is None:
                    break
                for row in chunk.to_dict("records"):
                    yield _record(ordinal, row, path_col, id_col, base, extras, root is not None, label_col)
                    ordinal += 1
        except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
            # Found mid-run: the shards before this point stay committed for --resume.
            raise SourceError(f"manifest {manifest} is malformed after row {ordinal}: {exc}") from exc

    schema = pa.schema([(name, pa.string()) for name in extras.values()])
    return Source(records(), schema, "manifest", str(manifest))


def read_parquet_manifest(manifest: Path, path_col: str, id_col: str | None, root: Path | None = None,
                          label_col: str | None = None) -> Source:
    """Parquet rows streamed batch by batch; pass-through columns keep their Arrow types.
    ``label_col`` as for ``read_csv_manifest``.

    Memory stays bounded whatever the file claims: text columns are read dictionary-encoded,
    and every batch is checked for oversized cells before it is expanded into rows.
    """
    try:
        schema = pq.read_schema(manifest)
        text_columns = [f.name for f in schema if _is_text(f.type)]
        parquet = pq.ParquetFile(manifest, read_dictionary=text_columns)
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"cannot read manifest {manifest}: {exc}") from exc
    extras = _manifest_columns(schema.names, path_col, id_col, manifest, label_col)
    base = _base_folder(manifest, root)

    def records() -> Iterator[Record]:
        ordinal = 0
        try:
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH):
                _check_cells(batch, manifest, ordinal)
                for row in _decoded(batch).to_pylist():
                    yield _record(ordinal, row, path_col, id_col, base, extras, root is not None, label_col)
                    ordinal += 1
        except (OSError, pa.ArrowException, MemoryError) as exc:
            raise SourceError(f"manifest {manifest} is unreadable after row {ordinal}: {exc}") from exc

    return Source(records(), pa.schema([schema.field(c).with_name(name) for c, name in extras.items()]),
                  "manifest", str(manifest))


def _is_text(type_: pa.DataType) -> bool:
    return pa.types.is_string(type_) or pa.types.is_large_string(type_) \
        or pa.types.is_binary(type_) or pa.types.is_large_binary(type_)


def _check_cells(batch: pa.RecordBatch, manifest: Path, ordinal: int) -> None:
    """Refuse a batch holding a text cell longer than MAX_MANIFEST_CELL, before expanding it."""
    for name, column in zip(batch.schema.names, batch.columns):
        values = column.dictionary if pa.types.is_dictionary(column.type) else column
        if not _is_text(values.type) or len(values) == 0:
            continue
        longest = pc.max(pc.binary_length(values)).as_py() or 0
        if longest > MAX_MANIFEST_CELL:
            raise SourceError(f"manifest {manifest} has a value of {longest:,} bytes in column {name!r} near row "
                              f"{ordinal} (at most {MAX_MANIFEST_CELL:,} are read); refusing it")


def _decoded(batch: pa.RecordBatch) -> pa.RecordBatch:
    columns = [c.dictionary_decode() if pa.types.is_dictionary(c.type) else c for c in batch.columns]
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)


def read_manifest(manifest: Path, path_col: str = "path", id_col: str | None = None, root: Path | None = None,
                  label_col: str | None = None) -> Source:
    """A .parquet/.pq manifest read as Parquet, any other file as CSV."""
    if root is not None and not Path(root).is_dir():
        raise SourceError(f"--root {root} is not a folder")
    if MANIFEST_SUFFIXES.get(Path(manifest).suffix.lower()) == "parquet":
        return read_parquet_manifest(manifest, path_col, id_col, root, label_col)
    return read_csv_manifest(manifest, path_col, id_col, root, label_col)


def open_source(source: Path, extensions: tuple[str, ...], path_col: str = "path",
                id_col: str | None = None, root: Path | None = None) -> Source:
    """A folder is walked; a .csv/.parquet file is read as a manifest; anything else is refused."""
    source = Path(source)
    if source.is_dir():
        # A folder has no columns to name: an option meant for a manifest would be ignored,
        # and the user would get ids and paths other than the ones they asked for.
        given = [name for name, value in (("--root", root), ("--id-col", id_col)) if value is not None]
        given += ["--path-col"] if path_col != "path" else []
        if given:
            raise UsageError(f"{' and '.join(given)} name a manifest's columns and folder, but {source} is a "
                             "folder; tag a manifest (CSV or Parquet) or leave them out")
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
