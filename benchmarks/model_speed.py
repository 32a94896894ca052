"""Model-only inference speed on preprocessed 28x28 batches (what shares the cores with decoding).

    python benchmarks/model_speed.py [--model PATH] [--batch 512] [--runs 5] [--device cpu|cuda] [--threads N]

Prints images/s, median of --runs, for the model as configured by its card (with flip
test-time augmentation when the card enables it), without it, as shipped but in one
pass over the whole batch (what predict_logits' cache-sized CPU chunks save), and as
shipped but with its batch norms left unfolded (what runtime.fold_batchnorm saves), and on
CPU as shipped but with each GELU as a layer of its own (what cpu_fusion saves). The
variants take turns run by run, so that machine noise hits them alike. ``--threads 1``
is what each tagging worker gives the model on CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np
import torch

from catalog_tagger.checkpoint import load_model
from catalog_tagger.data.fashion_mnist import load_split
from catalog_tagger.model import build_model
from catalog_tagger.runtime import (
    describe_device,
    fold_batchnorm,
    predict_logits,
    prepare_model,
    resolve_device,
    to_unit,
)


def whole_batch(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    with torch.inference_mode():
        return model(to_unit(x, device)).cpu()


def images_per_second(model: torch.nn.Module, device: torch.device, x: torch.Tensor, predict=predict_logits) -> float:
    start = time.perf_counter()
    for _ in range(5):
        predict(model, x, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 5 * len(x) / (time.perf_counter() - start)


def inputs(n: int) -> torch.Tensor:
    """Fashion-MNIST test images where the data is installed: the speed of the network depends
    on its inputs (uniform noise ran the GELU-fused network 1.05x faster, real items 1.33x)."""
    try:
        images = load_split("test", allow_download=False).images[:n]
    except (OSError, RuntimeError) as exc:
        print(f"Fashion-MNIST not found ({exc}); timing on uniform noise")
        return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8)
    return torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice, one per core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    loaded = load_model(args.model)
    plain = build_model(dataclasses.replace(loaded.config, flip_tta=False))
    plain.load_state_dict(loaded.model.state_dict())
    unfolded = loaded.model.to(device=device, memory_format=torch.channels_last).eval()
    shipped = "as shipped" + (" (flip TTA)" if loaded.config.flip_tta else "")
    variants = {
        shipped: (prepare_model(loaded.model, device), predict_logits),
        "single pass": (prepare_model(plain, device), predict_logits),
        shipped + ", unchunked": (prepare_model(loaded.model, device), whole_batch),
        shipped + ", batch norm unfolded": (unfolded, predict_logits),
    }
    if device.type == "cpu":
        # What cpu_fusion saves: the same folded network with each GELU as a layer of its own.
        variants[shipped + ", conv+GELU not fused"] = (
            fold_batchnorm(loaded.model).to(memory_format=torch.channels_last), predict_logits)
    x = inputs(args.batch)
    speeds: dict[str, list[float]] = {name: [] for name in variants}
    for model, predict in variants.values():
        predict(model, x, device)  # warm-up
    for _ in range(args.runs):
        for name, (model, predict) in variants.items():
            speeds[name].append(images_per_second(model, device, x, predict))
    print(f"{loaded.ident} on {describe_device(device)}, batch {args.batch}")
    for name, runs in speeds.items():
        # Run by run against the shipped variant: the ratio survives noise that moves both.
        ratio = statistics.median(r / s for r, s in zip(runs, speeds[shipped]))
        print(f"  {name:<44} {statistics.median(runs):8.0f} images/s  {ratio:5.2f}x  "
              f"(runs: {', '.join(f'{s:.0f}' for s in runs)})")


if __name__ == "__main__":
    main()
