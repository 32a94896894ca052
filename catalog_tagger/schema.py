"""The output table: its columns, their Arrow types, and how rows become a table."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

# 2: status can be "out_of_scope" (a photo of none of the classes; label null, error says why).
SCHEMA_VERSION = "2"
# The Parquet file-metadata key that holds it; every version wrote it, so it marks our outputs.
SCHEMA_VERSION_KEY = "catalog_tagger_schema_version"

TIMESTAMP = pa.timestamp("us", tz="UTC")

OUTPUT_FIELDS: tuple[pa.Field, ...] = (
    pa.field("image_id", pa.string()),
    pa.field("path", pa.string()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("label", pa.string()),
    pa.field("label_id", pa.int16()),
    pa.field("confidence", pa.float32()),
    pa.field("topk_labels", pa.list_(pa.string())),
    pa.field("topk_scores", pa.list_(pa.float32())),
    pa.field("needs_review", pa.bool_()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("file_size", pa.int64()),
    pa.field("mtime", TIMESTAMP),
    pa.field("sha256", pa.string()),
    pa.field("model", pa.string()),
    pa.field("run_id", pa.string()),
    pa.field("tagged_at", TIMESTAMP),
)
OUTPUT_COLUMNS = tuple(f.name for f in OUTPUT_FIELDS)
# The status of a photo that decoded but is none of the model's classes (a belt, a blank page):
# label, label_id and confidence are null, ``error`` says why, topk_* keep the nearest classes.
OUT_OF_SCOPE = "out_of_scope"
# Statuses of rows the model looked at; the others are files that could not be read.
MODEL_STATUSES = ("ok", OUT_OF_SCOPE)
# Renamed pass-through columns get this prefix so they never shadow ours.
MANIFEST_PREFIX = "manifest_"


# The names CSV output gives the runner-up classes (``writers.flatten_for_csv``): reserved
# whatever the format or --top-k, so that a manifest column named so never replaces the
# model's runner-ups in a CSV, and a column keeps one name in both formats.
_FLAT_TOPK = re.compile(r"(label|score)_[0-9]+")


def _reserved(name: str, taken: set[str]) -> bool:
    return name in taken or _FLAT_TOPK.fullmatch(name) is not None


def pass_through_names(names: Sequence[str]) -> dict[str, str]:
    """Each manifest column's name in the output: unchanged, or prefixed with ``manifest_``
    (as often as needed) where it would clash with one of ours (``label_2``, ``score_2``...
    of CSV output included) or another renamed column.

    A previous output fed back as a manifest has ``label_id`` and, from an earlier round,
    ``manifest_label_id``: the latter keeps its name, ``label_id`` becomes
    ``manifest_manifest_label_id``.
    """
    taken = set(OUTPUT_COLUMNS)
    renamed: dict[str, str] = {}
    # Names that need no prefix keep it; the clashing ones are placed after them.
    for name in sorted(names, key=lambda n: _reserved(n, taken)):
        new = name
        while _reserved(new, taken):
            new = MANIFEST_PREFIX + new
        taken.add(new)
        renamed[name] = new
    return renamed


def output_schema(extra: pa.Schema, metadata: dict[str, Any] | None = None) -> pa.Schema:
    """Our columns, then the manifest's own (which the source has already renamed where
    they would clash, see ``pass_through_names``)."""
    fields = list(OUTPUT_FIELDS) + list(extra)
    schema = pa.schema(fields)
    if metadata:
        schema = schema.with_metadata({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    return schema


def utf8_text(text: str) -> str:
    """``text`` as valid UTF-8, for columns that hold file names.

    Linux file names are bytes: one copied from a Windows share may be Latin-1 (b'caf\\xe9'),
    which Python carries as a lone surrogate that Arrow, like any UTF-8 file, refuses. The
    undecodable bytes are written as ``\\xe9`` instead, so the row survives and a person can
    still recognise the name.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a surrogate that did not come from a file name
            return text.encode("utf-8", "backslashreplace").decode("utf-8")


# What ``utf8_text`` writes for an undecodable byte of a file name (0x80-0xff only).
_ESCAPED_BYTE = re.compile(r"\\x([89a-f][0-9a-f])")


def file_path(text: str) -> str:
    """The file a path column names: ``text`` itself, or where only the name with its
    ``\\xNN`` escapes turned back into bytes exists, that name (``utf8_text`` reversed). So
    review, learn and self-training open the Latin-1-named photo that tag tagged."""
    if "\\x" not in text or os.path.lexists(text):
        return text
    # os functions take a str with surrogates (U+DC80-U+DCFF) as the bytes 0x80-0xff of the name.
    raw = _ESCAPED_BYTE.sub(lambda m: chr(0xDC00 + int(m.group(1), 16)), text)
    return raw if os.path.lexists(raw) else text


def _column(values: list[Any], type_: pa.DataType) -> pa.Array:
    try:
        return pa.array(values, type=type_)
    except UnicodeEncodeError:
        # Rare (see utf8_text), so only retried when it happens.
        return pa.array([utf8_text(v) if isinstance(v, str) else v for v in values], type=type_)


def rows_to_table(rows: Sequence[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (dicts keyed by output column) -> a table of exactly ``schema``."""
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    return pa.table({f.name: _column(columns[f.name], f.type) for f in schema}, schema=schema)
