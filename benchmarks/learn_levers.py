"""Levers for ``learn``'s fine-tune, in process: the final model only, on ``review``'s choice.

    python benchmarks/learn_levers.py ../shared/realphoto-dev --seeds 0 1 2 3 4 5 --budget 200 \
        --variants base fm200 views4 swa

Photos are decoded once (as ``tag`` decodes them); ``review``'s choice (random slice +
typical photos, ``review.choose``) takes ``--budget`` labels; each variant fine-tunes the
bundled model on them and is scored on the photos not chosen. One JSON line per seed, and
the mean and paired difference against ``base`` at the end. ``cov95``: the share of those
photos that, taken most confident first, are 95% right (how well the confidence ranks). A screen: the CLI loop
(``benchmarks/review_loop.py``) decides.

Variants:
- ``base``: ``learn.fine_tune`` as ``learn`` runs it;
- ``fmN``: N random Fashion-MNIST training images join the labels (rehearsal);
- ``viewsK``: K extra conversions of each labelled photo, each from a jittered photo
  (``photo_jitter.jitter_photo``: turn, crop, brightness, contrast; ``--jitter-scale``)
  before the one conversion, as ``learn --views K`` makes them;
- ``repK``: the labelled photos K extra times (the steps of ``viewsK`` without the jitter);
- ``viewsKxN``: N such models (seeds apart) and the mean of their softmax (a multi-network card);
- ``swa``: the weights averaged over the last third of the epochs;
- ``pseudoT[vK]``: self-training. A ``views8`` teacher labels the unlabelled pool; photos it is at
  least T sure of (``pseudo0.9``) join the labels with their teacher's label (and K jittered views
  each), and a student is fine-tuned from the bundled model on all of it. The pool is every photo
  not chosen, or with ``--split-pool`` half of them (scored on the other half: photos the
  student never saw, labelled or not); ``softT[vK]``: the same with the teacher's probabilities
  as the student's targets instead of its top class;
- ``[ens][soft]shareS[vK][rR]``: ``learn --catalog``'s rule (``share_student``): the teacher's
  surest share S of the pool, K views each (default 2), R rounds; ``soft``: its probabilities as
  targets; ``ens``: the first teacher is the mean of 5 fold models (learn trains them anyway);
- ``NAME@E``: the variant trained for E epochs instead of ``learn``'s default;
- ``NAME:key=value,...``: other ``LearnConfig`` values (``views8:lr=0.04``).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from catalog_tagger import photo_jitter
from catalog_tagger.checkpoint import LoadedModel, load_model
from catalog_tagger.config import LearnConfig
from catalog_tagger.data.labeled import decode_paths, fashion_mnist_data, jittered_views
from catalog_tagger.learn import fine_tune, stratified_folds
from catalog_tagger.out_of_scope import features_and_logits
from catalog_tagger.review import choose
from catalog_tagger.runtime import predict_logits_array
from catalog_tagger.self_training import CatalogPool, pseudo_labels


class MeanOfModels(torch.nn.Module):
    """The mean of several models' softmax, as log-probabilities (argmax = the ensemble's label)."""

    def __init__(self, models: list[torch.nn.Module]) -> None:
        super().__init__()
        self.models = torch.nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x).softmax(1) for m in self.models]).mean(0).log()


def swa_tune(init: LoadedModel, images: np.ndarray, labels: np.ndarray, config: LearnConfig, seed: int,
             start: float) -> torch.nn.Module:
    """``fine_tune`` with the weights averaged over the epochs after ``start`` (a share)."""
    averaged: list[torch.optim.swa_utils.AveragedModel] = []

    def average(epoch: int, model: torch.nn.Module) -> None:
        if epoch < int(start * config.epochs):
            return
        if not averaged:
            averaged.append(torch.optim.swa_utils.AveragedModel(model))
        averaged[0].update_parameters(model)

    fine_tune(init, images, labels, config, torch.device("cpu"), seed, after_epoch=average)
    # Batch-norm statistics of the averaged weights, from the labelled photos.
    net = copy.deepcopy(averaged[0].module)
    torch.optim.swa_utils.update_bn([(x.float() / 255,) for x in torch.from_numpy(images).split(64)], net)
    return net.eval()


def _taken(model: torch.nn.Module, catalog: CatalogPool, share: float) -> np.ndarray:
    """Which pool photos ``pseudo_labels`` takes (its rule, for scoring the labels it gives)."""
    probs = torch.from_numpy(predict_logits_array(model, catalog.images, torch.device("cpu"), 1024)).softmax(1)
    sure = np.zeros(len(probs), bool)
    sure[np.argsort(-probs.max(1).values.numpy(), kind="stable")[: int(round(share * len(probs)))]] = True
    return sure


def share_student(variant: str, init: LoadedModel, paths: list[str], chosen: np.ndarray, pool: np.ndarray,
                  images: np.ndarray, xs: np.ndarray, ys: np.ndarray, config: LearnConfig, seed: int,
                  row: dict[str, object], spec: str, truth: np.ndarray) -> torch.nn.Module:
    """``learn --catalog``'s rule: a teacher fine-tuned on the labels (and ``config.views``
    jittered views) takes the ``S`` share of the pool it is surest of (``self_training.pseudo_labels``)
    with ``K`` views each; the student is fine-tuned from the bundled model on both. ``rR``: R
    rounds, each round's student the next one's teacher; ``soft``: the teacher's probabilities as
    targets for the pool photos instead of its top class."""
    match = re.fullmatch(r"(ens)?(soft)?share([0-9.]+)(?:v(\d+))?(?:r(\d+))?", variant)
    if match is None:
        raise SystemExit(f"unknown variant {variant}")
    ensemble, soft, share = bool(match[1]), bool(match[2]), float(match[3])
    k, rounds = int(match[4] or 2), int(match[5] or 1)
    device = torch.device("cpu")
    extra, view_of = jittered_views([paths[i] for i in chosen], init.config, config.views, seed, 2, False)
    images_l, labels_l = np.concatenate([xs, extra]), np.concatenate([ys, ys[view_of]])
    pool_index = np.flatnonzero(pool)
    more, more_of = jittered_views([paths[i] for i in pool_index], init.config, k, seed + 7, 2, False)
    catalog = CatalogPool([paths[i] for i in pool_index], images[pool_index], more, more_of, len(pool_index), 0, 0)
    model: torch.nn.Module
    if ensemble:  # the first teacher: the mean of learn's 5 fold models, each trained without one fold
        fold = stratified_folds(ys, 5, seed)[np.r_[np.arange(len(ys)), view_of]]  # views follow their photo
        model = MeanOfModels([fine_tune(init, images_l[fold != f], labels_l[fold != f], config, device, seed + f)
                              for f in range(5)])
    else:
        model = fine_tune(init, images_l, labels_l, config, device, seed)
    taken = []
    for _ in range(rounds):
        sure = pseudo_labels(model, catalog, share, device)
        targets: np.ndarray
        if soft:  # the same photos and views, the teacher's probabilities as targets
            probs = torch.from_numpy(predict_logits_array(model, sure.images, device)).softmax(1).numpy()
            targets = np.concatenate([np.eye(probs.shape[1], dtype=np.float32)[labels_l], probs.astype(np.float32)])
        else:
            targets = np.concatenate([labels_l, sure.labels])
        # The photos taken come first in sure.labels, in pool order.
        photos = np.flatnonzero(_taken(model, catalog, share))
        right = float((sure.labels[: sure.photos] == truth[pool_index][photos]).mean())
        taken.append(f"{sure.photos} at {right:.3f}")
        model = fine_tune(init, np.concatenate([images_l, sure.images]), targets, config, device, seed)
    row[f"{spec} pseudo"] = taken
    return model


def coverage_at(logits: np.ndarray, truth: np.ndarray, precision: float) -> float:
    """The largest share of rows that, taken by confidence, are right at least ``precision`` of
    the time (on the scored photos themselves: how well the confidence ranks, not a promise)."""
    probs = torch.from_numpy(logits).softmax(1).numpy()
    order = np.argsort(-probs.max(1))
    hits = np.cumsum(probs.argmax(1)[order] == truth[order]) / np.arange(1, len(order) + 1)
    good = np.flatnonzero(hits >= precision)
    return float((good[-1] + 1) / len(order)) if len(good) else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", type=Path, help="folder with images/ and labels.csv (file,label_id)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--budget", type=int, default=200)
    parser.add_argument("--jitter-scale", type=float, default=1.0,
                        help="scale photo_jitter's turn and crop ranges and its brightness/contrast spread")
    parser.add_argument("--style", help="only the photos of this style (labels.csv's column `style`)")
    parser.add_argument("--split-pool", action="store_true",
                        help="unlabelled pool = half the photos not chosen; every variant is scored on the other half")
    parser.add_argument("--variants", nargs="+", default=["base", "fm200", "views4", "swa"])
    args = parser.parse_args()

    scale = args.jitter_scale
    photo_jitter.MAX_TURN_DEGREES *= scale
    photo_jitter.MAX_CROP_SHARE *= scale
    photo_jitter.BRIGHTNESS = (1 - 0.15 * scale, 1 + 0.15 * scale)
    photo_jitter.CONTRAST = (1 - 0.2 * scale, 1 + 0.25 * scale)
    labels = pd.read_csv(args.photos / "labels.csv")
    if args.style:
        labels = labels[labels["style"] == args.style].reset_index(drop=True)
    init = load_model(None)
    paths = [str(args.photos / f) for f in labels["file"]]
    images, ok, _ = decode_paths(paths, init.config, 2, False)
    paths = [p for p, good in zip(paths, ok) if good]
    y = labels["label_id"].to_numpy()[ok]
    features, _ = features_and_logits(init.model, images)
    device = torch.device("cpu")
    fm = None
    results: dict[str, list[float]] = {v: [] for v in args.variants}

    for seed in args.seeds:
        started = time.perf_counter()
        frame = pd.DataFrame({"path": paths})
        chosen = np.array([i for i, _ in choose(frame, args.budget, 0.25, seed, features)])
        rest = np.ones(len(y), bool)
        rest[chosen] = False
        pool = rest.copy()
        if args.split_pool:
            halves = np.random.default_rng(seed + 99).random(len(y)) < 0.5
            pool, rest = rest & halves, rest & ~halves
        xs, ys = images[chosen], y[chosen]
        row: dict[str, object] = {"seed": seed}
        for spec in args.variants:
            # "views4@6": views4 trained for 6 epochs instead of learn's default;
            # "views8:lr=0.04,batch_size=64": other LearnConfig values.
            variant, _, overrides = spec.partition(":")
            variant_name, _, epochs = variant.partition("@")
            values = {k: type(getattr(LearnConfig, k))(v) for k, v in
                      (item.split("=") for item in overrides.split(",") if item)}
            config = LearnConfig(**({"epochs": int(epochs)} if epochs else {}), **values)
            if variant_name == "base":
                model = fine_tune(init, xs, ys, config, device, seed)
            elif variant_name.startswith("fm"):
                if fm is None:
                    fm = fashion_mnist_data(None, 5000, 0).train
                pick = np.random.default_rng(seed).choice(len(fm.labels), int(variant_name[2:]), replace=False)
                model = fine_tune(init, np.concatenate([xs, fm.images[pick]]),
                                  np.concatenate([ys, fm.labels[pick]]), config, device, seed)
            elif variant_name.startswith("views"):
                k_text, _, n_text = variant_name[5:].partition("x")
                extra, view_of = jittered_views([paths[i] for i in chosen], init.config, int(k_text), seed, 2, False)
                models = [fine_tune(init, np.concatenate([xs, extra]), np.concatenate([ys, ys[view_of]]),
                                    config, device, seed + 1000 * m) for m in range(int(n_text or 1))]
                model = models[0] if len(models) == 1 else MeanOfModels(models)
            elif variant_name.startswith("rep"):
                k = int(variant_name[3:])
                model = fine_tune(init, np.concatenate([xs] * (k + 1)), np.concatenate([ys] * (k + 1)),
                                  config, device, seed)
            elif re.match("(ens)?(soft)?share", variant_name):
                model = share_student(variant_name, init, paths, chosen, pool, images, xs, ys, config, seed, row,
                                      spec, y)
            elif variant_name.startswith(("pseudo", "soft")):
                soft = variant_name.startswith("soft")
                threshold_text, _, k_text = variant_name[4 if soft else 6:].partition("v")
                extra, view_of = jittered_views([paths[i] for i in chosen], init.config, 8, seed, 2, False)
                images_l, labels_l = np.concatenate([xs, extra]), np.concatenate([ys, ys[view_of]])
                teacher = fine_tune(init, images_l, labels_l, config, device, seed)
                probs = torch.from_numpy(predict_logits_array(teacher, images[pool], device)).softmax(1).numpy()
                sure = probs.max(1) >= float(threshold_text)
                pool_index = np.flatnonzero(pool)[sure]
                guessed = probs.argmax(1)[sure]
                row[f"{spec} pseudo"] = f"{int(sure.sum())} at {float((guessed == y[pool_index]).mean()):.3f}"
                more, more_of = jittered_views([paths[i] for i in pool_index], init.config, int(k_text or 0),
                                               seed + 7, 2, False)
                if soft:  # the teacher's probabilities as targets; the reviewed labels one-hot
                    taught = probs[sure].astype(np.float32)
                    targets = np.concatenate([np.eye(probs.shape[1], dtype=np.float32)[labels_l], taught,
                                              taught[more_of]])
                else:
                    targets = np.concatenate([labels_l, guessed, guessed[more_of]])
                model = fine_tune(init, np.concatenate([images_l, images[pool_index], more]), targets, config,
                                  device, seed + 1)
            elif variant_name == "swa":
                model = swa_tune(init, xs, ys, config, seed, 2 / 3)
            else:
                raise SystemExit(f"unknown variant {variant}")
            logits = predict_logits_array(model, images, device)
            results[spec].append(float((logits.argmax(1) == y)[rest].mean()))
            row[spec] = round(results[spec][-1], 4)
            row[f"{spec} cov95"] = round(coverage_at(logits[rest], y[rest], 0.95), 3)
        row["seconds"] = round(time.perf_counter() - started)
        print(json.dumps(row), flush=True)
    def name(spec: str) -> str:
        return re.split("[@:]", spec)[0]

    base = np.array(next((v for k, v in results.items() if name(k) == "base"), []))
    for variant, values in results.items():
        line = {"variant": variant, "mean": round(float(np.mean(values)), 4)}
        if len(base) and name(variant) != "base":
            diff = np.array(values) - base
            line.update({"paired mean": round(float(diff.mean()), 4), "ahead": int((diff > 0).sum()),
                         "of": len(diff)})
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
