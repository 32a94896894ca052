"""Device choice and batched inference shared by training, evaluation and tagging."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import UsageError


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA without a GPU is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but no CUDA GPU is available")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 mixed precision on GPU; full precision on CPU, where it would only be slower."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move to the device in channels_last layout (faster convolutions on CPU and GPU)."""
    return model.to(device=device, memory_format=torch.channels_last).eval()


def to_unit(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float in [0, 1] on ``device``; the one place this happens.

    Copying uint8 and converting on the device moves a quarter of the bytes.
    """
    batch = batch.to(device, non_blocking=True)
    return batch.float().div_(255).contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def predict_logits(model: nn.Module, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Logits (float32, on CPU) for one uint8 batch (N, C, H, W)."""
    with autocast(device):
        logits = model(to_unit(batch, device))
    return logits.float().cpu()


def iter_batches(images: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 arrays (N, H, W) or (N, C, H, W) as (N, C, H, W) tensors, batch by batch."""
    for start in range(0, len(images), batch_size):
        chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
        yield chunk.unsqueeze(1) if chunk.ndim == 3 else chunk


def predict_logits_array(
    model: nn.Module,
    images: np.ndarray,
    device: torch.device,
    batch_size: int = 1024,
    progress: bool = False,
    desc: str = "predict",
) -> np.ndarray:
    """Raw logits (N, classes) for a uint8 image array."""
    out = []
    total = (len(images) + batch_size - 1) // batch_size
    for batch in tqdm(iter_batches(images, batch_size), total=total, desc=desc, disable=not progress, leave=False):
        out.append(predict_logits(model, batch, device).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)
