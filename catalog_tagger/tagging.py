"""The tagging core: one shard of records -> one table of output rows.

Decoding runs in DataLoader worker processes (one file at a time, every failure turned
into a status); the model runs on whole batches, in those workers on CPU and in the main
process on a GPU (see ``Collate``). Nothing here knows of resume, locks or output files,
so a distributed engine can call it on its own shards.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .checkpoint import LoadedModel
from .decode import decode_file
from .model import ModelConfig
from .runtime import predict_logits, prepare_model
from .schema import rows_to_table
from .sources import Record


@dataclass(frozen=True)
class TagSettings:
    batch_size: int = 256
    workers: int = 0
    top_k: int = 3
    review_threshold: float = 0.5
    max_pixels: int = 64_000_000
    hash: bool = False
    time_limit: float | None = 30.0


def default_workers() -> int:
    """One decoding process per core the scheduler gives us.

    Not capped: on CPU each worker also runs the model on its own batches, and with a GPU
    the decoders are what limits throughput, so every core is worth a worker.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


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


def file_sha256(path: str) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


class DecodeDataset(Dataset):
    """Records decoded one by one in worker processes; never raises for a bad file."""

    def __init__(self, records: Sequence[Record], config: ModelConfig, settings: TagSettings) -> None:
        self.records = records
        self.config = config
        self.settings = settings

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"index": index, **decode_record(self.records[index], self.config, self.settings)}


def decode_record(record: Record, config: ModelConfig, settings: TagSettings) -> dict[str, Any]:
    """One record -> its status, metadata and (when ok) model input array; never raises."""
    if record.problem is not None:
        status, error = record.problem
        return {"status": status, "error": error, "array": None}
    decoded = decode_file(record.path, config, settings.max_pixels, settings.time_limit)
    item = dict(decoded.__dict__)
    if settings.hash and decoded.file_size:
        item["sha256"] = file_sha256(record.path)
    return item


# (stacked uint8 arrays or None, logits or None, per-item metadata); at most one of the
# first two is set: the arrays when the model still has to run on them.
CollatedBatch = tuple[torch.Tensor | None, torch.Tensor | None, list[dict[str, Any]]]


class Collate:
    """Turns a list of decoded items into one batch: the stacked arrays of the good images,
    everyone's metadata and, when given a CPU ``model``, its logits for the stack.

    DataLoader calls this in the worker that decoded the items. On CPU that puts the whole
    chain decode -> preprocess -> model in each worker, one core each, instead of a model
    process competing with the decoders for the same cores; a GPU model stays in the main
    process (CUDA cannot be used from forked workers).
    """

    def __init__(self, model: nn.Module | None = None) -> None:
        self.model = model

    def __call__(self, items: list[dict[str, Any]]) -> CollatedBatch:
        # Only real arrays count: a batch that crossed a process boundary as a column may
        # carry its missing images as NaN rather than None (Ray does, for all-missing batches).
        arrays = [a if isinstance(a, np.ndarray) else None for a in (item.pop("array") for item in items)]
        good = [a for a in arrays if a is not None]
        for item, array in zip(items, arrays):
            item["has_array"] = array is not None
        batch = torch.from_numpy(np.stack(good)) if good else None
        if batch is not None and self.model is not None:
            return None, predict_logits(self.model, batch, torch.device("cpu")), items
        return batch, None, items


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

    def logits(self, batch: torch.Tensor | None) -> torch.Tensor | None:
        """The model's logits for a stacked uint8 batch (None for no batch)."""
        return predict_logits(self.model, batch, self.device) if batch is not None else None

    def _ok_rows(self, logits: torch.Tensor) -> list[dict[str, Any]]:
        probs = torch.softmax(logits / self.loaded.temperature, dim=1)
        scores, ids = probs.topk(self.top_k, dim=1)
        rows = []
        for s, i in zip(scores.tolist(), ids.tolist()):
            rows.append({
                "label": self.classes[i[0]], "label_id": i[0], "confidence": s[0],
                "topk_labels": [self.classes[j] for j in i], "topk_scores": s,
                "needs_review": s[0] < self.settings.review_threshold,
            })
        return rows

    def tag_records(self, records: Sequence[Record], schema: pa.Schema,
                    on_batch: Callable[[int], None] | None = None) -> pa.Table:
        """Decode and classify ``records``; one row per record, in their order."""
        rows: list[dict[str, Any] | None] = [None] * len(records)
        if records:
            dataset = DecodeDataset(records, self.loaded.config, self.settings)
            workers = min(self.settings.workers, math.ceil(len(records) / self.settings.batch_size))
            on_cpu = self.device.type == "cpu"
            loader = DataLoader(
                dataset, batch_size=even_batch_size(len(records), self.settings.batch_size, workers),
                num_workers=workers,
                collate_fn=Collate(self.model if on_cpu else None),
                pin_memory=not on_cpu,
                # Workers get a fresh interpreter state cheaply by fork where available.
                multiprocessing_context="fork" if workers and "fork" in _start_methods() else None,
            )
            for batch, logits, items in loader:
                logits = logits if logits is not None else self.logits(batch)
                for item, row in zip(items, self.rows_for([records[i["index"]] for i in items], items, logits)):
                    rows[item["index"]] = row
                if on_batch is not None:
                    on_batch(len(items))
        return rows_to_table(rows, schema)  # type: ignore[arg-type]

    def rows_for(self, records: Sequence[Record], items: Sequence[dict[str, Any]],
                 logits: torch.Tensor | None) -> list[dict[str, Any]]:
        """Output rows for decoded ``items`` (one per record, with ``has_array`` set) and
        ``logits``, the model's output for the items that have an array, in order."""
        tagged_at = datetime.now(timezone.utc)
        predictions = iter(self._ok_rows(logits)) if logits is not None else iter(())
        rows = []
        for record, item in zip(records, items):
            row = self._base_row(record, item, tagged_at)
            if item["has_array"]:
                row.update(next(predictions))
            rows.append(row)
        return rows

    def _base_row(self, record: Record, item: dict[str, Any], tagged_at: datetime) -> dict[str, Any]:
        row = {
            "image_id": record.image_id,
            "path": record.path,
            "status": item["status"],
            "error": item.get("error"),
            # A file we could not read needs a person as much as an unsure label does.
            "needs_review": True,
            "width": item.get("width"),
            "height": item.get("height"),
            "file_size": item.get("file_size"),
            "mtime": item.get("mtime_us"),  # integer microseconds: exact, so --incremental can compare
            "sha256": item.get("sha256"),
            "model": self.loaded.ident,
            "run_id": self.run_id,
            "tagged_at": tagged_at,
        }
        row.update(record.extra)
        return row


def _start_methods() -> list[str]:
    import multiprocessing

    return multiprocessing.get_all_start_methods()
