"""Records -> decoded items -> batches: the stage between finding files and the model.

    Record --decode_record--> DecodedItem (facts + array) --Collate--> Batch

Shared by tagging (local and Ray engines) and by training and evaluation on labeled
photos, so every one of them sees a file exactly as the others do. Decoding never raises
for a bad file: each failure is an item with a status.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .checkpoint import sha256_file
from .config import TagConfig
from .decode import decode_file
from .model import ModelConfig
from .out_of_scope import Detector
from .runtime import predict_features_and_logits, predict_logits
from .sources import Record

_DEFAULTS = TagConfig()


@dataclass(frozen=True)
class DecodeSettings:
    """What decoding one file depends on; defaults from ``config.TagConfig``."""

    max_pixels: int = _DEFAULTS.max_pixels
    # Seconds one image may take to decode before it is reported as unreadable.
    time_limit: float | None = _DEFAULTS.time_limit
    # Also compute the file's sha256 (for the output's sha256 column).
    hash: bool = _DEFAULTS.hash
    # Convert jittered copies of the photos instead (learn's extra views; photo_jitter.py):
    # record i's copy is drawn from the seed (jitter_seed, i). None: the photos as they are.
    jitter_seed: int | None = None


@dataclass(frozen=True)
class ItemInfo:
    """What decoding learned about one record, without its pixels: everything its output
    row needs besides the model's prediction."""

    index: int  # the record's position in the sequence being decoded
    status: str
    error: str | None = None
    width: int | None = None
    height: int | None = None
    file_size: int | None = None
    mtime_us: int | None = None  # integer microseconds since the epoch: exact, so --incremental can compare
    sha256: str | None = None


@dataclass(frozen=True)
class DecodedItem:
    """One decoded record: its facts and, when it decoded, the model input (uint8, C x S x S)."""

    info: ItemInfo
    array: np.ndarray | None = None


@dataclass(frozen=True)
class Batch:
    """Decoded items collated: everyone's facts, in order, and the model input of the items
    that have one (``has_array``), stacked in the same order.

    Once the model has run on the stack (``Collate`` with a model), ``logits`` holds its
    output, ``out_of_scope`` the detector's verdict where the model has one, and ``images``
    is dropped: the pixels need not travel back from the worker.
    """

    items: list[ItemInfo]
    has_array: list[bool]
    images: torch.Tensor | None = None  # uint8 (n, C, S, S), n = sum(has_array); None when n = 0
    logits: torch.Tensor | None = None  # (n, classes), when the model already ran
    # Per image with an array: None when in scope, else why not (``Detector.reasons``), when
    # the model already ran and has a detector.
    out_of_scope: list[str | None] | None = None

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True): page-locked images copy to a GPU faster."""
        return replace(self, images=self.images.pin_memory()) if self.images is not None else self

    def arrays(self) -> list[np.ndarray | None]:
        """Each item's model input (None for items without one), in item order."""
        stacked = iter(self.images.numpy()) if self.images is not None else iter(())
        return [next(stacked) if has else None for has in self.has_array]


def file_sha256(path: str) -> str | None:
    """The file's sha256, or None when it cannot be read."""
    try:
        return sha256_file(path)
    except OSError:
        return None


def decode_record(record: Record, config: ModelConfig, settings: DecodeSettings, index: int = 0) -> DecodedItem:
    """One record -> its facts and (when it decoded) model input array; never raises."""
    if record.problem is not None:
        status, error = record.problem
        return DecodedItem(ItemInfo(index, status, error))
    jitter = None if settings.jitter_seed is None else (settings.jitter_seed, index)
    decoded = decode_file(record.path, config, settings.max_pixels, settings.time_limit, jitter)
    sha256 = file_sha256(record.path) if settings.hash and decoded.file_size else None
    info = ItemInfo(index, decoded.status, decoded.error, decoded.width, decoded.height, decoded.file_size,
                    decoded.mtime_us, sha256)
    return DecodedItem(info, decoded.array)


class DecodeDataset(Dataset):
    """Records decoded one by one (in DataLoader worker processes); never raises for a bad file."""

    def __init__(self, records: Sequence[Record], config: ModelConfig, settings: DecodeSettings) -> None:
        self.records = records
        self.config = config
        self.settings = settings

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> DecodedItem:
        return decode_record(self.records[index], self.config, self.settings, index)


class Collate:
    """Turns a list of decoded items into one ``Batch``: the stacked arrays of the good
    images, everyone's facts and, when given a CPU ``model``, its logits for the stack
    and the out-of-scope ``detector``'s verdict.

    DataLoader calls this in the worker that decoded the items. On CPU that puts the whole
    chain decode -> preprocess -> model -> detector in each worker, one core each, instead
    of a model process competing with the decoders for the same cores, and leaves the main
    process only the rows to build; a GPU model stays in the main process (CUDA cannot be
    used from forked workers).
    """

    def __init__(self, model: nn.Module | None = None, detector: Detector | None = None) -> None:
        self.model = model
        self.detector = detector

    def __call__(self, items: Sequence[DecodedItem]) -> Batch:
        # Only real arrays count: a batch that crossed a process boundary as a column may
        # carry its missing images as NaN rather than None (Ray does, for all-missing batches).
        arrays = [item.array if isinstance(item.array, np.ndarray) else None for item in items]
        good = [a for a in arrays if a is not None]
        images = torch.from_numpy(np.stack(good)) if good else None
        batch = Batch([item.info for item in items], [a is not None for a in arrays], images)
        if images is None or self.model is None:
            return batch
        logits, verdicts = model_outputs(self.model, self.detector, images, torch.device("cpu"))
        return replace(batch, images=None, logits=logits, out_of_scope=verdicts)


def model_outputs(model: nn.Module, detector: Detector | None, images: torch.Tensor, device: torch.device
                  ) -> tuple[torch.Tensor, list[str | None] | None]:
    """Logits (float32, on CPU) for a uint8 stack and, with a ``detector``, its verdict per image."""
    if detector is None:
        return predict_logits(model, images, device), None
    features, logits = predict_features_and_logits(model, images, device)
    return logits, detector.reasons(features.numpy(), logits.numpy(), images.numpy())
