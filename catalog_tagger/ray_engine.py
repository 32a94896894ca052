"""Tagging on a Ray cluster: CPU tasks decode, GPU (or CPU) actors run the model.

The same records, decoding, preprocessing, model and row building as the local engine
(``decode_record`` and ``Tagger.rows_for``), so a bad file becomes the same row with the
same status. The output is a Parquet dataset: a folder of ``part-NNNNNN.parquet`` files,
one per shard of ``--shard-size`` input records, numbered in input order; rows are in
input order within each file and carry ``ordinal`` (their position in the input), so
``ORDER BY ordinal`` restores the global order whatever reads the folder.

``--resume`` skips the shards whose file is already complete.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .batches import Collate, DecodedItem, DecodeSettings, decode_record
from .checkpoint import atomic_write_json, load_model
from .config import TagConfig
from .errors import UsageError
from .model import ModelConfig
from .outputs import summary_path
from .run import (
    Summary,
    check_inputs,
    check_not_shrunk,
    chunks,
    commit_shard,
    is_committed,
    output_lock,
    prepare_parts,
    review_threshold,
    run_identity,
    shard_fingerprint,
)
from .runtime import resolve_device
from .schema import SCHEMA_VERSION, output_schema, rows_to_table
from .sources import open_source
from .tagging import Tagger, TagSettings

log = logging.getLogger(__name__)

INSTALL_HINT = "the Ray engine needs Ray: pip install 'catalog-tagger[ray]'"


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    return ray


def _object_column(values: list[Any]) -> np.ndarray:
    """``values`` as a 1-D object array, one cell each (np.array would stack equal-shaped
    arrays into one N-D array)."""
    column = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        column[i] = value
    return column


def _decode_batch(batch: dict[str, np.ndarray], config: ModelConfig, settings: DecodeSettings) -> dict[str, Any]:
    """CPU task: decode a batch of records; failures become items with a status.

    Each item travels as two columns, its facts and its array, so that Ray can carry the
    arrays as a tensor column rather than as pickled objects.
    """
    decoded = [decode_record(record, config, settings, i) for i, record in enumerate(batch["record"])]
    return {"shard": batch["shard"], "ordinal": batch["ordinal"], "record": batch["record"],
            "info": _object_column([d.info for d in decoded]), "array": _object_column([d.array for d in decoded])}


class _Predictor:
    """Actor: loads the model once, then turns decoded batches into output rows."""

    def __init__(self, model_path: str | None, settings: TagSettings, run_id: str, device: str,
                 schema: pa.Schema) -> None:
        loaded = load_model(Path(model_path) if model_path else None)
        self.tagger = Tagger(loaded, resolve_device(device), settings, run_id)
        self.schema = schema

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        # Collate takes a missing array whatever form the column brought it in (None or NaN).
        decoded = [DecodedItem(info, array) for info, array in zip(batch["info"], batch["array"])]
        rows = self.tagger.rows_for(list(batch["record"]), Collate()(decoded))
        table = rows_to_table(rows, self.schema)
        return table.append_column("shard", pa.array(batch["shard"].astype(np.int64))) \
                    .append_column("ordinal", pa.array(batch["ordinal"].astype(np.int64)))


def run_tagging_ray(config: TagConfig, address: str | None = None, num_gpus_per_worker: float = 0.0,
                    concurrency: int = 1, progress: bool = True) -> Summary:
    """Tag ``config.source`` into the folder ``config.out`` on a Ray cluster; returns the summary."""
    ray = _import_ray()
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"with --engine ray, --out is a folder for the Parquet dataset; {out} is a file")
    source = open_source(config.source, config.extensions, config.path_col, config.id_col, config.root)
    loaded = load_model(config.model)
    check_inputs(config, out, loaded)
    threshold, rule = review_threshold(config, loaded)
    settings = TagSettings(batch_size=config.batch_size, top_k=config.top_k, review_threshold=threshold,
                           max_pixels=config.max_pixels, hash=config.hash, time_limit=config.time_limit)
    metadata = {"catalog_tagger_schema_version": SCHEMA_VERSION, "classes": list(loaded.classes),
                "model_card": loaded.card}
    schema = output_schema(source.extra_schema, metadata)
    identity = run_identity(config, "parquet-dataset", loaded.ident, str(Path(config.source).resolve()))
    with output_lock(out):
        run_id = prepare_parts(out, identity, config.resume or config.resume_if_possible,
                               restart_other=config.resume_if_possible)
        return _run(ray, config, out, source, loaded, settings, schema, run_id, threshold, rule, address,
                    num_gpus_per_worker, concurrency, progress)


def _run(ray: Any, config: TagConfig, out: Path, source: Any, loaded: Any, settings: TagSettings,
         schema: pa.Schema, run_id: str, threshold: float, rule: str, address: str | None,
         num_gpus_per_worker: float, concurrency: int, progress: bool) -> Summary:
    out_schema = schema.append(pa.field("ordinal", pa.int64()))

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = progress

    summary = Summary(output=str(out), run_id=run_id, review_threshold=threshold, review_rule=rule)
    started = time.perf_counter()
    pending: list[dict[str, Any]] = []
    expected: dict[int, int] = {}
    fingerprints: dict[int, str] = {}
    paths: list[Path] = []
    for index, records in enumerate(chunks(source.records, config.shard_size)):
        path = out / f"part-{index:06d}.parquet"
        paths.append(path)
        if is_committed(path, records):
            summary.resumed_rows += len(records)
            continue
        expected[index] = len(records)
        fingerprints[index] = shard_fingerprint(records)
        pending.extend({"shard": index, "ordinal": r.ordinal, "record": r} for r in records)
    check_not_shrunk(config, len(pending) + summary.resumed_rows, None, out)

    if pending:
        device = "cuda" if num_gpus_per_worker > 0 else "cpu"
        ds = ray.data.from_items(pending).map_batches(
            _decode_batch, fn_kwargs={"config": loaded.config, "settings": settings.decode},
            batch_size=64, batch_format="numpy")
        ds = ds.map_batches(
            _Predictor, fn_constructor_kwargs={"model_path": str(config.model) if config.model else None,
                                               "settings": settings, "run_id": run_id, "device": device,
                                               "schema": schema},
            concurrency=concurrency, num_gpus=num_gpus_per_worker, batch_size=config.batch_size,
            batch_format="numpy")
        buffers: dict[int, list[pa.Table]] = defaultdict(list)
        counts: dict[int, int] = defaultdict(int)
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for shard in np.unique(table["shard"].to_numpy()):
                part = table.filter(pa.compute.equal(table["shard"], pa.scalar(int(shard), pa.int64())))
                buffers[int(shard)].append(part.drop_columns(["shard"]))
                counts[int(shard)] += part.num_rows
                if counts[int(shard)] == expected[int(shard)]:
                    whole = pa.concat_tables(buffers.pop(int(shard))).sort_by("ordinal").cast(out_schema)
                    commit_shard(out / f"part-{int(shard):06d}.parquet", whole, fingerprints[int(shard)])
        summary.processed = len(pending)

    summary.seconds = time.perf_counter() - started
    for path in paths:
        summary.count(pq.read_table(path))
    atomic_write_json(summary_path(out), summary.to_dict())
    return summary
