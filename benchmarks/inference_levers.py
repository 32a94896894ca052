"""Cheaper inference, measured for speed and for what it does to labels and confidences.

    python benchmarks/inference_levers.py [REAL_SET ...] [--model PATH] [--runs 9]

REAL_SET: a folder with labels.csv (file, label_id) such as ../shared/realphoto-dev,
decoded and converted as `tag` does. Fashion-MNIST test is always included. Levers:

- selective flip TTA: the mirrored pass only where the first pass's calibrated confidence
  is under tau (the labels, the share of images still needing it, how far the confidence
  moves from the shipped two-pass one);
- int8 post-training quantization (PyTorch FX, x86 backend, calibrated on 2,000 training
  images and their mirror images): accuracy, agreement with float32, speed on one thread.

Prints the CPU model and instruction set; speeds are images/s of CPU time on one thread,
the variants interleaved run by run (median of --runs).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from catalog_tagger.checkpoint import LoadedModel, load_model
from catalog_tagger.config import TagConfig
from catalog_tagger.data.fashion_mnist import load_split
from catalog_tagger.decode import decode_file
from catalog_tagger.model import ModelConfig
from catalog_tagger.runtime import describe_device, fold_batchnorm, predict_logits, prepare_model, to_unit

CPU = torch.device("cpu")
TAUS = (0.9, 0.95, 0.99, 0.995)


def real_set(folder: Path, config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    labels = pd.read_csv(folder / "labels.csv")
    arrays, ids = [], []
    for file, label in zip(labels["file"], labels["label_id"]):
        decoded = decode_file(str(folder / file), config, TagConfig().max_pixels)
        if decoded.array is not None:
            arrays.append(decoded.array)
            ids.append(int(label))
    return np.stack(arrays), np.array(ids)


class Features(nn.Module):
    """The network up to its feature maps (what int8 quantizes); head and max pool stay float."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features((x - self.net.mean) / self.net.std)


def int8_model(loaded: LoadedModel, calibration: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    net = fold_batchnorm(loaded.model).eval()
    prepared = prepare_fx(copy.deepcopy(Features(net)), get_default_qconfig_mapping("x86"),
                          example_inputs=(calibration[:8],))
    for part in calibration.split(200):
        prepared(part)
        prepared(part.flip(-1))
    quantized = convert_fx(prepared)

    def logits(batch: torch.Tensor) -> torch.Tensor:
        out = []
        for part in batch.split(128):
            x = part.float() / 255
            pooled = (torch.amax(quantized(x), dim=(2, 3)) + torch.amax(quantized(x.flip(-1)), dim=(2, 3))) / 2
            out.append(net.head(pooled))
        return torch.cat(out)

    return logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("real_sets", nargs="*", type=Path)
    parser.add_argument("--model")
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    loaded = load_model(args.model)
    net = prepare_model(loaded.model, CPU)
    test = load_split("test", allow_download=False)
    sets = {"Fashion-MNIST test": (np.asarray(test.images)[:, None], np.asarray(test.labels))}
    for folder in args.real_sets:
        sets[folder.name] = real_set(folder, loaded.config)
    calibration = torch.from_numpy(np.asarray(load_split("train", allow_download=False).images)[:2000, None])
    quantized = int8_model(loaded, calibration.float() / 255)
    print(f"{loaded.ident} on {describe_device(CPU)}")

    print("\nselective flip TTA (mirrored pass only under tau) and int8, per set:")
    for name, (images, labels) in sets.items():
        x = to_unit(torch.from_numpy(images), CPU)
        first, mirrored = net._pooled(x), net._pooled(x.flip(-1))
        single, both = net.head(first), net.head((first + mirrored) / 2)
        p1, p2 = (torch.softmax(z / loaded.temperature, 1) for z in (single, both))
        shipped = both.argmax(1).numpy()
        q = quantized(torch.from_numpy(images)).argmax(1).numpy()
        print(f"  {name} ({len(images)}): shipped {np.mean(shipped == labels):.2%}, single pass "
              f"{np.mean(p1.argmax(1).numpy() == labels):.2%}, int8 {np.mean(q == labels):.2%} "
              f"(same label as float32: {np.mean(q == shipped):.2%})")
        for tau in TAUS:
            sure = (p1.max(1).values >= tau).numpy()
            chosen = np.where(sure, p1.argmax(1).numpy(), shipped)
            reported = np.where(sure, p1.max(1).values.numpy(), p2.max(1).values.numpy())
            moved = np.abs(reported - p2.max(1).values.numpy())
            print(f"    tau {tau}: mirrored pass on {1 - sure.mean():.0%}, same label as shipped "
                  f"{np.mean(chosen == shipped):.2%}, confidence moved up to {moved.max():.3f}")

    batch = torch.from_numpy(sets["Fashion-MNIST test"][0][:256])
    variants = {"float32, flip TTA (shipped)": lambda: predict_logits(net, batch, CPU),
                "int8, flip TTA": lambda: quantized(batch)}
    speeds: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        fn()
    for _ in range(args.runs):
        for name, fn in variants.items():
            start = time.thread_time()
            fn()
            speeds[name].append(len(batch) / (time.thread_time() - start))
    print("\nnetwork alone, one thread (images/s of CPU time):")
    for name, runs in speeds.items():
        print(f"  {name:<30} {statistics.median(runs):7.0f}")


if __name__ == "__main__":
    main()
