"""--incremental: carry over rows of images that have not changed since a previous output.

An image is unchanged when its path, size and modification time match the previous row
(and, with --hash, its content sha256), and the previous row came from the same model.
Only the others are decoded and classified. Only rows with a label are carried: a failure
may have been passing (a time limit hit on a busy night, a permission fixed since, a
raised --max-pixels), so every failed image is tried again. A carried row is brought up
to today's options: needs_review follows today's threshold, top-k today's k.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import UsageError
from .schema import MODEL_STATUSES, OUTPUT_COLUMNS, rows_to_table, utf8_text
from .sources import Record
from .tagging import file_sha256

log = logging.getLogger(__name__)

_KEY_COLUMNS = ("path", "file_size", "mtime", "sha256", "model", "status", "confidence", "topk_labels",
                "topk_scores")


class PreviousOutput:
    def __init__(self, table: pa.Table, model_ident: str, use_hash: bool, review_threshold: float,
                 top_k: int) -> None:
        self.table = table
        self.use_hash = use_hash
        self.review_threshold = review_threshold
        self.top_k = top_k
        columns = ("path", "file_size", "sha256", "model", "status")
        paths, sizes, hashes, models, statuses = (table[c].to_pylist() for c in columns)
        mtimes = table["mtime"].cast(pa.int64()).to_pylist()
        top_lengths = [len(v) if v else 0 for v in table["topk_labels"].to_pylist()]
        # Rows from another model are never carried: a new model means new labels.
        self.index = {
            p: (i, s, m, h)
            for i, (p, s, m, h, mod, status, k) in enumerate(
                zip(paths, sizes, mtimes, hashes, models, statuses, top_lengths))
            if mod == model_ident and status in MODEL_STATUSES and s is not None and k >= top_k
        }

    @classmethod
    def load(cls, path: Path, model_ident: str, use_hash: bool, review_threshold: float,
             top_k: int) -> PreviousOutput:
        if Path(path).suffix.lower() not in (".parquet", ".pq"):
            raise UsageError(f"--incremental needs a previous Parquet output, got {path}")
        try:
            table = pq.read_table(path)
        except FileNotFoundError:
            raise UsageError(f"--incremental: previous output {path} does not exist") from None
        except (OSError, pa.ArrowException) as exc:
            raise UsageError(f"--incremental: cannot read previous output {path}: {exc}") from exc
        missing = [c for c in _KEY_COLUMNS if c not in table.column_names]
        if missing:
            raise UsageError(f"--incremental: {path} is not a catalog-tagger output (missing {', '.join(missing)})")
        keep = [c for c in table.column_names if c in OUTPUT_COLUMNS]
        return cls(table.select(keep), model_ident, use_hash, review_threshold, top_k)

    def _unchanged(self, record: Record) -> int | None:
        if record.problem is not None:  # e.g. a path today's --root refuses
            return None
        hit = self.index.get(utf8_text(record.path))  # the output holds file names as utf8_text wrote them
        if hit is None:
            return None
        row, size, mtime_us, sha = hit
        try:
            st = os.stat(record.path)
        except OSError:
            return None
        if st.st_size != size or st.st_mtime_ns // 1000 != mtime_us:
            return None
        if self.use_hash and (sha is None or file_sha256(record.path) != sha):
            return None
        return row

    def split(self, records: Sequence[Record]) -> tuple[dict[int, int], list[int]]:
        """Positions carried over (position -> previous row) and positions to tag afresh."""
        carried: dict[int, int] = {}
        todo: list[int] = []
        for pos, record in enumerate(records):
            row = self._unchanged(record)
            if row is None:
                todo.append(pos)
            else:
                carried[pos] = row
        return carried, todo

    def merge(self, records: Sequence[Record], carried: dict[int, int], todo: list[int], fresh: pa.Table,
              schema: pa.Schema) -> pa.Table:
        """Rows in record order: carried rows refreshed with today's ids and manifest columns."""
        old_rows = self.table.take(list(carried.values())).to_pylist() if carried else []
        old_by_pos = dict(zip(carried.keys(), old_rows))
        new_by_pos = dict(zip(todo, fresh.to_pylist()))
        rows = []
        for pos, record in enumerate(records):
            if pos in old_by_pos:
                row = dict(old_by_pos[pos])
                row["image_id"] = record.image_id
                # An out-of-scope row has no confidence and always needs a look.
                row["needs_review"] = row["status"] != "ok" or row["confidence"] < self.review_threshold
                row["topk_labels"] = row["topk_labels"][: self.top_k]
                row["topk_scores"] = row["topk_scores"][: self.top_k]
                row.update(record.extra)
            else:
                row = new_by_pos[pos]
            rows.append(row)
        return rows_to_table(rows, schema)
