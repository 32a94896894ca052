"""The tagging core: one shard of records -> one table of output rows.

Decoding runs in DataLoader worker processes (one file at a time, every failure turned
into a status, see ``batches``); the model and its out-of-scope detector run on whole
batches, in those workers on CPU and in the main process on a GPU (see ``batches.Collate``).
Nothing here knows of resume, locks or output files, so a distributed engine can call it
on its own shards.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import torch
from torch.utils.data import DataLoader

from .batches import Batch, Collate, DecodeDataset, DecodeSettings, ItemInfo, model_outputs
from .batches import file_sha256 as file_sha256  # re-exported: incremental.py compares hashes with it
from .checkpoint import LoadedModel
from .config import TagConfig
from .runtime import default_workers as default_workers  # re-exported for older imports (review, learn)
from .runtime import prepare_model, torch_threads
from .schema import OUT_OF_SCOPE, rows_to_table
from .sources import Record

_DEFAULTS = TagConfig()


@dataclass(frozen=True)
class TagSettings:
    """What every row of a run depends on besides the model; defaults from ``config.TagConfig``
    (``workers`` 0: decode in this process)."""

    batch_size: int = _DEFAULTS.batch_size
    workers: int = 0
    top_k: int = _DEFAULTS.top_k
    review_threshold: float = _DEFAULTS.review_threshold
    max_pixels: int = _DEFAULTS.max_pixels
    hash: bool = _DEFAULTS.hash
    time_limit: float | None = _DEFAULTS.time_limit

    @property
    def decode(self) -> DecodeSettings:
        return DecodeSettings(max_pixels=self.max_pixels, time_limit=self.time_limit, hash=self.hash)


def worker_loads(n: int, batch_size: int, workers: int) -> list[int]:
    """Records per worker when a DataLoader deals ``n`` records in batches of ``batch_size``
    to ``workers`` processes in turn."""
    sizes = [min(batch_size, n - start) for start in range(0, n, batch_size)]
    return [sum(sizes[w::workers]) for w in range(max(1, workers))]


def even_batch_size(n: int, batch_size: int, workers: int) -> int:
    """At most ``batch_size``: the batch size that deals ``n`` records most evenly to the
    workers, so that none is left with the ragged end of a shard while the others wait
    (300 records on 2 workers: 2 x 150, not 256 + 44; 1,000: 4 x 250, not 3 x 256 + 232).

    Labels do not depend on the batch size, so this only changes how fast they come.
    """
    if workers <= 1 or n <= 0:
        return batch_size
    batches = math.ceil(math.ceil(n / batch_size) / workers) * workers
    even = math.ceil(n / batches)
    slowest = max(worker_loads(n, even, workers))
    return even if slowest < max(worker_loads(n, batch_size, workers)) else batch_size


class Tagger:
    """A loaded model on its device plus the settings every row depends on."""

    def __init__(self, loaded: LoadedModel, device: torch.device, settings: TagSettings, run_id: str) -> None:
        self.loaded = loaded
        self.device = device
        self.settings = settings
        self.run_id = run_id
        self.model = prepare_model(loaded.model, device)
        self.classes = loaded.classes
        self.top_k = max(1, min(settings.top_k, len(self.classes)))
        self.detector = loaded.detector
        # Once: it hashes the card's calibration and detector (a 180 KB entry), not per row.
        self.ident = loaded.ident

    def collate(self, on_cpu: bool) -> Collate:
        """How a DataLoader worker should batch decoded items: with the model run there on CPU."""
        return Collate(self.model, self.detector) if on_cpu else Collate()

    def _outputs(self, batch: Batch) -> tuple[torch.Tensor | None, list[str | None] | None]:
        """Logits and, for a model with a detector, its verdict per image of the batch."""
        if batch.logits is not None or batch.images is None:
            return batch.logits, batch.out_of_scope
        return model_outputs(self.model, self.detector, batch.images, self.device)

    def _model_rows(self, batch: Batch) -> list[dict[str, Any]]:
        """The model's part of the row of each image in the batch: a label, or out of scope."""
        logits, verdicts = self._outputs(batch)
        if logits is None:
            return []
        probs = torch.softmax(logits / self.loaded.temperature, dim=1)
        scores, ids = probs.topk(self.top_k, dim=1)
        reasons = verdicts if verdicts is not None else [None] * len(logits)
        rows = []
        for s, i, reason in zip(scores.tolist(), ids.tolist(), reasons):
            row = {"topk_labels": [self.classes[j] for j in i], "topk_scores": s}
            if reason is None:
                row.update(label=self.classes[i[0]], label_id=i[0], confidence=s[0],
                           needs_review=s[0] < self.settings.review_threshold)
            else:
                # None of the classes: no label, and a person should look. The ranked classes
                # stay as a hint of what it resembled.
                row.update(status=OUT_OF_SCOPE, error=reason, needs_review=True)
            rows.append(row)
        return rows

    def tag_records(self, records: Sequence[Record], schema: pa.Schema,
                    on_batch: Callable[[int], None] | None = None) -> pa.Table:
        """Decode and classify ``records``; one row per record, in their order."""
        rows: list[dict[str, Any] | None] = [None] * len(records)
        if records:
            dataset = DecodeDataset(records, self.loaded.config, self.settings.decode)
            workers = min(self.settings.workers, math.ceil(len(records) / self.settings.batch_size))
            on_cpu = self.device.type == "cpu"
            loader = DataLoader(
                dataset, batch_size=even_batch_size(len(records), self.settings.batch_size, workers),
                num_workers=workers,
                collate_fn=self.collate(on_cpu),
                pin_memory=not on_cpu,
                # Workers get a fresh interpreter state cheaply by fork where available.
                multiprocessing_context="fork" if workers and "fork" in _start_methods() else None,
            )
            with torch_threads(1) if on_cpu and workers else contextlib.nullcontext():
                for batch in loader:
                    for item, row in zip(batch.items, self.rows_for([records[i.index] for i in batch.items], batch)):
                        rows[item.index] = row
                    if on_batch is not None:
                        on_batch(len(batch.items))
        return rows_to_table(rows, schema)  # type: ignore[arg-type]

    def rows_for(self, records: Sequence[Record], batch: Batch) -> list[dict[str, Any]]:
        """Output rows for a decoded ``batch`` of ``records`` (one item per record, in order);
        the model runs on the batch's images unless ``Collate`` ran it already."""
        tagged_at = datetime.now(timezone.utc)
        predictions = iter(self._model_rows(batch))
        rows = []
        for record, item, has_array in zip(records, batch.items, batch.has_array):
            row = self._base_row(record, item, tagged_at)
            if has_array:
                row.update(next(predictions))
            rows.append(row)
        return rows

    def _base_row(self, record: Record, item: ItemInfo, tagged_at: datetime) -> dict[str, Any]:
        row = {
            "image_id": record.image_id,
            "path": record.path,
            "status": item.status,
            "error": item.error,
            # A file we could not read needs a person as much as an unsure label does.
            "needs_review": True,
            "width": item.width,
            "height": item.height,
            "file_size": item.file_size,
            "mtime": item.mtime_us,  # integer microseconds: exact, so --incremental can compare
            "sha256": item.sha256,
            "model": self.ident,
            "run_id": self.run_id,
            "tagged_at": tagged_at,
        }
        row.update(record.extra)
        return row


def _start_methods() -> list[str]:
    import multiprocessing

    return multiprocessing.get_all_start_methods()
