"""Model-only inference speed on preprocessed 28x28 batches (what shares the cores with decoding).

    python benchmarks/model_speed.py [--model PATH] [--batch 512] [--runs 5] [--device cpu|cuda]

Prints images/s, median of --runs, for the model as configured by its card (with flip
test-time augmentation when the card enables it), without it, and as shipped but in one
pass over the whole batch (what predict_logits' cache-sized CPU chunks save).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from catalog_tagger.checkpoint import load_model
from catalog_tagger.model import build_model
from catalog_tagger.runtime import predict_logits, prepare_model, resolve_device, to_unit


def whole_batch(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    with torch.inference_mode():
        return model(to_unit(x, device)).cpu()


def images_per_second(model: torch.nn.Module, device: torch.device, batch: int, runs: int,
                      predict=predict_logits) -> list[float]:
    x = torch.randint(0, 256, (batch, 1, 28, 28), dtype=torch.uint8)
    predict(model, x, device)  # warm-up
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(5):
            predict(model, x, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(5 * batch / (time.perf_counter() - start))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = resolve_device(args.device)
    loaded = load_model(args.model)
    plain = build_model(dataclasses.replace(loaded.config, flip_tta=False))
    plain.load_state_dict(loaded.model.state_dict())
    print(f"{loaded.ident} on {device} ({torch.get_num_threads()} threads), batch {args.batch}")
    shipped = "as shipped" + (" (flip TTA)" if loaded.config.flip_tta else "")
    for name, model, predict in ((shipped, loaded.model, predict_logits), ("single pass", plain, predict_logits),
                                 (shipped + ", unchunked", loaded.model, whole_batch)):
        speeds = images_per_second(prepare_model(model, device), device, args.batch, args.runs, predict)
        print(f"  {name:<34} {statistics.median(speeds):8.0f} images/s  (runs: {', '.join(f'{s:.0f}' for s in speeds)})")


if __name__ == "__main__":
    main()
