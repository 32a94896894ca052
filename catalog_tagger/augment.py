"""Batch-level augmentations: pure functions from a float batch (N, C, H, W) to another.

Working on whole batches held in memory (as airbench does) costs a few tensor ops per
batch instead of a Python call per image, which matters on a 2-core CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror half the batch left-right: garments are (nearly) symmetric, and catalog
    shoes face either way while Fashion-MNIST's mostly face left."""
    flip = torch.rand(x.shape[0], generator=generator, device="cpu").to(x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def random_translate(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``pad`` pixels, filling with background (zero).

    Real catalog crops are rarely centred to the pixel the way Fashion-MNIST's are.
    """
    if pad <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    # Gather with per-image offsets via index arithmetic: one op for the whole batch.
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).to(x.device)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).to(x.device)
    idx_n = torch.arange(n, device=x.device).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[idx_n, rows.view(n, h, 1), cols.view(n, 1, w)]
    return out.permute(0, 3, 1, 2).contiguous()


def train_augment(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """The augmentation applied to every training batch."""
    return random_translate(random_flip(x, generator), pad, generator)
