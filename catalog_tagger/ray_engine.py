"""The Ray engine: the run's pending shards tagged as Ray tasks across a cluster.

One task per shard, as img2dataset's Ray distributor does: a task builds the same
``Tagger`` from the run's ``ShardJob`` (model weights included, sent once through the
object store) and returns the shard's table. The run commits it to ``OUT.parts/`` and
writes the file named by ``--out`` exactly as with the local engine (see ``run``), so the
output does not depend on the engine; only the images must be readable at the same path
on every node.

Each task reserves ``max(1, --workers)`` CPUs (its decoding processes) and
``--num-gpus-per-worker`` GPUs; ``--concurrency`` tasks run at once (default: as many as
the cluster's nodes hold). A task whose node dies is retried on another by Ray; a shard
that still fails stops the run as an interruption, finished shards kept for ``--resume``.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import torch

from .config import TagConfig
from .engines import OnImages, PendingShard, ShardJob
from .errors import CatalogTaggerError, Interrupted, UsageError
from .schema import rows_to_table
from .sources import Record
from .tagging import Tagger

log = logging.getLogger(__name__)

INSTALL_HINT = "the Ray engine needs Ray: pip install 'catalog-tagger[ray]'"

# Ray re-runs a task whose worker or node died this many times before the run gives up.
TASK_RETRIES = 3

# One Tagger per Ray worker process and run: the model is prepared once, not per shard.
_TAGGERS: dict[tuple[str, str, int], Tagger] = {}


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    return ray


def tag_shard_task(job: ShardJob, device: str, workers: int, records: list[Record]) -> tuple[pa.Table, str]:
    """Runs on a cluster node: the shard's table, and the id of the node that tagged it."""
    import ray

    key = (job.run_id, device, workers)
    if key not in _TAGGERS:
        _TAGGERS.clear()
        _TAGGERS[key] = job.tagger(torch.device(device), workers)
    table = _TAGGERS[key].tag_records(records, job.schema)
    return table, ray.get_runtime_context().get_node_id()


def _check_reachable(address: str | None) -> None:
    """Refuse a HOST:PORT nobody listens on: ray.init would retry it for ever, logging."""
    host, _, port = (address or "").rpartition(":")
    if not host or not port.isdigit() or "://" in host:
        return  # no address (Ray starts here), "auto", or a ray:// client address: Ray's to judge
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise UsageError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}; "
                         "check --ray-address (or $RAY_ADDRESS) and that the head node runs") from None


class RayEngine:
    """Tags shards as Ray tasks on the cluster at ``address`` (None: ``$RAY_ADDRESS``, else a
    Ray instance started on this machine)."""

    name = "ray"

    def __init__(self, address: str | None = None, concurrency: int | None = None,
                 num_gpus_per_worker: float = 0.0) -> None:
        self.address = address
        self.concurrency = concurrency
        self.num_gpus = num_gpus_per_worker
        self.images_by_node: dict[str, int] = Counter()
        self.device = "cpu"
        self.workers = 0
        self._ray: Any = None
        self._connected_here = False

    def check(self, config: TagConfig) -> None:
        ray = _import_ray()
        if self.num_gpus > 0 and config.device == "cpu":
            raise UsageError("--num-gpus-per-worker reserves GPUs that --device cpu would leave idle; "
                             "drop one of the two")
        if self.num_gpus == 0 and config.device == "cuda":
            raise UsageError("--device cuda with --engine ray needs --num-gpus-per-worker above 0, "
                             "so that Ray gives each task a GPU")
        self.device = "cuda" if self.num_gpus > 0 else "cpu"
        self.workers = config.workers or 0
        if not ray.is_initialized():
            _check_reachable(self.address or os.environ.get("RAY_ADDRESS"))
            try:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            except ConnectionError as exc:
                raise UsageError(f"cannot reach the Ray cluster at {self.address or 'RAY_ADDRESS'}: {exc}") from None
            self._connected_here = True
        self._ray = ray
        fits = self._tasks_that_fit()
        if fits == 0:
            raise UsageError(f"no node of the Ray cluster has {self._cpus()} CPU(s) and {self.num_gpus:g} GPU(s) "
                             "free for one task; lower --workers or --num-gpus-per-worker")
        self.concurrency = self.concurrency or fits
        log.info("Ray engine: %d task(s) at a time, %d CPU(s) and %g GPU(s) each, on %s",
                 self.concurrency, self._cpus(), self.num_gpus, self.device)

    def _cpus(self) -> int:
        return max(1, self.workers)

    def _tasks_that_fit(self) -> int:
        """How many shard tasks the alive nodes can run at once."""
        total = 0
        for node in self._ray.nodes():
            if not node.get("Alive"):
                continue
            resources = node.get("Resources", {})
            fit = int(resources.get("CPU", 0) // self._cpus())
            if self.num_gpus > 0:
                fit = min(fit, int(resources.get("GPU", 0) // self.num_gpus))
            total += fit
        return total

    def tag(self, shards: Iterator[PendingShard], job: ShardJob,
            on_images: OnImages) -> Iterator[tuple[PendingShard, pa.Table]]:
        ray = self._ray
        task = ray.remote(tag_shard_task).options(num_cpus=self._cpus(), num_gpus=self.num_gpus,
                                                  max_retries=TASK_RETRIES, retry_exceptions=False)
        job_ref = ray.put(job)  # the weights travel once, not with every shard
        in_flight: dict[Any, PendingShard] = {}
        shards = iter(shards)
        more = True
        try:
            while True:
                while more and len(in_flight) < (self.concurrency or 1):
                    shard = next(shards, None)
                    if shard is None:
                        more = False
                    elif not shard.records:  # every record carried over by --incremental
                        yield shard, rows_to_table([], job.schema)
                    else:
                        in_flight[task.remote(job_ref, self.device, self.workers, shard.records)] = shard
                if not in_flight:
                    return
                done, _ = ray.wait(list(in_flight), num_returns=1)
                shard = in_flight.pop(done[0])
                table, node = self._result(done[0], shard)
                self.images_by_node[node] += len(shard.records)
                on_images(len(shard.records))
                yield shard, table
        finally:
            for ref in in_flight:  # interrupted: stop the cluster's work on this run
                ray.cancel(ref, force=True)

    def _result(self, ref: Any, shard: PendingShard) -> tuple[pa.Table, str]:
        ray = self._ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, CatalogTaggerError):
                raise exc.cause from None
            raise
        except ray.exceptions.RayError as exc:  # a node or worker lost more often than Ray retries
            raise Interrupted(f"the Ray cluster lost shard {shard.index} ({type(exc).__name__}, after "
                              f"{TASK_RETRIES} retries); finished shards are kept: run the same command "
                              "with --resume to finish") from None

    def close(self) -> None:
        if self._connected_here and self._ray is not None:
            self._ray.shutdown()
            self._connected_here = False
