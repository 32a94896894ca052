"""Out-of-scope detection: how many photos that are none of the ten classes each score catches,
and how many in-scope photos it flags by mistake.

    python benchmarks/out_of_scope.py measure --other ../shared/realphoto-other \\
        --dev ../shared/realphoto-dev --dev2 ../shared/realphoto-dev2 [--model PATH] [--json FILE]
    python benchmarks/out_of_scope.py finetune --out runs/oe-seed0 [--epochs 3] [--seed 0] [--weight 0.5]

``measure`` decodes every photo exactly as ``catalog-tagger tag`` does (decode.decode_file,
the same preprocessing and model), computes each candidate score, fixes every threshold on
Fashion-MNIST alone (a percentile of the score on the validation split the bundled model was
never trained on, or on those images rendered as catalog photos and decoded back) and
reports, per set, class and style: the share of out-of-scope photos caught and of in-scope
photos flagged, alone and together with the review rule (confidence < 0.5). The shared
photos never set a threshold; the "oracle" column, the threshold at which 15% of in-scope
photos are flagged, is read off them to show each score's ceiling.

``finetune`` is outlier exposure (Hendrycks et al. 2019): a few epochs from the bundled
model with an extra loss pushing the softmax towards uniform on outlier images the project
draws itself (noise, text, shapes, stripes, blanks, patches and mixtures of Fashion-MNIST
items); ``measure --model runs/oe-seed0`` then measures it the same way.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from catalog_tagger import out_of_scope as oos
from catalog_tagger.calibration import softmax
from catalog_tagger.checkpoint import LoadedModel, load_model
from catalog_tagger.data.fashion_mnist import load_split, train_val_indices
from catalog_tagger.decode import decode_file
from catalog_tagger.model import FASHION_MNIST_CLASSES, ModelConfig
from catalog_tagger.preprocess import to_model_array
from catalog_tagger.runtime import prepare_model
from catalog_tagger.synth import render_catalog_photo
from catalog_tagger.tagging import TagSettings

REVIEW_THRESHOLD = TagSettings().review_threshold
FLAG_BUDGET = 0.15  # the ceiling on in-scope photos rejected or sent to review


@dataclass
class Scored:
    """One set of images: model outputs, the 28x28 inputs and per-image metadata."""

    name: str
    images: np.ndarray  # uint8 (N, 1, 28, 28)
    feats: np.ndarray
    logits: np.ndarray
    meta: pd.DataFrame  # columns: group (class or article), style


def decode_folder(folder: Path, config: ModelConfig) -> tuple[np.ndarray, pd.DataFrame]:
    """Every photo in ``folder/labels.csv`` as tagging decodes it."""
    labels = pd.read_csv(folder / "labels.csv")
    settings = TagSettings()
    arrays, keep = [], []
    for i, f in enumerate(labels["file"]):
        d = decode_file(str(folder / f), config, settings.max_pixels, settings.time_limit)
        if d.status == "ok":
            arrays.append(d.array)
            keep.append(i)
    return np.stack(arrays), labels.iloc[keep].reset_index(drop=True)


def rendered(images: np.ndarray, config: ModelConfig, seed: int = 0) -> np.ndarray:
    """Fashion-MNIST items rendered as small catalog photos (dark on white, a margin, a little
    sensor noise) and decoded back: in-scope images with the conversion's own artefacts."""
    rng = np.random.default_rng(seed)
    out = []
    for item in images:
        scale = int(rng.integers(2, 5))
        side = 28 * scale
        canvas = (side + int(rng.integers(4, 20)), side + int(rng.integers(4, 40)))
        photo = render_catalog_photo(item, scale=scale, canvas=canvas, noise=float(rng.uniform(0, 3)), rng=rng)
        out.append(to_model_array(photo, config))
    return np.stack(out)


FIT_SIZE = 20_000  # training images the feature statistics are fitted on (plenty for 128-d)


def collect(model_path: Path | None, folders: dict[str, Path], cache: Path) -> tuple[LoadedModel, dict[str, Scored]]:
    """Features, logits and inputs of every set; decoded inputs and outputs are cached in ``cache``
    (keyed by the model's sha256), because decoding 2,000 photos takes minutes on two cores."""
    loaded = load_model(model_path)
    net = prepare_model(loaded.model, torch.device("cpu"))
    cache.mkdir(parents=True, exist_ok=True)
    inputs_file = cache / "inputs.npz"
    if inputs_file.exists():
        stored = np.load(inputs_file, allow_pickle=False)
        inputs = {k: stored[k] for k in stored.files}
    else:
        inputs = {}
    train = load_split("train")
    test = load_split("test")
    fit_idx, val_idx = train_val_indices(len(train), loaded.card["training"]["config"].get("val_size", 5000),
                                         loaded.card["training"]["config"].get("seed", 0))
    fit_idx = np.sort(np.random.default_rng(0).choice(fit_idx, FIT_SIZE, replace=False))
    sets: dict[str, tuple[np.ndarray, pd.DataFrame]] = {
        "fmnist-fit": (train.images[fit_idx], _class_meta(train.labels[fit_idx])),
        "fmnist-val": (train.images[val_idx], _class_meta(train.labels[val_idx])),
        "fmnist-test": (test.images, _class_meta(test.labels)),
    }
    if "rendered-val" not in inputs:
        inputs["rendered-val"] = rendered(train.images[val_idx], loaded.config)
    sets["rendered-val"] = (inputs["rendered-val"], _class_meta(train.labels[val_idx]))
    for name, folder in folders.items():
        if f"{name}-images" not in inputs:
            images, meta = decode_folder(folder, loaded.config)
            inputs[f"{name}-images"] = images
            inputs[f"{name}-files"] = meta["file"].to_numpy(str)
        labels = pd.read_csv(folder / "labels.csv").set_index("file").loc[inputs[f"{name}-files"]].reset_index()
        sets[name] = (inputs[f"{name}-images"], _photo_meta(labels))
    np.savez_compressed(inputs_file, **inputs)
    out_file = cache / f"outputs-{loaded.sha256[:12]}.npz"
    outputs = dict(np.load(out_file)) if out_file.exists() else {}
    result = {}
    for name, (images, meta) in sets.items():
        if f"{name}-feats" not in outputs:
            outputs[f"{name}-feats"], outputs[f"{name}-logits"] = oos.features_and_logits(net, images)
            np.savez(out_file, **outputs)
        result[name] = Scored(name, images if images.ndim == 4 else images[:, None],
                              outputs[f"{name}-feats"], outputs[f"{name}-logits"], meta)
    return loaded, result


def _class_meta(labels: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"group": [FASHION_MNIST_CLASSES[i] for i in labels], "label_id": labels, "style": ""})


def _photo_meta(labels: pd.DataFrame) -> pd.DataFrame:
    if "article" in labels:
        return pd.DataFrame({"group": labels["article"], "label_id": -1, "style": ""})
    return pd.DataFrame({"group": labels["label_name"], "label_id": labels["label_id"],
                         "style": labels["style"] if "style" in labels else ""})


# ---------------------------------------------------------------------------- scores


def knn_distance(feats: np.ndarray, bank: np.ndarray, k: int = 10) -> np.ndarray:
    """1 - cosine similarity to the k-th nearest training feature (Sun et al. 2022)."""
    a = feats / np.linalg.norm(feats, axis=1, keepdims=True).clip(1e-9)
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True).clip(1e-9)
    out = []
    for start in range(0, len(a), 2048):
        sims = a[start:start + 2048] @ b.T
        out.append(1 - np.partition(sims, -k, axis=1)[:, -k])
    return np.concatenate(out)


def score_functions(fit: Scored, val: Scored, temperature: float) -> dict[str, Callable[[Scored], np.ndarray]]:
    """Every candidate score, fitted on ``fit`` (training images) where it needs fitting."""
    labels = fit.meta["label_id"].to_numpy()
    gaussian = oos.fit_feature_gaussian(fit.feats, labels, len(FASHION_MNIST_CLASSES))
    background = oos.fit_feature_gaussian(fit.feats, np.zeros(len(labels), int), 1)
    log_ink = lambda s: np.log(oos.ink_fraction(s.images) + 1e-3)  # noqa: E731
    centre = float(np.median(log_ink(val)))
    spread = float(1.4826 * np.median(np.abs(log_ink(val) - centre)))
    val_ink = oos.ink_fraction(val.images)
    low, high = np.quantile(val_ink, [0.002, 0.998])

    def with_ink_bounds(s: Scored, score: np.ndarray) -> np.ndarray:
        ink = oos.ink_fraction(s.images)
        return np.where((ink < low) | (ink > high), np.inf, score)

    scores = {
        "max softmax": lambda s: oos.max_softmax(s.logits, temperature),
        "margin": lambda s: -np.diff(np.sort(softmax(s.logits, temperature), 1)[:, -2:], axis=1)[:, 0],
        "energy": lambda s: oos.energy(s.logits),
        "mahalanobis": lambda s: oos.mahalanobis(s.feats, gaussian),
        "relative mahalanobis": lambda s: oos.relative_mahalanobis(s.feats, gaussian, background),
        "kNN (k=10, cosine)": lambda s: knn_distance(s.feats, fit.feats),
        # two-sided: robust |z| of the log share of ink
        "ink share": lambda s: np.abs(log_ink(s) - centre) / spread,
        "energy + ink bounds": lambda s: with_ink_bounds(s, oos.energy(s.logits)),
        "rel. mahalanobis + ink bounds": lambda s: with_ink_bounds(
            s, oos.relative_mahalanobis(s.feats, gaussian, background)),
    }
    return scores


def _auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of an out-of-scope photo > score of an in-scope one), ties counted half."""
    ranks = pd.Series(np.concatenate([positive, negative])).rank().to_numpy()[:len(positive)]
    return float((ranks.sum() - len(positive) * (len(positive) + 1) / 2) / (len(positive) * len(negative)))


# ---------------------------------------------------------------------------- measuring


def needs_review(s: Scored, temperature: float) -> np.ndarray:
    """The existing review rule: calibrated confidence below the review threshold."""
    return softmax(s.logits, temperature).max(1) < REVIEW_THRESHOLD


def oracle_threshold(inscope_score: np.ndarray, inscope_review: np.ndarray, budget: float = FLAG_BUDGET
                     ) -> float | None:
    """The lowest threshold at which at most ``budget`` of in-scope rows are flagged (with the
    review rule when ``inscope_review`` is given); None when review alone exceeds it."""
    base = inscope_review.mean()
    if base > budget:
        return None
    candidates = np.sort(inscope_score[~inscope_review])[::-1]
    # flagging the top m non-review rows adds m/N to the flagged share
    m = int(math.floor((budget - base) * len(inscope_score) + 1e-9))
    return float(candidates[m]) if m < len(candidates) else float(candidates[-1]) - 1e-9


def evaluate(sets: dict[str, Scored], temperature: float, card: oos.Detector | None = None
             ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per (score, threshold rule) with the shares flagged on every set, and the
    per-group (class / article / style) detail for every rule."""
    fns = score_functions(sets["fmnist-fit"], sets["fmnist-val"], temperature)
    inscope = ["dev", "dev2"]
    rows, detail = [], []
    for name, fn in fns.items():
        scores = {k: fn(s) for k, s in sets.items() if k != "fmnist-fit"}
        review = {k: needs_review(s, temperature) for k, s in sets.items() if k != "fmnist-fit"}
        pooled = np.concatenate([scores[k] for k in inscope])
        pooled_review = np.concatenate([review[k] for k in inscope])
        rules = {
            "FM-val p95": oos.fit_threshold(scores["fmnist-val"], 0.05),
            "FM-val p99": oos.fit_threshold(scores["fmnist-val"], 0.01),
            "rendered p95": oos.fit_threshold(scores["rendered-val"], 0.05),
            "oracle 15% alone": oracle_threshold(pooled, np.zeros(len(pooled), bool)),
            "oracle 15% w/ review": oracle_threshold(pooled, pooled_review),
        }
        auroc = _auroc(scores["other"], pooled)
        for rule, thr in rules.items():
            row = {"score": name, "rule": rule, "threshold": thr, "AUROC": auroc}
            for k, s in scores.items():
                if thr is None:
                    continue
                flag = s > thr
                row[k] = flag.mean()
                row[k + " +review"] = (flag | review[k]).mean()
                meta = sets[k].meta
                for g, idx in meta.groupby(["style", "group"]).indices.items():
                    detail.append({"score": name, "rule": rule, "set": k, "style": g[0], "group": g[1], "n": len(idx),
                                   "flagged": flag[idx].mean(), "flagged+review": (flag | review[k])[idx].mean()})
            if thr is not None:
                for style in ("studio", "home"):
                    m = (sets["dev2"].meta["style"] == style).to_numpy()
                    row[f"dev2 {style}"] = (scores["dev2"][m] > thr).mean()
                    row[f"dev2 {style} +review"] = ((scores["dev2"][m] > thr) | review["dev2"][m]).mean()
                f = np.concatenate([scores[k] > thr for k in inscope])
                row["in-scope"] = f.mean()
                row["in-scope +review"] = (f | pooled_review).mean()
            rows.append(row)
    fit, val = sets["fmnist-fit"], sets["fmnist-val"]
    for method in oos.METHODS:
        for share in (0.05, 0.01, 0.005, 0.002, 0.001):
            detector = oos.fit_detector(method, val.feats, val.logits, val.images, fit.feats,
                                        fit.meta["label_id"].to_numpy(), len(FASHION_MNIST_CLASSES), flag_share=share)
            rows.append(_library_row(sets, temperature, detector, f"Detector {method}",
                                     f"FM-val p{100 * (1 - share):g}", detail))
    if card is not None:
        rows.append(_library_row(sets, temperature, card, "the card's detector (as `tag` runs it)",
                                 f"{card.method}, {card.fitted_on}", detail))
    return pd.DataFrame(rows), pd.DataFrame(detail)


def _library_row(sets: dict[str, Scored], temperature: float, detector: oos.Detector, name: str, rule: str,
                 detail: list[dict]) -> dict:
    """The decision exactly as catalog_tagger.out_of_scope.Detector makes it, and what it does to
    the accuracy of the in-scope rows it leaves labeled."""
    row: dict[str, Any] = {"score": name, "rule": rule, "threshold": detector.threshold}
    inscope_flags, inscope_review = [], []
    for k, s in sets.items():
        if k == "fmnist-fit":
            continue
        flag = np.array([r is not None for r in detector.reasons(s.feats, s.logits, s.images)])
        review = needs_review(s, temperature)
        row[k], row[k + " +review"] = flag.mean(), (flag | review).mean()
        for g, idx in s.meta.groupby(["style", "group"]).indices.items():
            detail.append({"score": name, "rule": rule, "set": k, "style": g[0], "group": g[1], "n": len(idx),
                           "flagged": flag[idx].mean(), "flagged+review": (flag | review)[idx].mean()})
        if k == "dev2":
            for style in ("studio", "home"):
                m = (s.meta["style"] == style).to_numpy()
                row[f"dev2 {style}"], row[f"dev2 {style} +review"] = flag[m].mean(), (flag | review)[m].mean()
        if k in ("dev", "dev2"):
            inscope_flags.append(flag)
            inscope_review.append(review)
            correct = s.logits.argmax(1) == s.meta["label_id"].to_numpy()
            row[f"{k} accuracy"], row[f"{k} accuracy kept"] = correct.mean(), correct[~flag].mean()
            # right labels the detector took away, as a share of the set
            row[f"{k} right labels lost"] = (correct & flag).mean()
    f, r = np.concatenate(inscope_flags), np.concatenate(inscope_review)
    row["in-scope"], row["in-scope +review"] = f.mean(), (f | r).mean()
    return row


# ---------------------------------------------------------------------------- outlier exposure

_WORDS = ("SALE", "new in", "50% off", "Size M", "cotton", "FREE delivery", "catalog", "page 3", "SKU 48213",
          "summer", "Made in", "logo", "9.99", "XL", "return", "gift card", "wash 30", "brand", "ABC", "2026")


def outlier_photo(rng: np.random.Generator, items: np.ndarray) -> Any:
    """One procedurally drawn photo that is none of the ten classes, as a catalog would show it
    (mostly dark on a light background); ``items`` are Fashion-MNIST images for patches and mixtures."""
    from PIL import Image, ImageDraw, ImageFont

    kind = rng.choice(["blank", "noise", "text", "shapes", "stripes", "patch", "mixture", "squashed", "rotated"],
                      p=[0.03, 0.10, 0.15, 0.22, 0.08, 0.12, 0.12, 0.10, 0.08])
    w, h = int(rng.integers(40, 160)), int(rng.integers(40, 160))
    bg = int(rng.choice([255, 255, 245, int(rng.integers(180, 256))]))
    if kind == "blank":
        return Image.new("L", (w, h), int(rng.integers(0, 256)))
    if kind == "noise":
        size = (int(rng.integers(2, h // 2 + 3)), int(rng.integers(2, w // 2 + 3)))
        small = rng.normal(128, rng.uniform(20, 90), size)
        return Image.fromarray(np.clip(small, 0, 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    if kind == "stripes":
        yy, xx = np.mgrid[0:h, 0:w]
        angle, period = rng.uniform(0, np.pi), rng.uniform(3, 20)
        wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
        if rng.random() < 0.3:
            wave = np.sign(wave * np.sin((xx * np.sin(angle) - yy * np.cos(angle)) * 2 * np.pi / period))
        return Image.fromarray((bg - (wave + 1) / 2 * rng.uniform(80, bg)).clip(0, 255).astype(np.uint8))
    img = Image.new("L", (w, h), bg)
    draw = ImageDraw.Draw(img)
    ink = lambda: int(rng.integers(0, max(1, bg - 60)))  # noqa: E731
    if kind == "text":
        font = ImageFont.load_default(size=int(rng.integers(8, 28)))
        for _ in range(int(rng.integers(1, 4))):
            words = " ".join(rng.choice(_WORDS, int(rng.integers(1, 4))))
            draw.text((int(rng.integers(0, w // 3 + 1)), int(rng.integers(0, h - 8))), words, fill=ink(), font=font)
        return img
    if kind == "shapes":
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = rng.integers(0, w), rng.integers(0, h)
            x1, y1 = x0 + rng.integers(4, w), y0 + rng.integers(2, h)
            box = [int(x0), int(y0), int(x1), int(y1)]
            shape = rng.choice(["ellipse", "ring", "rect", "bar", "line", "polygon", "glasses"])
            if shape == "ellipse":
                draw.ellipse(box, fill=ink())
            elif shape == "ring":
                draw.ellipse(box, outline=ink(), width=int(rng.integers(2, 8)))
            elif shape == "rect":
                draw.rectangle(box, fill=ink() if rng.random() < 0.6 else None, outline=ink(), width=2)
            elif shape == "bar":  # belts, straps
                draw.line(box, fill=ink(), width=int(rng.integers(3, 12)))
            elif shape == "line":
                draw.line(box, fill=ink(), width=int(rng.integers(1, 3)))
            elif shape == "polygon":
                pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(int(rng.integers(3, 7)))]
                draw.polygon(pts, fill=ink())
            else:  # two lenses and a bridge
                r = int(rng.integers(6, max(7, w // 4)))
                cy = h // 2
                draw.ellipse([w // 2 - 2 * r - 2, cy - r, w // 2 - 2, cy + r], fill=ink())
                draw.ellipse([w // 2 + 2, cy - r, w // 2 + 2 * r + 2, cy + r], fill=ink())
                draw.line([w // 2 - 4, cy - r // 2, w // 2 + 4, cy - r // 2], fill=ink(), width=2)
        return img
    a, b = items[rng.integers(0, len(items), 2)]
    if kind == "patch":  # a part of an item: a sleeve, a heel, a strap
        ph, pw = int(rng.integers(7, 17)), int(rng.integers(7, 17))
        y, x = int(rng.integers(0, 28 - ph)), int(rng.integers(0, 28 - pw))
        item = a[y:y + ph, x:x + pw]
    elif kind == "mixture":
        if rng.random() < 0.5:
            item = np.maximum(a, np.roll(b, int(rng.integers(-8, 9)), axis=int(rng.integers(0, 2))))
        else:  # left half of one item, right half of another
            item = np.concatenate([a[:, :14], b[:, 14:]], axis=1)
    elif kind == "squashed":
        factor = rng.uniform(0.2, 0.45)
        size = (28, max(2, int(28 * factor))) if rng.random() < 0.5 else (max(2, int(28 * factor)), 28)
        item = np.asarray(Image.fromarray(a).resize(size, Image.Resampling.BILINEAR))
    else:
        item = np.asarray(Image.fromarray(a).rotate(float(rng.uniform(60, 300)), expand=True))
    return render_catalog_photo(item, scale=int(rng.integers(2, 5)), noise=float(rng.uniform(0, 3)), rng=rng)


def outlier_bank(n: int, items: np.ndarray, config: ModelConfig, seed: int) -> np.ndarray:
    """``n`` outlier photos converted as tagging converts photos: uint8 (n, 1, 28, 28)."""
    rng = np.random.default_rng(seed)
    return np.stack([to_model_array(outlier_photo(rng, items), config) for _ in range(n)])


def finetune(out: Path, epochs: int = 3, seed: int = 0, weight: float = 0.5, lr: float = 0.01,
             bank_size: int = 30_000, init: Path | None = None) -> dict:
    """Outlier exposure from the bundled model: cross-entropy on Fashion-MNIST plus ``weight``
    times the cross-entropy to the uniform distribution on procedural outliers."""
    import torch.nn.functional as F

    from catalog_tagger.augment import random_flip, random_translate, train_augment
    from catalog_tagger.calibration import calibrate
    from catalog_tagger.checkpoint import save_model
    from catalog_tagger.runtime import predict_logits_array, to_unit, training_autocast

    started = time.perf_counter()
    torch.manual_seed(seed)
    loaded = load_model(init)
    cfg = loaded.card["training"]["config"]
    train, test = load_split("train"), load_split("test")
    fit_idx, val_idx = train_val_indices(len(train), cfg.get("val_size", 5000), cfg.get("seed", 0))
    images = torch.from_numpy(train.images[fit_idx]).unsqueeze(1)
    labels = torch.from_numpy(train.labels[fit_idx])
    bank = torch.from_numpy(outlier_bank(bank_size, train.images[fit_idx], loaded.config, seed + 1000))
    model = loaded.model
    device = torch.device("cpu")
    model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    batch = 256
    steps = epochs * (len(images) // batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
    gen = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(images), generator=gen)
        total = 0.0
        for i in range(len(images) // batch):
            idx = order[i * batch:(i + 1) * batch]
            x = train_augment(to_unit(images[idx], device), labels[idx], gen, worn_prob=cfg.get("worn_prob", 0.3))
            o = bank[torch.randint(0, len(bank), (batch,), generator=gen)]
            xo = random_translate(random_flip(to_unit(o, device), gen), 2, gen)
            with training_autocast(device):
                logits = model(torch.cat([x, xo])).float()
            loss = F.cross_entropy(logits[:batch], labels[idx], label_smoothing=cfg.get("label_smoothing", 0.1))
            # cross-entropy to uniform = mean over classes of -log p
            loss = loss + weight * (-F.log_softmax(logits[batch:], 1).mean(1)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        history.append({"epoch": epoch + 1, "loss": total / (len(images) // batch),
                        "seconds": round(time.perf_counter() - started, 1)})
        print(history[-1], flush=True)
    model.eval()
    net = prepare_model(model, device)
    val_logits = predict_logits_array(net, train.images[val_idx], device)
    test_acc = float((predict_logits_array(net, test.images, device).argmax(1) == test.labels).mean())
    card = {k: v for k, v in loaded.card.items()
            if k not in ("model_config", "classes", "weights_file", "weights_sha256", "card_format")}
    card["name"] = out.name
    card["calibration"] = calibrate(val_logits, train.labels[val_idx])
    card["metrics"] = {"val_accuracy": float((val_logits.argmax(1) == train.labels[val_idx]).mean()),
                       "test_accuracy": test_acc, "test_n": len(test.labels)}
    card["outlier_exposure"] = {"init": loaded.ident, "epochs": epochs, "seed": seed, "weight": weight, "lr": lr,
                                "bank_size": bank_size, "history": history}
    save_model(model.cpu(), card, out / "model.safetensors")
    print(f"test accuracy {test_acc:.4f}, temperature {card['calibration']['temperature']}", flush=True)
    return card


# ---------------------------------------------------------------------------- report

ACCURACY = [("dev acc.", "dev accuracy"), ("dev acc. kept", "dev accuracy kept"),
            ("dev right lost", "dev right labels lost"), ("dev2 acc.", "dev2 accuracy"),
            ("dev2 acc. kept", "dev2 accuracy kept"), ("dev2 right lost", "dev2 right labels lost")]
SUMMARY = [("AUROC", "AUROC"), ("FM test", "fmnist-test"), ("other", "other"), ("other +rev", "other +review"),
           ("dev", "dev"), ("dev2 studio", "dev2 studio"), ("dev2 home", "dev2 home"), ("in-scope", "in-scope"),
           ("in-scope +rev", "in-scope +review")]


def markdown(rows: pd.DataFrame, columns: list[tuple[str, str]] = SUMMARY) -> str:
    """The summary as a markdown table, shares in percent."""
    lines = ["| score | threshold rule | " + " | ".join(h for h, _ in columns) + " |",
             "|---|---|" + "---:|" * len(columns)]
    for _, r in rows.iterrows():
        cells = []
        for h, k in columns:
            v = r.get(k)
            cells.append("-" if v is None or pd.isna(v) else f"{v:.3f}" if h == "AUROC" else f"{100 * v:.1f}")
        lines.append(f"| {r['score']} | {r['rule']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detail_markdown(detail: pd.DataFrame, score: str, rule: str) -> str:
    """Per class (in scope) and per article (out of scope) for one score and rule, in percent."""
    d = detail[(detail["score"] == score) & (detail["rule"] == rule) & detail["set"].isin(["other", "dev", "dev2"])]
    lines = [f"{score}, {rule}:", "", "| set | style | class / article | n | flagged % | flagged or review % |",
             "|---|---|---|---:|---:|---:|"]
    for _, r in d.iterrows():
        lines.append(f"| {r['set']} | {r['style'] or ''} | {r['group']} | {r['n']} | {100 * r['flagged']:.0f} "
                     f"| {100 * r['flagged+review']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="score every photo and report")
    m.add_argument("--other", type=Path, required=True)
    m.add_argument("--dev", type=Path, required=True)
    m.add_argument("--dev2", type=Path, required=True)
    m.add_argument("--model", type=Path)
    m.add_argument("--cache", type=Path, default=Path("runs/out-of-scope-cache"))
    m.add_argument("--json", type=Path, help="write the summary and the per-class detail here")
    m.add_argument("--detail", nargs="*", default=[], metavar="SCORE",
                   help="print per-class tables for these scores (names as in the summary), at every rule")
    f = sub.add_parser("finetune", help="outlier exposure from the bundled (or --init) model")
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--init", type=Path)
    f.add_argument("--epochs", type=int, default=3)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--weight", type=float, default=0.5)
    f.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    if args.command == "finetune":
        finetune(args.out, args.epochs, args.seed, args.weight, args.lr, init=args.init)
        return
    loaded, sets = collect(args.model, {"other": args.other, "dev": args.dev, "dev2": args.dev2}, args.cache)
    rows, detail = evaluate(sets, loaded.temperature, loaded.detector)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line),
                    platform.processor())
    review = {k: float(needs_review(sets[k], loaded.temperature).mean()) for k in ("other", "dev", "dev2")}
    print(f"model {loaded.ident}, test accuracy {loaded.card['metrics'].get('test_accuracy')}, "
          f"temperature {loaded.temperature}; {time.strftime('%Y-%m-%d', time.gmtime())}; CPU {cpu_name}")
    print("review rule alone (confidence < 0.5): " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in review.items()))
    print(markdown(rows))
    print()
    print("Accuracy of the in-scope photos the detector leaves labeled (the model's top class):")
    print(markdown(rows[rows["score"].str.contains("etector")], ACCURACY))
    for score in args.detail:
        for rule in rows.loc[rows["score"] == score, "rule"]:
            print()
            print(detail_markdown(detail, score, rule))
    if args.json:
        args.json.write_text(json.dumps({"model": loaded.ident, "review_alone": review,
                                         "summary": rows.to_dict("records"), "detail": detail.to_dict("records")},
                                        default=float))


if __name__ == "__main__":
    main()
