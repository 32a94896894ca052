"""Engines: the strategies that tag a run's pending shards (img2dataset's distributor shape).

The run (``run.run_tagging``) owns the plan: records, shards, resume, ``--incremental``,
commits and the output file. An engine is handed the shards still to tag and gives back
one table per shard, in any order; it never sees OUT or ``OUT.parts/``. Every engine
builds its rows with the same ``Tagger`` from the same ``ShardJob``, so the output is the
same whichever engine ran.

    LocalEngine   this machine: DataLoader worker processes decode, one shard at a time
    RayEngine     a Ray cluster: one task per shard (ray_engine.py)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Protocol

import pyarrow as pa
import torch

from .checkpoint import LoadedModel
from .config import TagConfig
from .runtime import resolve_device, resolve_workers
from .sources import Record
from .tagging import Tagger, TagSettings


@dataclass(frozen=True)
class PendingShard:
    """A shard an engine is asked to tag: its number and the records to tag now (with
    ``--incremental``, the shard's records minus those carried over)."""

    index: int
    records: list[Record]


@dataclass(frozen=True)
class ShardJob:
    """Everything a row depends on, whichever engine or machine tags it (picklable)."""

    loaded: LoadedModel
    settings: TagSettings
    run_id: str
    schema: pa.Schema

    def tagger(self, device: torch.device, workers: int) -> Tagger:
        return Tagger(self.loaded, device, replace(self.settings, workers=workers), self.run_id)


OnImages = Callable[[int], None]


class Engine(Protocol):
    name: str
    # Images tagged per machine (Ray node id); empty when there is only this machine.
    images_by_node: dict[str, int]

    def check(self, config: TagConfig) -> None:
        """Refuse (``UsageError``, one sentence) an option this engine cannot honour, and get
        ready (device, cluster); called before the run touches its output."""

    def tag(self, shards: Iterator[PendingShard], job: ShardJob,
            on_images: OnImages) -> Iterator[tuple[PendingShard, pa.Table]]:
        """Tag each shard; yield it with its table (one row per record, in record order)."""

    def close(self) -> None:
        """Release what ``check`` acquired."""


class LocalEngine:
    """This machine: ``--workers`` DataLoader processes decode (and, on CPU, run the model)."""

    name = "local"

    def __init__(self) -> None:
        self.images_by_node: dict[str, int] = {}
        self.device = torch.device("cpu")
        self.workers = 0

    def check(self, config: TagConfig) -> None:
        self.device = resolve_device(config.device)
        self.workers = resolve_workers(config.workers)

    def tag(self, shards: Iterator[PendingShard], job: ShardJob,
            on_images: OnImages) -> Iterator[tuple[PendingShard, pa.Table]]:
        tagger = job.tagger(self.device, self.workers)
        for shard in shards:
            yield shard, tagger.tag_records(shard.records, job.schema, on_batch=on_images)

    def close(self) -> None:
        pass
