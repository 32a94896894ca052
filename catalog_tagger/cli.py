"""The command line: a thin Click layer over the library.

Each command parses its options into a config dataclass (whose fields are the defaults),
calls one library function, and turns ``CatalogTaggerError`` into one line on stderr and
the documented exit code.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import click

from . import __version__
from .config import DEVICES, EvalConfig, LearnConfig, ReviewConfig, TagConfig, TrainConfig
from .errors import EXIT_CODES, CatalogTaggerError, OutputError, as_output_error
from .writers import WRITERS

F = TypeVar("F", bound=Callable[..., Any])

EXIT_CODES_HELP = "\b\nExit codes:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items())


def default(config_cls: type, name: str) -> Any:
    """The default of a config field, so options and library share one source."""
    return {f.name: f.default for f in fields(config_cls)}[name]


class FiniteFloatRange(click.FloatRange):
    """A FloatRange that also refuses NaN and infinity, which pass every range comparison
    (a templated cron variable left as 'nan' would switch a check off silently)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def reports_errors(func: F) -> F:
    """Turn foreseeable errors into one clear line and the documented exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CatalogTaggerError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except OSError as exc:
            error = as_output_error(exc)
            if error is None:
                raise
            click.echo(f"error: {error}", err=True)
            sys.exit(error.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


class RecordingGroup(click.Group):
    """Keeps the raw arguments, so that a model card can record the exact command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["argv"] = list(args)
        return super().parse_args(ctx, args)


def _command_line(ctx: click.Context) -> str:
    return " ".join(shlex.quote(a) for a in ["catalog-tagger", *ctx.find_root().meta.get("argv", [])])


@click.group(cls=RecordingGroup, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="catalog-tagger")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars; warnings and errors only.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Tag product photos with garment types, and train or evaluate the model behind it."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    ctx.obj = {"progress": not quiet}


def _progress(ctx: click.Context) -> bool:
    return bool(ctx.obj and ctx.obj.get("progress"))


device_option = click.option(
    "--device", type=click.Choice(DEVICES), default="auto", show_default=True,
    help="Where the model runs; auto uses a CUDA GPU when present.",
)


def labeled_photo_options(func: F) -> F:
    """--data / --manifest / --path-col / --label-col, shared by train and evaluate."""
    for option in reversed([
        click.option("--data", type=click.Path(path_type=Path, file_okay=False),
                     help="Labeled photos instead of Fashion-MNIST: a folder with one sub-folder per class."),
        click.option("--manifest", type=click.Path(path_type=Path, dir_okay=False),
                     help="Labeled photos instead of Fashion-MNIST: a CSV with a path and a label column."),
        click.option("--path-col", default=default(TrainConfig, "path_col"), show_default=True),
        click.option("--label-col", default=default(TrainConfig, "label_col"), show_default=True),
    ]):
        func = option(func)
    return func


@cli.command(epilog=EXIT_CODES_HELP)
@click.option("--out", type=click.Path(path_type=Path), default=default(TrainConfig, "out"), show_default=True,
              help="Folder for the checkpoint, model.safetensors, its card and curves.")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Folder with the Fashion-MNIST IDX files.")
@click.option("--epochs", type=click.IntRange(1), default=default(TrainConfig, "epochs"), show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=default(TrainConfig, "batch_size"), show_default=True)
@click.option("--lr", type=FiniteFloatRange(0, min_open=True), default=default(TrainConfig, "lr"), show_default=True,
              help="Peak learning rate of the one-cycle schedule.")
@click.option("--seed", type=int, default=default(TrainConfig, "seed"), show_default=True)
@click.option("--val-size", type=click.IntRange(1), default=default(TrainConfig, "val_size"), show_default=True,
              help="Training images held out for validation.")
@click.option("--worn-prob", type=FiniteFloatRange(0, 1), default=default(TrainConfig, "worn_prob"),
              show_default=True, help="Share of tops and dresses shown worn by a simulated model (real photos).")
@click.option("--headless-prob", type=FiniteFloatRange(0, 1), default=default(TrainConfig, "headless_prob"),
              show_default=True, help="Share of those worn tops shown without a head (as tag crops worn photos).")
@click.option("--pair-prob", type=FiniteFloatRange(0, 1), default=default(TrainConfig, "pair_prob"),
              show_default=True, help="Share of shoes shown as a pair, side by side.")
@click.option("--floor-prob", type=FiniteFloatRange(0, 1), default=default(TrainConfig, "floor_prob"),
              show_default=True, help="Share of items whose dark inside is lifted as tag's conversion lifts it.")
@click.option("--above-prob", type=FiniteFloatRange(0, 1), default=default(TrainConfig, "above_prob"),
              show_default=True, help="Share of shoes shown from above, toes up, mostly as a pair (home photos).")
@click.option("--flip-tta/--no-flip-tta", default=default(TrainConfig, "flip_tta"), show_default=True,
              help="Average each prediction with the mirror image's (one more forward pass).")
@click.option("--mixed-precision/--no-mixed-precision", default=default(TrainConfig, "mixed_precision"),
              show_default=True, help="Train in bf16 where the GPU or CPU computes it natively (1.5x faster).")
@labeled_photo_options
@click.option("--input-size", type=click.IntRange(8), default=default(TrainConfig, "input_size"), show_default=True,
              help="Model input size in pixels (own photos only).")
@click.option("--channels", type=click.Choice(["1", "3"]), default=str(default(TrainConfig, "channels")),
              show_default=True, help="1 = grayscale, 3 = RGB (own photos only).")
@click.option("--val-fraction", type=FiniteFloatRange(0, 1, min_open=True, max_open=True),
              default=default(TrainConfig, "val_fraction"), show_default=True,
              help="Share of your own photos held out for validation (stratified).")
@click.option("--init", type=click.Path(path_type=Path), help="Fine-tune from this model (same classes).")
@click.option("--workers", type=click.IntRange(0), help="Decoding processes for your own photos.")
@device_option
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace the model already in --out (refused otherwise).")
@click.pass_context
@reports_errors
def train(ctx: click.Context, out: Path, data_dir: Path | None, epochs: int, batch_size: int, lr: float,
          seed: int, val_size: int, worn_prob: float, headless_prob: float, pair_prob: float, floor_prob: float,
          above_prob: float, flip_tta: bool, mixed_precision: bool, data: Path | None,
          manifest: Path | None, path_col: str, label_col: str, input_size: int, channels: str, val_fraction: float,
          init: Path | None, workers: int | None, device: str, resume: bool, overwrite: bool) -> None:
    """Train a garment classifier on Fashion-MNIST, or on your own labeled photos."""
    from .train import fit

    config = TrainConfig(out=out, data_dir=data_dir, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                         val_size=val_size, worn_prob=worn_prob, headless_prob=headless_prob, pair_prob=pair_prob,
                         floor_prob=floor_prob, above_prob=above_prob, flip_tta=flip_tta,
                         mixed_precision=mixed_precision, data=data, manifest=manifest, path_col=path_col,
                         label_col=label_col, input_size=input_size, channels=int(channels),
                         val_fraction=val_fraction, init=init, workers=workers, device=device, resume=resume,
                         overwrite=overwrite)
    card = fit(config, command=_command_line(ctx), progress=_progress(ctx))
    if not card:  # a non-zero rank of a torchrun job: rank 0 reports
        return
    metrics = card["metrics"]
    test = f", test accuracy {metrics['test_accuracy']:.4f}" if metrics["test_accuracy"] is not None else ""
    click.echo(f"trained {card['training']['seconds']:.0f}s: val accuracy {metrics['val_accuracy']:.4f}{test} "
               f"-> {out / card['weights_file']}", err=True)


@cli.command(epilog=EXIT_CODES_HELP)
@click.option("--model", type=click.Path(path_type=Path),
              help="Model (.safetensors, card .json or folder); default: bundled.")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Folder with the Fashion-MNIST IDX files.")
@click.option("--out", type=click.Path(path_type=Path),
              help="Folder for the report files (metrics, confusion matrix, grid).")
@click.option("--batch-size", type=click.IntRange(1), default=default(EvalConfig, "batch_size"), show_default=True)
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as one JSON object on stdout.")
@labeled_photo_options
@click.option("--workers", type=click.IntRange(0), help="Decoding processes for labeled photos.")
@click.pass_context
@reports_errors
def evaluate(ctx: click.Context, model: Path | None, data_dir: Path | None, out: Path | None, batch_size: int,
             device: str, as_json: bool, data: Path | None, manifest: Path | None, path_col: str, label_col: str,
             workers: int | None) -> None:
    """Measure a model on the Fashion-MNIST test set, or on your own labeled photos."""
    from .evaluate import evaluate_model

    config = EvalConfig(model=model, data_dir=data_dir, out=out, batch_size=batch_size, device=device, data=data,
                        manifest=manifest, path_col=path_col, label_col=label_col, workers=workers)
    result = evaluate_model(config, progress=_progress(ctx))
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"accuracy {result['accuracy']:.4f} on {result['n']} images (macro F1 {result['macro']['f1']:.4f})")
    width = max(len(name) for name in result["per_class"])
    click.echo(f"{'class':<{width}}  precision  recall     f1  support")
    for name, row in result["per_class"].items():
        click.echo(f"{name:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  {row['f1']:.4f}  "
                   f"{row['support']:7d}")
    flagged = result.get("out_of_scope")
    if flagged:  # every image here is in scope: whatever the detector flags, it flags wrongly
        click.echo(f"out of scope, wrongly: {flagged['in_scope_flagged']:.2%} of these in-scope images ("
                   + ", ".join(f"{k} {v:.1%}" for k, v in flagged["per_class"].items() if v is not None) + ")")
    if result.get("report_files"):
        click.echo("report: " + ", ".join(result["report_files"]))


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=default(TagConfig, "out"), show_default=True,
              help="Output file; the format follows its extension unless --format is given.")
@click.option("--format", "fmt", type=click.Choice(sorted(WRITERS)), help="Output format (default: from --out).")
@click.option("--raw-csv", is_flag=True, help="Write CSV text cells exactly as they are, even those starting with "
              "= + - @ that spreadsheets run as formulas (by default they get a leading apostrophe).")
@click.option("--model", type=click.Path(path_type=Path),
              help="Model (.safetensors, card .json or folder); default: bundled.")
@click.option("--batch-size", type=click.IntRange(1), default=default(TagConfig, "batch_size"), show_default=True)
@click.option("--workers", type=click.IntRange(0), help="Decoding processes (default: one per core).")
@device_option
@click.option("--top-k", type=click.IntRange(1), default=default(TagConfig, "top_k"), show_default=True,
              help="How many ranked labels each row lists.")
@click.option("--review-threshold", type=FiniteFloatRange(0, 1), default=default(TagConfig, "review_threshold"),
              show_default=True, help="Rows with a lower confidence get needs_review = true.")
@click.option("--target-precision", type=FiniteFloatRange(0, 1, min_open=True),
              help="Set needs_review from the model's calibration so auto-accepted rows reach this precision "
                   "(on validation data); overrides --review-threshold.")
@click.option("--ext", "extensions", multiple=True, help="File extension to tag in a folder (repeatable; "
              f"default: {', '.join(default(TagConfig, 'extensions'))}).")
@click.option("--path-col", default=default(TagConfig, "path_col"), show_default=True,
              help="Manifest column with image paths.")
@click.option("--id-col", help="Manifest column with image ids (default: the path).")
@click.option("--root", type=click.Path(path_type=Path, file_okay=False),
              help="Resolve manifest paths against this folder and refuse paths that leave it.")
@click.option("--max-error-rate", type=FiniteFloatRange(0, 1),
              help="Exit with code 7 (after writing) when a larger share of images failed.")
@click.option("--shard-size", type=click.IntRange(1), default=default(TagConfig, "shard_size"), show_default=True,
              help="Images per committed shard (the unit of --resume).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run, keeping its finished shards.")
@click.option("--resume-if-possible", is_flag=True,
              help="Like --resume, but an unfinished run of other inputs or options is started over instead "
                   "of refused (for unattended jobs).")
@click.option("--incremental", type=click.Path(path_type=Path),
              help="Previous output: unchanged images (path, size, mtime) are carried over, not re-tagged.")
@click.option("--max-shrink", type=FiniteFloatRange(0, 1), default=default(TagConfig, "max_shrink"), show_default=True,
              help="With --incremental, stop (exit 5, previous output kept) when the source has more than this "
                   "share fewer images than the previous output.")
@click.option("--hash", "use_hash", is_flag=True, help="Record content sha256; with --incremental, compare it too.")
@click.option("--max-pixels", type=click.IntRange(1), default=default(TagConfig, "max_pixels"), show_default=True,
              help="Images needing more decoded pixels are rejected as too_large.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this machine; ray: a Ray cluster (same output file, same options).")
@click.option("--ray-address", help="With --engine ray: the cluster to join (default: $RAY_ADDRESS, else a Ray "
              "instance on this machine).")
@click.option("--num-gpus-per-worker", type=FiniteFloatRange(0),
              help="With --engine ray: GPUs per shard task, which then runs the model on its GPU (default 0).")
@click.option("--concurrency", type=click.IntRange(1),
              help="With --engine ray: shard tasks at once (default: as many as the cluster's CPUs, or GPUs, hold).")
@click.option("--time-limit", type=FiniteFloatRange(0, min_open=True), default=default(TagConfig, "time_limit"),
              show_default=True, help="Seconds one image may take to decode before it is reported as unreadable.")
@click.pass_context
@reports_errors
def tag(ctx: click.Context, source: Path, out: Path, fmt: str | None, raw_csv: bool, model: Path | None,
        batch_size: int, workers: int | None, device: str, top_k: int, review_threshold: float,
        target_precision: float | None, extensions: tuple[str, ...], path_col: str, id_col: str | None,
        root: Path | None, max_error_rate: float | None, shard_size: int, resume: bool, resume_if_possible: bool,
        incremental: Path | None, max_shrink: float, use_hash: bool, max_pixels: int, engine: str,
        ray_address: str | None, num_gpus_per_worker: float | None, concurrency: int | None,
        time_limit: float) -> None:
    """Tag every image in SOURCE (a folder, or a CSV/Parquet manifest) into one Parquet or CSV file.

    Every input gets exactly one row, in input order; images that cannot be used get a
    status and an error message instead of a label. A summary goes to stderr and to
    OUT.summary.json.
    """
    from .run import check_error_rate, run_tagging

    config = TagConfig(
        source=source, out=out, model=model, batch_size=batch_size, workers=workers, device=device, top_k=top_k,
        review_threshold=review_threshold, target_precision=target_precision, format=fmt,
        extensions=extensions or default(TagConfig, "extensions"), path_col=path_col, id_col=id_col, root=root,
        max_error_rate=max_error_rate, shard_size=shard_size, resume=resume, incremental=incremental,
        hash=use_hash, max_pixels=max_pixels, time_limit=time_limit, max_shrink=max_shrink,
        escape_formulas=not raw_csv, resume_if_possible=resume_if_possible,
    )
    summary = run_tagging(config, progress=_progress(ctx),
                          engine=_engine(engine, ray_address, num_gpus_per_worker, concurrency))
    if not ctx.find_root().params.get("quiet"):
        click.echo(summary.text(), err=True)
    check_error_rate(summary, max_error_rate)


def _engine(name: str, ray_address: str | None, num_gpus_per_worker: float | None,
            concurrency: int | None) -> Any:
    """The engine that tags the run's shards; Ray's options are refused, not ignored, without Ray."""
    if name == "local":
        given = [flag for flag, value in (("--ray-address", ray_address), ("--concurrency", concurrency),
                                          ("--num-gpus-per-worker", num_gpus_per_worker)) if value is not None]
        if given:
            raise click.UsageError(f"{', '.join(given)} only apply with --engine ray")
        return None  # run_tagging's default: this machine
    from .ray_engine import RayEngine

    return RayEngine(ray_address, concurrency, num_gpus_per_worker or 0.0)


@cli.command(epilog=EXIT_CODES_HELP)
@click.option("--model", type=click.Path(path_type=Path), required=True,
              help="Model (.safetensors, card .json or folder) whose card gets the calibration.")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Folder with the Fashion-MNIST IDX files.")
@device_option
@click.pass_context
@reports_errors
def calibrate(ctx: click.Context, model: Path, data_dir: Path | None, device: str) -> None:
    """Fit temperature scaling for an existing model on its validation split (stored in its card).

    `train` already does this; use it for models trained before calibration existed.
    """
    from .train import calibrate_saved_model

    folder = model if model.is_dir() else model.parent
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot store the calibration: the model folder {folder} is not writable")
    card = calibrate_saved_model(model, data_dir, device, progress=_progress(ctx))
    cal = card["calibration"]
    click.echo(f"temperature {cal['temperature']:.3f}: validation ECE {cal['val_ece_before']:.4f} -> "
               f"{cal['val_ece_after']:.4f} ({cal['fitted_on']})", err=True)


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("tags", type=click.Path(path_type=Path))
@click.option("--budget", type=click.IntRange(1), default=default(ReviewConfig, "budget"), show_default=True,
              help="Photos to put in front of a person.")
@click.option("--out", type=click.Path(path_type=Path), default=default(ReviewConfig, "out"), show_default=True,
              help="review.xlsx (a workbook) or review.html (one self-contained page).")
@click.option("--exclude", type=click.Path(path_type=Path), multiple=True,
              help="Earlier review workbook, CSV or HTML page whose photos are not asked again (repeatable).")
@click.option("--random-share", type=FiniteFloatRange(0, 1), default=default(ReviewConfig, "random_share"),
              show_default=True, help="Share of the budget drawn at random, for an unbiased precision estimate.")
@click.option("--flagged-share", type=FiniteFloatRange(0, 1), default=default(ReviewConfig, "flagged_share"),
              show_default=True, help="Share of the budget for photos flagged out of scope, for learn's reject "
                                      "threshold.")
@click.option("--seed", type=int, default=default(ReviewConfig, "seed"), show_default=True)
@click.option("--thumbnail-size", type=click.IntRange(16, 512), default=default(ReviewConfig, "thumbnail_size"),
              show_default=True, help="Longest side of each thumbnail in pixels.")
@click.option("--model", type=click.Path(path_type=Path),
              help="Model whose features group the photos (and whose class names fill the drop-down when TAGS "
                   "is a CSV); default: bundled.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.pass_context
@reports_errors
def review(ctx: click.Context, tags: Path, budget: int, out: Path, exclude: tuple[Path, ...], random_share: float,
           flagged_share: float, seed: int, thumbnail_size: int, model: Path | None, overwrite: bool) -> None:
    """Choose the photos of a `tag` output (TAGS) most worth labelling, into a workbook or page.

    A random slice (why = random) measures the model without bias; a share goes to photos
    flagged out of scope (why = out_of_scope); the rest are the most typical photos of as
    many different kinds of photo as the budget allows (why = typical). Fill in
    correct_label ('other' for a photo of none of the classes), then run `catalog-tagger learn`.
    """
    from .review import build_review

    config = ReviewConfig(tags=tags, out=out, budget=budget, random_share=random_share, flagged_share=flagged_share,
                          exclude=exclude, seed=seed, thumbnail_size=thumbnail_size, model=model, overwrite=overwrite)
    result = build_review(config)
    whys = {w: sum(1 for i in result.items if i.why == w) for w in ("random", "out_of_scope", "typical")}
    click.echo(f"{len(result.items)} photos to review ({whys['random']} random, {whys['out_of_scope']} flagged out "
               f"of scope, {whys['typical']} typical; "
               f"{result.candidates} candidates, {result.excluded} already reviewed) -> {result.out} "
               f"({_size(result.bytes)})", err=True)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("reviewed", type=click.Path(path_type=Path), nargs=-1, required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the new model.")
@click.option("--init", type=click.Path(path_type=Path), help="Model to start from (default: bundled).")
@click.option("--folds", type=click.IntRange(2), default=default(LearnConfig, "folds"), show_default=True,
              help="Cross-validation folds for the accuracy and calibration in the card.")
@click.option("--epochs", type=click.IntRange(1), default=default(LearnConfig, "epochs"), show_default=True)
@click.option("--views", type=click.IntRange(0), default=default(LearnConfig, "views"), show_default=True,
              help="Jittered copies of each reviewed photo (turned, cropped, lit) learned beside it (0: none).")
@click.option("--batch-size", type=click.IntRange(1), default=default(LearnConfig, "batch_size"), show_default=True)
@click.option("--lr", type=FiniteFloatRange(0, min_open=True), default=default(LearnConfig, "lr"), show_default=True)
@click.option("--seed", type=int, default=default(LearnConfig, "seed"), show_default=True)
@click.option("--max-in-scope-flagged", type=FiniteFloatRange(0, 1),
              default=default(LearnConfig, "max_in_scope_flagged"), show_default=True,
              help="Reject threshold: flag at most this share of the reviewed in-scope photos (out of fold).")
@click.option("--outlier-weight", type=FiniteFloatRange(0), default=default(LearnConfig, "outlier_weight"),
              show_default=True, help="Weight of the rows marked 'other' as outlier exposure in fine-tuning (0: off).")
@click.option("--catalog", type=click.Path(path_type=Path),
              help="The tag output (Parquet/CSV) of the catalog: photos nobody reviewed are learned too, "
                   "those the model is surest of, with its label (self-training).")
@click.option("--pseudo-share", type=FiniteFloatRange(0, 1), default=default(LearnConfig, "pseudo_share"),
              show_default=True, help="With --catalog: learn this share of its photos, those the model is surest of.")
@click.option("--catalog-sample", type=click.IntRange(1), default=default(LearnConfig, "catalog_sample"),
              show_default=True, help="With --catalog: at most this many of its photos (a random draw).")
@click.option("--new-classes", is_flag=True,
              help="A correct_label that is none of the classes nor 'other' (e.g. Watch) becomes a class of "
                   f"your own once it has {LearnConfig.min_new_class_labels} photos (default: refused).")
@click.option("--workers", type=click.IntRange(0), help="Decoding processes (default: one per core).")
@device_option
@click.option("--overwrite", is_flag=True, help="Replace the model in --out if there is one.")
@click.pass_context
@reports_errors
def learn(ctx: click.Context, reviewed: tuple[Path, ...], out: Path, init: Path | None, folds: int, epochs: int,
          views: int, batch_size: int, lr: float, seed: int, max_in_scope_flagged: float, outlier_weight: float,
          catalog: Path | None, pseudo_share: float, catalog_sample: int, new_classes: bool, workers: int | None,
          device: str, overwrite: bool) -> None:
    """Fine-tune on filled review workbooks or CSVs (path + correct_label) into a new model folder.

    Empty correct_label cells are not reviewed; 'other' (none of the classes) tunes the
    out-of-scope threshold and teaches the model what is not a class. Accuracy, calibration
    and that threshold come from k-fold out-of-fold predictions.
    """
    from .learn import learn as learn_from

    config = LearnConfig(reviewed=reviewed, out=out, init=init, folds=folds, epochs=epochs, views=views,
                         batch_size=batch_size, lr=lr, seed=seed, device=device, workers=workers,
                         overwrite=overwrite, max_in_scope_flagged=max_in_scope_flagged,
                         outlier_weight=outlier_weight, catalog=catalog, pseudo_share=pseudo_share,
                         catalog_sample=catalog_sample, new_classes=new_classes)
    card = learn_from(config, command=_command_line(ctx), progress=_progress(ctx))
    m, t = card["metrics"], card["training"]
    click.echo(f"learned from {t['labels']} photos ({t['other']} other, {t['missing_photos']} missing, "
               f"{t['skipped_images']} undecodable) in {t['seconds']:.0f}s: cross-validated accuracy "
               f"{m['cv_accuracy']:.3f} (was {m['init_accuracy']:.3f}) -> {out}", err=True)
    if t["new_classes"]:
        click.echo("classes of your own: " + ", ".join(f"{c} ({n} photos)" for c, n in t["new_classes"].items()),
                   err=True)
    if t["too_few_for_a_class"]:
        click.echo(f"learned as 'other' until each has {LearnConfig.min_new_class_labels} photos: "
                   + ", ".join(f"{c} ({n})" for c, n in t["too_few_for_a_class"].items()), err=True)
    if t["self_training"]:
        st = t["self_training"]
        click.echo(f"self-training: {st['pseudo_labeled']} of {st['pool']} catalog photos not reviewed learned with "
                   f"the label the model was surest of ({st['flagged_left_out']} flagged out of scope left out)",
                   err=True)
    chosen = card["out_of_scope"]["chosen"]
    caught = chosen["other_caught"]["share"]
    other = f" and catches {caught:.1%} of the {chosen['other']} marked other" if chosen["other"] else ""
    click.echo(f"out of scope: {chosen['rule']}; out of fold it flags {chosen['in_scope_flagged']['share']:.1%} "
               f"of them{other}", err=True)


def main() -> None:
    cli(prog_name="catalog-tagger")

