"""Frozen dataclasses: the single source of defaults.

The CLI reads its option defaults from these classes, so a default is changed in one
place and the help text, the library and the model card all follow.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

DEVICES = ("auto", "cpu", "cuda")
_PATH_FIELDS = {"out", "data_dir", "data", "manifest", "init"}

# The default network, shared by TrainConfig and model.ModelConfig. A slim first block
# (16 + 24 channels at full resolution, where most multiply-adds happen) trains as
# accurately as 24 + 32 and runs 15-35% faster, depending on the CPU, which matters
# where the network shares the cores with JPEG decoding (README, Speed).
DEFAULT_WIDTHS: tuple[int, ...] = (24, 64, 128)
DEFAULT_STEM_WIDTH = 16

# The one registry of image files (as timm's img_extensions.py): the extensions a folder
# walk picks up, each with the Pillow format its content should have.
IMAGE_FORMATS: dict[str, str] = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF",
                                 "bmp": "BMP", "tif": "TIFF", "tiff": "TIFF"}
IMAGE_EXTENSIONS: tuple[str, ...] = tuple(IMAGE_FORMATS)


@dataclass(frozen=True)
class TrainConfig:
    out: Path = Path("runs/train")
    data_dir: Path | None = None
    epochs: int = 24
    batch_size: int = 256
    lr: float = 0.08
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    # Share of upper-body garments shown "worn by a model" (head, arms, legs), as real
    # catalog photos show them; see augment.worn_by_a_model.
    worn_prob: float = 0.3
    # What the conversion of a real photo does to it, shown to the network on Fashion-MNIST
    # items (augment.train_augment): worn tops with the head cut off (a share of the worn
    # ones), shoes in pairs, item pixels lifted to the conversion's floor, shoes seen from above.
    headless_prob: float = 0.0
    pair_prob: float = 0.0
    floor_prob: float = 0.0
    above_prob: float = 0.0
    flip_tta: bool = True
    # bf16 autocast where the hardware computes bf16 natively (GPU, AVX512-BF16/AMX CPU).
    mixed_precision: bool = True
    warmup_epochs: float = 1.0
    val_size: int = 5000
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    # Replace a model already in --out (refused otherwise; see checkpoint.save_model).
    overwrite: bool = False
    # The retailer's own labeled photos instead of Fashion-MNIST: a folder with one
    # sub-folder per class, or a CSV manifest with a path and a label column.
    data: Path | None = None
    manifest: Path | None = None
    path_col: str = "path"
    label_col: str = "label"
    input_size: int = 28
    channels: int = 1
    val_fraction: float = 0.1
    init: Path | None = None
    workers: int | None = None
    # Bounded so that progress bars and curves stay meaningful on tiny test datasets.
    eval_batch_size: int = 1024
    widths: tuple[int, ...] = DEFAULT_WIDTHS
    stem_width: int = DEFAULT_STEM_WIDTH

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Rebuild from a card's training config; unknown keys (older cards) are ignored."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                continue
            default = known[key].default
            if isinstance(value, list):
                value = tuple(value)
            elif value is not None and (isinstance(default, Path) or key in _PATH_FIELDS):
                value = Path(value)
            values[key] = value
        return cls(**values)


@dataclass(frozen=True)
class EvalConfig:
    model: Path | None = None
    data_dir: Path | None = None
    out: Path | None = None
    batch_size: int = 1024
    device: str = "auto"
    grid_size: int = 36
    data: Path | None = None
    manifest: Path | None = None
    path_col: str = "path"
    label_col: str = "label"
    workers: int | None = None


@dataclass(frozen=True)
class TagConfig:
    source: Path = Path(".")
    out: Path = Path("tags.parquet")
    model: Path | None = None
    batch_size: int = 256
    workers: int | None = None
    device: str = "auto"
    top_k: int = 3
    review_threshold: float = 0.5
    # When set, the review threshold is read from the model card's calibration table.
    target_precision: float | None = None
    format: str | None = None
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    path_col: str = "path"
    id_col: str | None = None
    # Manifest paths resolve against this folder and may not leave it.
    root: Path | None = None
    max_error_rate: float | None = None
    shard_size: int = 4096
    resume: bool = False
    incremental: Path | None = None
    hash: bool = False
    max_pixels: int = 64_000_000
    # Seconds one image may take to decode before it is reported as unreadable.
    time_limit: float = 30.0
    # With --incremental: stop (exit 5, previous output kept) when the source has more
    # than this share fewer images than PREV; an unmounted share looks like that.
    max_shrink: float = 0.5
    # CSV cells that a spreadsheet would run as formulas get a leading apostrophe.
    escape_formulas: bool = True
    # Like resume, but an unfinished run of other inputs or options is discarded, not refused.
    resume_if_possible: bool = False


@dataclass(frozen=True)
class ReviewConfig:
    tags: Path = Path("tags.parquet")
    out: Path = Path("review.xlsx")
    budget: int = 200
    # Share of the budget drawn at random: precision measured on those rows is unbiased
    # for the photos nobody reviewed.
    random_share: float = 0.25
    # Share of the budget for photos the out-of-scope detector flagged (why = out_of_scope):
    # where a catalog's "none of these" photos are, whose `other` labels tune learn's reject
    # threshold. Unused budget (fewer flagged photos) goes to typical labeled ones.
    flagged_share: float = 0.15
    exclude: tuple[Path, ...] = ()
    seed: int = 0
    # Longest side in pixels; 64 px JPEGs keep a 10,000-row workbook near 20 MB.
    thumbnail_size: int = 64
    # The class list when TAGS is a CSV (Parquet outputs carry theirs); default: bundled.
    model: Path | None = None
    overwrite: bool = False


@dataclass(frozen=True)
class LearnConfig:
    reviewed: tuple[Path, ...] = ()
    out: Path = Path("runs/learned")
    init: Path | None = None
    # k-fold cross-validation: k models each predict the fold they did not train on; those
    # out-of-fold predictions are what calibration and the accuracy in the card are fitted on.
    folds: int = 5
    # Passes over the reviewed photos and their views. With 8 views, 10 to 30 passes scored
    # alike on real catalog thumbnails; 15 did better than 10 on home photos
    # (docs/review-loop.md). That is 4.5 times the steps of the 30 plain passes of before views.
    epochs: int = 15
    # Jittered conversions of each reviewed photo learned beside it (photo_jitter.py): they
    # show the network what a slightly different shot of the same item converts to (0: off).
    views: int = 8
    batch_size: int = 32
    lr: float = 0.02
    seed: int = 0
    device: str = "auto"
    workers: int | None = None
    overwrite: bool = False
    # The reject (out-of-scope) threshold, from the reviewed photos (reject.py): the lowest that
    # flags at most this share of the in-scope ones. With calibrated low-confidence rows sent to
    # review as well, 10% leaves room under issue 18's 15% of in-scope photos rejected or reviewed.
    max_in_scope_flagged: float = 0.10
    # Fewer rows marked `other` than this: no evidence that flagging pays on this catalog, so
    # the threshold flags only fallback_flag_share of the in-scope ones.
    min_other: int = 10
    fallback_flag_share: float = 0.02
    # Outlier exposure: rows marked `other` push the softmax towards uniform while fine-tuning
    # (0: they are left out of training).
    outlier_weight: float = 0.5
    # Self-training (self_training.py): a `tag` output of the catalog the reviewed photos came
    # from. The pseudo_share of its photos nobody reviewed that a model fine-tuned on the
    # reviewed ones is surest of join the training with that model's label; each also trains
    # as pseudo_views jittered views. None: off. A share, not a softmax threshold: with
    # `other` rows as outlier exposure the softmax runs lower and varies from model to model,
    # and a threshold took 2 photos for one model and 529 for its fold models, which then no
    # longer resembled it (docs/review-loop.md). 0.75 is about what a softmax of 0.7 took on
    # catalog thumbnails, between the 0.6 and 0.8 that scored alike.
    catalog: Path | None = None
    pseudo_share: float = 0.75
    pseudo_views: int = 2
    # At most this many catalog photos (a seeded random draw). Measured with pools of about
    # 900; each photo taken adds 3 examples to every student's passes, so 2,000 keeps learn
    # at 200 labels within about 10 minutes on 2 cores.
    catalog_sample: int = 2000
    # A reviewed label that is none of the model's classes nor `other` names a class of the
    # retailer's own (new_classes.py); off: such a label is refused as a typo would be.
    new_classes: bool = False
    # Fewer reviewed photos than this cannot be dealt into cross-validation folds that each
    # train on and test the class: such a name is learned as `other` until more are labeled.
    min_new_class_labels: int = 5
