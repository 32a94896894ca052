"""One registry of output formats; the CLI's --format choices are this dict's keys.

Writers take Arrow tables shard by shard, so the final file is streamed, never held
whole in memory. Each writes to the path it is given; making that appear atomically
under the real name is the caller's job.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

# Where a writer writes: a path, or a binary file object opened by the caller.
Sink = Path | BinaryIO

# A text cell starting with one of these is run as a formula by Excel, LibreOffice and
# Google Sheets (CSV injection): '=cmd|' /C calc'!A0', '@SUM(...)', '+1+1'. A leading
# apostrophe makes them show the text instead (OWASP's advice).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


class TableWriter(Protocol):
    def write(self, table: pa.Table) -> None: ...

    def close(self) -> None: ...


class ParquetTableWriter:
    """Parquet with our schema; file metadata carries schema version, classes and model card."""

    def __init__(self, sink: Sink, schema: pa.Schema, top_k: int, escape_formulas: bool = True) -> None:
        # Parquet is read by programs, not typed into cells: values stay exactly as they are.
        self._writer = pq.ParquetWriter(str(sink) if isinstance(sink, Path) else sink, schema, compression="zstd")

    def write(self, table: pa.Table) -> None:
        self._writer.write_table(table)

    def close(self) -> None:
        self._writer.close()


def escape_formula_cells(table: pa.Table) -> pa.Table:
    """Every text cell that a spreadsheet would run as a formula, prefixed with an apostrophe."""
    pattern = "^[" + "".join("\\" + c if c in "-\\" else c for c in FORMULA_STARTS) + "]"
    columns = []
    for col in table.columns:
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            risky = pc.fill_null(pc.match_substring_regex(col, pattern), False)
            col = pc.if_else(risky, pc.binary_join_element_wise("'", col, ""), col)
        columns.append(col)
    return pa.table(columns, names=table.column_names)


def flatten_for_csv(table: pa.Table, top_k: int) -> pa.Table:
    """List columns -> label_2, score_2, ...; timestamps -> 'YYYY-MM-DD HH:MM:SS' (UTC);
    a manifest's nested columns (lists, structs, maps) -> JSON text, binary -> hex.

    Top-1 already sits in label/confidence, so the flattened columns start at 2. Plain
    timestamps without offset or fraction are what spreadsheets recognise as dates.
    """
    columns: dict[str, pa.Array] = {}
    for name in table.column_names:
        col = table[name]
        if name == "topk_labels":
            for k in range(2, top_k + 1):
                columns[f"label_{k}"] = _nth(col, k - 1)
                columns[f"score_{k}"] = _nth(table["topk_scores"], k - 1)
        elif name == "topk_scores":
            continue
        elif pa.types.is_timestamp(col.type):
            # Whole seconds: Arrow would print microseconds after %S, which Excel does not read as a date.
            seconds = col.cast(pa.timestamp("s", tz=col.type.tz), safe=False)
            columns[name] = pc.strftime(seconds, format="%Y-%m-%d %H:%M:%S", locale="C")
        elif pa.types.is_nested(col.type):
            columns[name] = _as_text(col, lambda v: json.dumps(v, ensure_ascii=False, default=str))
        elif _is_binary(col.type):
            columns[name] = _as_text(col, bytes.hex)
        else:
            columns[name] = col
    return pa.table(columns)


def _is_binary(type_: pa.DataType) -> bool:
    return pa.types.is_binary(type_) or pa.types.is_large_binary(type_) or pa.types.is_fixed_size_binary(type_)


def _as_text(col: pa.ChunkedArray, to_text: Callable[[Any], str]) -> pa.ChunkedArray:
    """A column CSV cannot hold, as one string per cell (empty cells stay empty)."""
    return pa.chunked_array([pa.array([None if v is None else to_text(v) for v in col.to_pylist()], pa.string())])


def _nth(col: pa.ChunkedArray, index: int) -> pa.ChunkedArray:
    # list_element fails on short or null lists; pad per row instead.
    values = [v[index] if v is not None and len(v) > index else None for v in col.to_pylist()]
    return pa.chunked_array([pa.array(values, type=col.type.value_type)])


class CsvTableWriter:
    """UTF-8 CSV with one header row and one row per image, as spreadsheets import it."""

    def __init__(self, sink: Sink, schema: pa.Schema, top_k: int, escape_formulas: bool = True) -> None:
        import pyarrow.csv as pacsv

        self._top_k = top_k
        self._escape = escape_formulas
        empty = flatten_for_csv(schema.empty_table(), top_k)
        self._writer = pacsv.CSVWriter(str(sink) if isinstance(sink, Path) else sink, empty.schema,
                                       write_options=pacsv.WriteOptions(include_header=True))

    def write(self, table: pa.Table) -> None:
        flat = flatten_for_csv(table, self._top_k)
        self._writer.write_table(escape_formula_cells(flat) if self._escape else flat)

    def close(self) -> None:
        self._writer.close()


WRITERS: dict[str, type] = {"parquet": ParquetTableWriter, "csv": CsvTableWriter}
SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}


def format_for(path: Path, explicit: str | None) -> str | None:
    """--format wins; else the output's extension; None when neither says."""
    if explicit:
        return explicit
    return SUFFIXES.get(Path(path).suffix.lower())


def open_writer(fmt: str, sink: Sink, schema: pa.Schema, top_k: int, escape_formulas: bool = True) -> TableWriter:
    return WRITERS[fmt](sink, schema, top_k, escape_formulas)
