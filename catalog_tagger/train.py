"""Training on Fashion-MNIST held as one uint8 tensor.

Recipe (each piece chosen for a fast, reproducible CPU run): batch-level flip and
translate augmentation, Nesterov SGD with a linear warm-up then linear decay to zero,
label smoothing, channels_last, bf16 autocast where the hardware has it, batch norm
statistics recomputed in float32 for the weights of each epoch's end. The 10k test
set is touched once, after the last epoch, for the number reported in the card; epochs
and hyper-parameters are judged on the validation split only.
"""

from __future__ import annotations

import dataclasses
import logging
import stat
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import __version__, out_of_scope
from .augment import AugmentOptions, train_augment
from .calibration import calibrate, softmax
from .checkpoint import (
    LoadedModel,
    atomic_write_json,
    holds_model,
    load_model,
    load_training_state,
    output_folder,
    refuse_out_inside_data,
    save_model,
    save_training_state,
)
from .config import TrainConfig
from .data.labeled import LabeledArrays, TrainingData, fashion_mnist_data, load_labeled, own_data
from .distributed import DistInfo, barrier, device_for, setup, sum_across, teardown
from .errors import ModelError, OutputError, UsageError
from .metrics import classification_report
from .model import FASHION_MNIST_CLASSES, GarmentNet, ModelConfig, build_model
from .preprocess import PREPROCESSING
from .runtime import (
    describe_device,
    precision_name,
    predict_logits_array,
    prepare_model,
    resolve_device,
    resolve_workers,
    to_unit,
    training_autocast,
    training_dtype,
)

log = logging.getLogger(__name__)

STATE_FILE = "checkpoint.pt"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class History:
    rows: list[dict[str, float]] = field(default_factory=list)

    def add(self, **row: float) -> None:
        self.rows.append(row)


def lr_schedule(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base LR: linear warm-up, then linear decay to zero (one-cycle shape)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


@dataclass(frozen=True)
class StepSettings:
    """How every training step of a run is taken; fixed for the whole run."""

    batch_size: int  # the global batch: under DDP each rank takes batch_size // world_size
    device: torch.device
    label_smoothing: float = 0.0
    worn_prob: float = 0.0
    headless_prob: float = 0.0
    pair_prob: float = 0.0
    floor_prob: float = 0.0
    above_prob: float = 0.0
    # float32, or torch.bfloat16 for bf16 autocast (runtime.training_dtype decides which).
    dtype: torch.dtype = torch.float32
    dist_info: DistInfo = DistInfo()
    progress: bool = False

    def augment(self) -> AugmentOptions:
        """The augmentation's options (augment.train_augment)."""
        return {"worn_prob": self.worn_prob, "headless_prob": self.headless_prob, "pair_prob": self.pair_prob,
                "floor_prob": self.floor_prob, "above_prob": self.above_prob}


@dataclass
class TrainState:
    """What training changes besides the weights, and so what a checkpoint holds and
    --resume restores: optimizer, LR schedule, random generators, history, epochs done."""

    model: GarmentNet  # the plain module, evaluated and saved
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # the shuffle: the same sequence on every rank
    # Augmentation: its own per rank under DDP; None shares the shuffle's generator.
    aug_generator: torch.Generator | None = None
    net: nn.Module | None = None  # what trains: `model`, or its DDP wrapper
    history: History = field(default_factory=History)
    epoch: int = 0  # epochs done
    elapsed: float = 0.0  # training seconds of the sessions before a --resume

    def checkpoint(self, train_config: dict[str, Any], elapsed: float) -> dict[str, Any]:
        """The checkpoint after epoch ``self.epoch``."""
        return {
            "epoch": self.epoch - 1, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(), "history": self.history.rows, "train_config": train_config,
            "elapsed": elapsed,
        }

    def restore(self, saved: dict[str, Any]) -> None:
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        self.history.rows = list(saved["history"])
        self.epoch = int(saved["epoch"]) + 1
        self.elapsed = float(saved["elapsed"])


def train_one_epoch(state: TrainState, images: torch.Tensor, labels: torch.Tensor, settings: StepSettings,
                    desc: str = "train", outliers: torch.Tensor | None = None, outlier_weight: float = 0.0
                    ) -> tuple[float, float]:
    """One pass over shuffled uint8 ``images`` (N, C, H, W); returns (mean loss, accuracy).

    ``labels``: class indices (N,), or class probabilities (N, classes) as soft targets
    (a teacher's, in self-training); accuracy and the augmentation then use their argmax.

    ``outliers``: uint8 images of none of the classes (outlier exposure, Hendrycks et al.
    2019): each step also pushes the softmax of up to half a batch of them, drawn at random
    and mirrored at random, towards uniform, with ``outlier_weight``.

    Under DDP every rank draws the same permutation from ``state.generator`` and takes every
    world_size-th index of it (what DistributedSampler does), with its own
    ``state.aug_generator`` for augmentation.
    """
    net = state.model if state.net is None else state.net
    net.train()
    generator = state.generator
    aug_generator = generator if state.aug_generator is None else state.aug_generator
    device, dist_info = settings.device, settings.dist_info
    order = torch.randperm(len(images), generator=generator)
    world = dist_info.world_size
    batch_size = max(1, settings.batch_size // world)
    order = order[dist_info.rank :: world]
    # Drop the ragged last batch: a tiny batch gives batch norm noisy statistics.
    n_batches = max(1, len(images) // world // batch_size)
    # The augmentation reads the labels on the CPU (it draws there); one copy per epoch, not a
    # device-to-host wait per step.
    hard = labels.argmax(1) if labels.dim() == 2 else labels
    labels_cpu = hard.cpu()
    # Loss and accuracy add up on the device: reading them each step (.item()) would make the
    # CPU wait for the GPU every step instead of queueing the next one.
    total_loss = torch.zeros((), device=device)
    total_correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    bar = tqdm(range(n_batches), desc=desc, disable=not settings.progress, leave=False, unit="batch")
    for i in bar:
        idx_cpu = order[i * batch_size : (i + 1) * batch_size]
        idx = idx_cpu.to(images.device)
        y = labels[idx]
        x = train_augment(to_unit(images[idx], device), labels_cpu[idx_cpu], aug_generator, **settings.augment())
        with training_autocast(device, settings.dtype):
            logits = net(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=settings.label_smoothing)
            if outliers is not None and len(outliers) and outlier_weight > 0:
                loss = loss + outlier_weight * _uniform_loss(net, outliers, batch_size, device, aug_generator)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        state.scheduler.step()
        n = len(idx)
        total_loss += loss.detach() * n
        total_correct += (logits.argmax(1) == hard[idx]).sum()
        seen += n
        if settings.progress and i % PROGRESS_EVERY == 0:
            bar.set_postfix(loss=f"{float(total_loss) / seen:.3f}", acc=f"{int(total_correct) / seen:.3f}")
    loss_sum, correct, count = sum_across([float(total_loss), float(total_correct), float(seen)], dist_info, device)
    return loss_sum / count, correct / count


def _uniform_loss(net: nn.Module, outliers: torch.Tensor, batch_size: int, device: torch.device,
                  generator: torch.Generator) -> torch.Tensor:
    """Cross-entropy from the softmax of a random draw of ``outliers`` to the uniform distribution."""
    pick = torch.randint(len(outliers), (max(1, min(batch_size // 2, len(outliers))),), generator=generator)
    x = to_unit(outliers[pick.to(outliers.device)], device)
    mirror = (torch.rand(len(pick), generator=generator) < 0.5).to(x.device)
    x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
    return -F.log_softmax(net(x).float(), 1).mean(1).mean()


# Steps between updates of the progress bar's loss and accuracy (each update waits for the GPU).
PROGRESS_EVERY = 25


# Batch norm's running statistics are an average over the last ~10 steps (momentum 0.1), taken
# while the weights still moved. On a small training set those steps are most of an epoch at a
# high learning rate, and the eval-mode network they describe can be far worse than its weights:
# on the tests' 1,000-image set (15 steps an epoch, seeds 0-3) validation read 0.07-0.26 after
# epoch 1 and 0.09-0.48 after epoch 2 with the running averages, 0.40-0.82 and 1.0 with statistics
# recomputed for the same weights, in bf16 and float32 alike. Recomputing costs one forward pass over this
# many images (about 2% of a Fashion-MNIST epoch).
BN_IMAGES = 4096


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, settings: StepSettings,
                        seed: int) -> None:
    """Replace every batch norm's running statistics with their average over training batches,
    augmented as in training, run through the current weights (precise BN, as in detectron2 and
    ``torch.optim.swa_utils.update_bn``).

    Float32 throughout, as the eval-mode network runs; its own seeded generator and no dropout,
    so that the training's random streams, and so --resume, are untouched.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the batches below
        m.train()
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(settings.batch_size, len(images))
    order = torch.randperm(len(images), generator=generator)
    for i in range(max(1, min(len(images), BN_IMAGES) // batch_size)):
        idx = order[i * batch_size : (i + 1) * batch_size].to(images.device)
        model(train_augment(to_unit(images[idx], settings.device), labels[idx].cpu(), generator,
                            **settings.augment()))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


def evaluate_arrays(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device, batch_size: int
) -> dict[str, float]:
    probs = softmax(predict_logits_array(model, images, device, batch_size))
    eps = 1e-12
    loss = float(-np.log(probs[np.arange(len(labels)), labels] + eps).mean())
    return {"loss": loss, "accuracy": float((probs.argmax(1) == labels).mean())}


def _model_config(config: TrainConfig, train: LabeledArrays) -> ModelConfig:
    # Normalisation statistics are measured on the training split and stored in the model.
    scaled = train.images.astype(np.float32) / 255.0
    channels = train.images.shape[1]
    return ModelConfig(
        classes=train.classes,
        input_size=train.images.shape[-1],
        channels=channels,
        widths=tuple(config.widths),
        stem_width=config.stem_width,
        mean=tuple(round(float(scaled[:, c].mean()), 4) for c in range(channels)),
        std=tuple(round(float(scaled[:, c].std()), 4) for c in range(channels)),
        flip_tta=config.flip_tta,
    )


def load_training_data(config: TrainConfig, init: LoadedModel | None, progress: bool) -> TrainingData:
    """Fashion-MNIST by default; the retailer's own labeled photos with --data/--manifest."""
    if config.data is None and config.manifest is None:
        if init is not None and init.classes != FASHION_MNIST_CLASSES:
            raise ModelError(f"--init model has classes {list(init.classes)}, not Fashion-MNIST's")
        return fashion_mnist_data(config.data_dir, config.val_size, config.seed)
    c = config.channels
    decode_as = init.config if init is not None else ModelConfig(
        input_size=config.input_size, channels=c, mean=(0.5,) * c, std=(0.25,) * c)
    labeled = load_labeled(config.data, config.manifest, decode_as, config.path_col, config.label_col,
                           classes=init.classes if init is not None else None,
                           workers=resolve_workers(config.workers),
                           progress=progress)
    source = str(config.data if config.data is not None else config.manifest)
    return own_data(labeled, config.val_fraction, config.seed, source)


def fit(config: TrainConfig, command: str = "", progress: bool = True) -> dict[str, Any]:
    """Train, checkpoint every epoch, evaluate once on test, and write the model + card.

    Returns the model card (an empty dict on the non-zero ranks of a torchrun job).
    """
    info = setup()
    try:
        return _fit(config, command, progress and info.is_main, info)
    finally:
        teardown(info)


def _fit(config: TrainConfig, command: str, progress: bool, info: DistInfo) -> dict[str, Any]:
    started = time.perf_counter()
    device = device_for(info, resolve_device(config.device))
    out = Path(config.out)
    _check_out(config, out, info)
    init = load_model(config.init) if config.init is not None else None
    if init is not None:
        config = _with_network_of(config, init.config)
    data = load_training_data(config, init, progress)
    state = _start(config, data, init, device, info)
    if config.resume and (out / STATE_FILE).exists():
        _resume(state, out / STATE_FILE, config)
    # The simulated-model augmentation knows Fashion-MNIST's garment classes only.
    fmnist_like = data.train.classes == FASHION_MNIST_CLASSES and data.train.images.shape[1] == 1
    settings = StepSettings(
        batch_size=config.batch_size, device=device, label_smoothing=config.label_smoothing,
        **({"worn_prob": config.worn_prob, "headless_prob": config.headless_prob, "pair_prob": config.pair_prob,
            "floor_prob": config.floor_prob, "above_prob": config.above_prob} if fmnist_like else {}),
        dtype=training_dtype(device, config.mixed_precision), dist_info=info, progress=progress)
    _train_epochs(state, config, data, settings, out / STATE_FILE, started)
    if not info.is_main:
        return {}
    return _finish(state, config, command, data, init, settings, state.elapsed + time.perf_counter() - started)


def _check_out(config: TrainConfig, out: Path, info: DistInfo) -> None:
    """Refuse to replace a model or run unless asked to, before any work."""
    if not config.resume and not config.overwrite and holds_model(out):
        raise OutputError(f"{out} already holds a model or a training run; pass --overwrite to replace it (the "
                          "old model stays usable until the new one is saved), --resume to continue the run, "
                          "or choose another --out")
    refuse_out_inside_data(out, config.data)
    if info.is_main:
        output_folder(out)


def _start(config: TrainConfig, data: TrainingData, init: LoadedModel | None, device: torch.device,
           info: DistInfo) -> TrainState:
    """The seeded network (or the --init one), its optimizer, LR schedule and generators."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = build_model(init.config if init is not None else _model_config(config, data.train))
    if init is not None:
        model.load_state_dict(init.model.state_dict())
    model = model.to(device).to(memory_format=torch.channels_last)
    # Under torchrun, DDP averages gradients across ranks; `model` stays the plain module
    # (same parameters) for evaluation and saving.
    net: nn.Module = model
    if info.enabled:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    aug_generator = torch.Generator().manual_seed(config.seed + 1000 * (info.rank + 1)) if info.enabled else None
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=True, weight_decay=config.weight_decay
    )
    steps_per_epoch = max(1, len(data.train.images) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup = max(1, int(config.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_schedule(s, total_steps, warmup))
    return TrainState(model, optimizer, scheduler, generator, aug_generator, net)


def _resume(state: TrainState, state_path: Path, config: TrainConfig) -> None:
    saved = load_training_state(state_path)
    if saved["train_config"] != _resumable(config):
        raise UsageError(f"{state_path} was written with different training options; resume with the same ones")
    state.restore(saved)
    log.info("resuming %s at epoch %d/%d", config.out, state.epoch + 1, config.epochs)


def _train_epochs(state: TrainState, config: TrainConfig, data: TrainingData, settings: StepSettings,
                  state_path: Path, started: float) -> None:
    """Train the remaining epochs; after each, rank 0 validates and writes the checkpoint."""
    info = settings.dist_info
    # The whole training set lives on the device (43 MB of uint8 for Fashion-MNIST): a
    # batch is then one gather, with no host-to-device copy per step.
    images = torch.from_numpy(data.train.images).to(settings.device)
    labels = torch.from_numpy(data.train.labels).to(settings.device)
    for epoch in tqdm(range(state.epoch, config.epochs), desc="epochs", disable=not settings.progress,
                      unit="epoch", initial=state.epoch, total=config.epochs):
        t0 = time.perf_counter()
        loss, acc = train_one_epoch(state, images, labels, settings, desc=f"epoch {epoch + 1}/{config.epochs}")
        state.epoch = epoch + 1
        if not info.is_main:
            barrier(info)  # rank 0 validates and writes the checkpoint meanwhile
            continue
        recompute_batchnorm(state.model, images, labels, settings, seed=config.seed + epoch)
        val = evaluate_arrays(state.model.eval(), data.val.images, data.val.labels, settings.device,
                              config.eval_batch_size)
        state.history.add(epoch=epoch + 1, train_loss=loss, train_accuracy=acc, val_loss=val["loss"],
                          val_accuracy=val["accuracy"], lr=state.optimizer.param_groups[0]["lr"],
                          seconds=time.perf_counter() - t0)
        log.info("epoch %d: train loss %.4f acc %.4f | val loss %.4f acc %.4f",
                 epoch + 1, loss, acc, val["loss"], val["accuracy"])
        save_training_state(state_path, state.checkpoint(_resumable(config),
                                                         state.elapsed + time.perf_counter() - started))
        barrier(info)


def _finish(state: TrainState, config: TrainConfig, command: str, data: TrainingData, init: LoadedModel | None,
            settings: StepSettings, train_seconds: float) -> dict[str, Any]:
    """Calibrate on validation, test once, write the weights, the card and the curves."""
    from .report import plot_training_curves  # matplotlib is slow to import; only here

    model, device, out = state.model.eval(), settings.device, Path(config.out)
    calibration = calibrate(predict_logits_array(model, data.val.images, device, config.eval_batch_size),
                            data.val.labels)
    test_report = None
    if data.test is not None:
        test_probs = softmax(predict_logits_array(model, data.test.images, device, config.eval_batch_size))
        test_report = classification_report(data.test.labels, test_probs.argmax(1), model.config.classes)
    card = _model_card(state, config, command, data, init, settings, train_seconds, test_report, calibration)
    card["out_of_scope"] = _fit_out_of_scope(model, data)
    card = save_model(model.cpu(), card, out / WEIGHTS_FILE)
    plot_training_curves(state.history.rows, out / "training_curves.png")
    return card


def _model_card(state: TrainState, config: TrainConfig, command: str, data: TrainingData,
                init: LoadedModel | None, settings: StepSettings, train_seconds: float,
                test_report: dict[str, Any] | None, calibration: dict[str, Any]) -> dict[str, Any]:
    model_config: ModelConfig = state.model.config
    out = Path(config.out)
    final_val = state.history.rows[-1] if state.history.rows else {}
    info = settings.dist_info
    return {
        "name": out.name if out.name not in ("", ".") else "model",
        "description": f"Garment-type classifier for catalog photos, trained on {data.description['dataset']}.",
        "input": {"size": model_config.input_size, "channels": model_config.channels,
                  "dtype": "uint8 converted to float in [0, 1]", "polarity": "light garment on black"},
        "preprocessing": PREPROCESSING,
        "training": {
            "config": config.to_dict(),
            "command": command,
            **data.description,
            "init": init.ident if init is not None else None,
            "distributed": {"world_size": info.world_size, "backend": info.backend},
            "seconds": round(train_seconds, 1),
            "device": describe_device(settings.device),
            "precision": precision_name(settings.dtype),
            "torch_threads": torch.get_num_threads(),
            "history": state.history.rows,
        },
        "metrics": {
            "val_accuracy": final_val.get("val_accuracy"),
            "val_loss": final_val.get("val_loss"),
            "test_accuracy": test_report["accuracy"] if test_report else None,
            "test_macro_f1": test_report["macro"]["f1"] if test_report else None,
            "test_n": test_report["n"] if test_report else 0,
        },
        "calibration": calibration,
        "package_version": __version__,
        "torch_version": torch.__version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _with_network_of(config: TrainConfig, used: ModelConfig) -> TrainConfig:
    """``config`` with the --init model's network shape, which is what trains, so that the
    card records it rather than options that could not apply."""
    if (config.input_size, config.channels, config.flip_tta) != (used.input_size, used.channels, used.flip_tta):
        log.warning("--init model has input %dx%d, %d channel(s), flip TTA %s; those are used",
                    used.input_size, used.input_size, used.channels, "on" if used.flip_tta else "off")
    return dataclasses.replace(config, input_size=used.input_size, channels=used.channels,
                               flip_tta=used.flip_tta, widths=tuple(used.widths), stem_width=used.stem_width)


def calibrate_saved_model(path: Path, data_dir: Path | None = None, device: str = "auto",
                          progress: bool = False) -> dict[str, Any]:
    """Fit calibration for a saved model on the validation split its card describes, and
    store it in the card (the weights, and so their sha256, stay as they are)."""
    loaded = load_model(path)
    card_mode = stat.S_IMODE(loaded.card_path.stat().st_mode)
    if not card_mode & stat.S_IWUSR:
        # Root could replace it anyway; the owner made it read-only to keep it as it is.
        raise OutputError(f"the card {loaded.card_path} is read-only; calibrate would replace it: "
                          "make it writable (chmod u+w) to recalibrate")
    if (loaded.card.get("calibration") or {}).get("source") == "own_photos":
        raise UsageError(f"{path} was calibrated by learn on the reviewed photos, which calibrate does not have; "
                         "refitting on Fashion-MNIST would replace that: run learn again to recalibrate")
    train_config = TrainConfig.from_dict(loaded.card.get("training", {}).get("config", {}))
    if data_dir is not None:
        train_config = dataclasses.replace(train_config, data_dir=data_dir)
    own = train_config.data is not None or train_config.manifest is not None
    data = load_training_data(train_config, loaded if own else None, progress)
    torch_device = resolve_device(device)
    model = prepare_model(loaded.model, torch_device)
    logits = predict_logits_array(model, data.val.images, torch_device, train_config.eval_batch_size)
    card = {**loaded.card, "calibration": calibrate(logits, data.val.labels),
            "out_of_scope": _fit_out_of_scope(loaded.model, data)}
    atomic_write_json(loaded.card_path, card, mode=card_mode)  # a card kept private stays private
    return card


def _fit_out_of_scope(model: GarmentNet, data: TrainingData) -> dict[str, Any] | None:
    """The card's out-of-scope detector, fitted on in-scope images only (training images for
    the feature statistics, the validation split for the thresholds), with the model as
    tagging runs it on CPU; None (detector off) when the validation split is too small."""
    net = prepare_model(model, torch.device("cpu"))
    return out_of_scope.fit_for_model(net, data.train.images, data.train.labels, data.val.images)


def _resumable(config: TrainConfig) -> dict[str, Any]:
    """The options that must match for --resume to continue the same run."""
    d = config.to_dict()
    for key in ("resume", "overwrite", "device", "out", "data_dir", "workers"):
        d.pop(key)
    return d

