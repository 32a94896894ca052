"""Saving and loading models: safetensors weights plus a JSON model card.

A model on disk is two files side by side, ``NAME.safetensors`` and ``NAME.json``. The
card carries the model config (so loading never needs the training flags), the class
names, the preprocessing, metrics and provenance, and the sha256 of the weights: a
weights file that does not match its card is refused, never silently used.

Nothing here unpickles: weights go through safetensors, training state through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from .errors import ModelError, OutputError, UsageError
from .model import GarmentNet, ModelConfig, build_model
from .out_of_scope import Detector
from .preprocess import PREPROCESSING

CARD_FORMAT = 1
BUNDLED_DIR = Path(__file__).parent / "models"
BUNDLED_NAME = "model"
# A card is a few hundred KB at most; anything larger is not one of ours (or a trap).
MAX_CARD_BYTES = 16 << 20
# The largest network a card may describe (model.ModelConfig's bounds) is far below this.
MAX_WEIGHTS_BYTES = 1 << 30


@dataclass
class LoadedModel:
    model: GarmentNet
    config: ModelConfig
    card: dict[str, Any]
    weights_path: Path
    card_path: Path

    @property
    def classes(self) -> tuple[str, ...]:
        return self.config.classes

    @property
    def sha256(self) -> str:
        return str(self.card["weights_sha256"])

    @property
    def temperature(self) -> float:
        """Calibration temperature from the card; 1.0 (raw softmax) for uncalibrated models."""
        return float((self.card.get("calibration") or {}).get("temperature", 1.0))

    @property
    def ident(self) -> str:
        """Name, a short weights hash, a short hash of the calibration (and of the
        out-of-scope detector, when the card has one) and the conversion's version: what
        output rows record as their model.
        ``calibrate`` changes confidences and decisions without touching the weights, so rows
        tagged before and after it must not count as the same model."""
        calibration = json.dumps(self.card.get("calibration"), sort_keys=True).encode()
        # The same weights see other inputs when the conversion changes (an upgrade of the
        # package): rows tagged through another conversion are re-tagged by --incremental.
        ident = (f"{self.card.get('name', self.weights_path.stem)}@sha256:{self.sha256[:12]}"
                 f"+cal:{hashlib.sha256(calibration).hexdigest()[:8]}+conv:{PREPROCESSING['version']}")
        if self.card.get("out_of_scope") is not None:
            detector = json.dumps(self.card["out_of_scope"], sort_keys=True).encode()
            ident += f"+oos:{hashlib.sha256(detector).hexdigest()[:8]}"
        return ident

    @functools.cached_property
    def detector(self) -> Detector | None:
        """The card's out-of-scope detector (checked when the card was read); None when the
        card has none: every decoded photo is then tagged with one of the classes."""
        data = self.card.get("out_of_scope")
        return Detector.from_dict(data) if data is not None else None


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The file's sha256 in hex, read in 1 MiB blocks; OSError when it cannot be read."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def open_regular_file(path: Path) -> int:
    """A read-only descriptor on ``path``, which must be a regular file (links to one are
    fine): a FIFO, a device such as /dev/zero or a folder would hang or never end."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # O_NONBLOCK: a FIFO must not block
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ModelError(f"{path} is not a regular file")
    return fd


def open_model_file(path: Path, what: str, hint: str = "") -> BinaryIO:
    """``path`` (a card or weights: ``what``) opened for reading if it is a regular file;
    one sentence naming it when it is missing, unreadable or not a file."""
    try:
        return os.fdopen(open_regular_file(path), "rb")
    except FileNotFoundError:
        raise ModelError(f"{what} not found: {path}{hint}") from None
    except OSError as exc:
        raise ModelError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def shareable_mode() -> int:
    """rw-r--r-- within the user's umask: what a plain ``open()`` would have made."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write via a temporary file in the same folder and rename: readers see old or new, never half.
    ``mode``: the permissions of the new file (default: what a plain ``open()`` would make)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp makes 0600; models and reports are meant to be shared
        os.chmod(tmp, shareable_mode() if mode is None else mode)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        # A failed write names no file; the message (cli.reports_errors) should name this one.
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any, mode: int | None = None) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode(), mode)


def output_folder(path: Path) -> Path:
    """Create ``path`` as the folder for a command's files, or say in one sentence why not:
    better before an hour of training than at its first checkpoint."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputError(f"--out {path} is a file (or inside one), not a folder; choose a folder") from None
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {path}: {exc.strerror or exc}") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(f"the output folder {path} is not writable")
    return path


def refuse_out_inside_data(out: Path, data: Path | None) -> None:
    """Refuse an ``--out`` folder inside the ``--data`` folder of labeled photos, before it is
    created: the next run would read it as a class folder (and its pictures as photos)."""
    if data is None:
        return
    out_abs, data_abs = Path(os.path.abspath(out)), Path(os.path.abspath(data))
    if out_abs == data_abs or data_abs in out_abs.parents:
        raise UsageError(f"--out {out} is inside --data {data}; its files would be read as labeled photos "
                         "next time: choose a folder outside it")


def save_model(model: GarmentNet, card: dict[str, Any], weights_path: Path) -> dict[str, Any]:
    """Write weights and card; returns the card completed with config, file name and sha256.

    The card is the commit point. When ``weights_path`` already exists (a model being
    replaced), the new weights go to a file of their own name first, the card is renamed
    over the old one, and only then is the old weights file removed: a reader, or a run
    killed at any moment, sees the old model or the new one, never a mix.
    """
    weights_path = Path(weights_path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    card_path = weights_path.with_suffix(".json")
    replaced = _weights_named_by(card_path) if card_path.exists() else None
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # One metadata key only: safetensors writes its metadata map in hash order, so two keys
    # would make identical weights hash differently from run to run. Serialised in memory:
    # safetensors' own writer turns a full disk into an opaque SafetensorError.
    data = save(state, metadata={"format": "pt"})
    sha = hashlib.sha256(data).hexdigest()
    target = weights_path
    if target.exists():
        target = weights_path.with_name(f"{weights_path.stem}-{sha[:12]}{weights_path.suffix}")
    # shareable: another account (cron, a colleague) must be able to read it
    atomic_write_bytes(target, data)
    card = {
        "card_format": CARD_FORMAT,
        **card,
        "model_config": model.config.to_dict(),
        "classes": list(model.config.classes),
        "weights_file": target.name,
        "weights_sha256": sha,
    }
    atomic_write_json(card_path, card)
    if replaced is not None and replaced != target and replaced.name != target.name:
        replaced.unlink(missing_ok=True)
    return card


def _weights_named_by(card_path: Path) -> Path:
    """The weights file a card points to: its ``weights_file`` (a bare name in the card's
    folder), else the card's own name with .safetensors (cards of older versions)."""
    try:
        name = read_card(card_path).get("weights_file")
    except ModelError:
        name = None
    if isinstance(name, str) and name and os.path.basename(name) == name and name not in (".", ".."):
        return card_path.with_name(name)
    return card_path.with_suffix(".safetensors")


def holds_model(folder: Path) -> bool:
    """Whether ``folder`` already holds a model or a training run (a card, weights or a checkpoint)."""
    folder = Path(folder)
    return folder.is_dir() and any(
        p.suffix in (".safetensors", ".pt") or (p.suffix == ".json" and p.with_suffix(".safetensors").exists())
        or p.name == "model.json" for p in folder.iterdir())


def _resolve(path: Path) -> tuple[Path, Path]:
    """Accept a folder, a weights file or a card; return (weights, card)."""
    path = Path(path)
    if path.is_dir():
        cards = [c for c in sorted(path.glob("*.json")) if c.is_file() and _weights_named_by(c).exists()]
        if len(cards) != 1:
            raise ModelError(f"{path}: expected one NAME.safetensors with its NAME.json card, found {len(cards)}")
        return _weights_named_by(cards[0]), cards[0]
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if path.suffix == ".json":
        return _weights_named_by(path), path
    return path, path.with_suffix(".json")


def read_card(card_path: Path) -> dict[str, Any]:
    """The card as a dict, read only from a regular file of bounded size."""
    with open_model_file(card_path, "model card", " (every model needs its JSON card beside it)") as fh:
        data = fh.read(MAX_CARD_BYTES + 1)
    if len(data) > MAX_CARD_BYTES:
        raise ModelError(f"model card {card_path} is larger than {MAX_CARD_BYTES >> 20} MB: not a model card")
    try:
        card = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"model card {card_path} is not valid JSON: {exc}") from exc
    except RecursionError:
        raise ModelError(f"model card {card_path} is nested too deeply to be a model card") from None
    if not isinstance(card, dict) or "weights_sha256" not in card or not isinstance(card.get("model_config"), dict):
        raise ModelError(f"{card_path} is not a catalog-tagger model card (no weights_sha256/model_config)")
    _check_calibration(card.get("calibration"), card_path)
    _check_out_of_scope(card.get("out_of_scope"), card_path)
    return card


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_calibration(calibration: Any, card_path: Path) -> None:
    """Refuse a calibration block that would turn confidences into NaN or nonsense."""
    if calibration is None:
        return
    bad = f"model card {card_path} has an invalid calibration"
    if not isinstance(calibration, dict):
        raise ModelError(f"{bad}: expected an object, found {type(calibration).__name__}")
    temperature = calibration.get("temperature", 1.0)
    if not _finite(temperature) or not 1e-3 <= temperature <= 1e3:
        raise ModelError(f"{bad} temperature ({temperature!r}); it must be a number between 0.001 and 1000")
    table = calibration.get("review_table", [])
    # Rows are [threshold, precision, coverage, ...] (calibration.review_table).
    if not isinstance(table, list) or not all(
            isinstance(row, list) and len(row) >= 3 and all(_finite(v) for v in row[:3]) for row in table):
        raise ModelError(f"{bad} review table (rows need a finite threshold, precision and coverage)")


def _check_out_of_scope(data: Any, card_path: Path) -> None:
    """Refuse an out-of-scope block that tagging could not use (absent or null: detector off)."""
    if data is None:
        return
    try:
        Detector.from_dict(data)
    except ValueError as exc:
        raise ModelError(f"model card {card_path} has an invalid out_of_scope detector: {exc}") from None


def load_model(path: Path | None = None, expected_classes: tuple[str, ...] | None = None) -> LoadedModel:
    """Load a model after checking its weights against the card; the bundled one by default.

    ``expected_classes``: the model's classes must begin with these (a model that learned
    classes of the retailer's own keeps Fashion-MNIST's first, so it still evaluates on it)."""
    weights_path, card_path = _resolve(path if path is not None else bundled_model_path())
    card = read_card(card_path)
    # Read once: the bytes checked against the card are the bytes loaded, even if the file
    # is replaced meanwhile (a retrain publishing a new model).
    with open_model_file(weights_path, "weights file") as fh:
        blob = fh.read(MAX_WEIGHTS_BYTES + 1)
    if len(blob) > MAX_WEIGHTS_BYTES:
        raise ModelError(f"{weights_path} is larger than {MAX_WEIGHTS_BYTES >> 30} GB: not this model's weights")
    actual = hashlib.sha256(blob).hexdigest()
    if actual != card["weights_sha256"]:
        raise ModelError(
            f"{weights_path} does not match its card (sha256 {actual[:12]}..., card says "
            f"{str(card['weights_sha256'])[:12]}...): refusing a modified or mismatched model"
        )
    try:
        config = ModelConfig.from_dict(card["model_config"])
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{card_path}: invalid model config: {exc}") from exc
    if list(config.classes) != list(card.get("classes", config.classes)):
        raise ModelError(f"{card_path}: class list disagrees with the model config")
    detector = card.get("out_of_scope")
    if detector is not None:
        try:
            Detector.from_dict(detector).check_fits(config.num_classes, config.widths[-1])
        except ValueError as exc:
            raise ModelError(f"{card_path}: the out_of_scope detector does not fit the model: {exc}") from None
    if expected_classes is not None and tuple(expected_classes) != config.classes[:len(expected_classes)]:
        raise ModelError(f"{card_path}: model classes {list(config.classes)} do not begin with the expected "
                         f"{list(expected_classes)}")
    try:
        state = load(blob)
    except (SafetensorError, ValueError) as exc:
        raise ModelError(f"{weights_path} is not a readable safetensors file: {exc}") from exc
    model = build_model(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(f"{weights_path}: weights do not fit the card's model config ({first})") from exc
    return LoadedModel(model.eval(), config, card, weights_path, card_path)


def bundled_model_path() -> Path:
    path = BUNDLED_DIR / f"{BUNDLED_NAME}.safetensors"
    if not path.exists():
        raise ModelError(f"the bundled model is missing from the installation ({path}); reinstall catalog-tagger")
    return path


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    """Atomically save resumable training state (tensors and plain Python values only)."""
    buffer = io.BytesIO()
    # Serialised in memory (a few MB) and written by atomic_write_bytes: torch.save onto a
    # full disk fails with an opaque RuntimeError and leaves its temporary file behind.
    torch.save(state, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_training_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"no checkpoint to resume from at {path}") from None
    except Exception as exc:  # torch raises many types for corrupt or unsafe files
        raise ModelError(f"cannot resume from {path}: not a valid catalog-tagger checkpoint "
                         f"({exc.__class__.__name__})") from exc
