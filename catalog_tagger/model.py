"""The garment classifier: its config and the network, nothing else.

The network is a small conv-pool-batchnorm stack in the spirit of the fast CIFAR-10
recipes (airbench, ResNet-8 style "stem + blocks + global pool"): cheap enough to train in
minutes on two CPU cores and to run at thousands of images per second, wide enough to
beat the 4-conv reference systems on Fashion-MNIST.

Inputs are float tensors in [0, 1], shape (N, C, H, W); normalisation lives inside the
model so that every caller (training, evaluation, tagging) feeds the same thing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from .config import DEFAULT_STEM_WIDTH, DEFAULT_WIDTHS

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


# Bounds on what a card may ask for: far above any model this project trains, far below
# what would exhaust a machine's memory when the network is built.
MAX_INPUT_SIZE = 512
MAX_WIDTH = 1024
MAX_BLOCKS = 6
MAX_CLASSES = 10_000
MAX_CLASS_NAME = 200


def _int_in(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network; stored in every checkpoint and card."""

    classes: tuple[str, ...] = FASHION_MNIST_CLASSES
    input_size: int = 28
    channels: int = 1
    widths: tuple[int, ...] = DEFAULT_WIDTHS
    stem_width: int = DEFAULT_STEM_WIDTH
    # Per-channel mean/std of the training images in [0, 1]; applied inside forward().
    mean: tuple[float, ...] = (0.286,)
    std: tuple[float, ...] = (0.353,)
    # Average the logits of the image and its mirror image at inference: garments are
    # nearly symmetric, and catalog shoes face either way. Costs one more forward pass.
    flip_tta: bool = False

    def __post_init__(self) -> None:
        # A card comes from disk and may be crafted: check types and bound every size
        # before anything is allocated (an input_size of 200,000 would exhaust memory).
        if not all(isinstance(c, str) and 0 < len(c) <= MAX_CLASS_NAME for c in self.classes):
            raise ValueError(f"class names must be non-empty text of at most {MAX_CLASS_NAME} characters")
        if len(self.classes) > MAX_CLASSES:
            raise ValueError(f"at most {MAX_CLASSES} classes, got {len(self.classes)}")
        if not _int_in(self.input_size, 1, MAX_INPUT_SIZE):
            raise ValueError(f"input_size must be a whole number from 1 to {MAX_INPUT_SIZE}, got {self.input_size!r}")
        if self.channels not in (1, 3) or isinstance(self.channels, bool):
            raise ValueError(f"channels must be 1 or 3, got {self.channels!r}")
        if not 1 <= len(self.widths) <= MAX_BLOCKS or not all(_int_in(w, 1, MAX_WIDTH) for w in self.widths):
            raise ValueError(f"widths must be 1 to {MAX_BLOCKS} whole numbers from 1 to {MAX_WIDTH}")
        if not _int_in(self.stem_width, 1, MAX_WIDTH):
            raise ValueError(f"stem_width must be a whole number from 1 to {MAX_WIDTH}")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (*self.mean, *self.std)) \
                or not all(v > 0 for v in self.std):
            raise ValueError("mean and std must be finite numbers, std positive")
        if not isinstance(self.flip_tta, bool):
            raise ValueError("flip_tta must be true or false")
        if len(self.classes) < 2:
            raise ValueError("a classifier needs at least two classes")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"class names must be unique, got {list(self.classes)}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per input channel")
        if self.input_size < 2 ** len(self.widths):
            raise ValueError(f"input_size {self.input_size} is too small for {len(self.widths)} blocks")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    # Bias is redundant before batch norm.
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]


class ConvBlock(nn.Sequential):
    """conv -> pool -> BN -> GELU -> conv -> BN -> GELU.

    Pooling right after the first conv (as airbench does) runs the second conv at a
    quarter of the pixels: most of the accuracy for half the compute.
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.MaxPool2d(2),
            nn.BatchNorm2d(c_out),
            nn.GELU(),
            *_conv_bn(c_out, c_out),
        )


class GarmentNet(nn.Module):
    config: ModelConfig
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("mean", torch.tensor(config.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, -1, 1, 1), persistent=False)
        layers: list[nn.Module] = _conv_bn(config.channels, config.stem_width)
        c_in = config.stem_width
        for width in config.widths:
            layers.append(ConvBlock(c_in, width))
            c_in = width
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(c_in, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images in [0, 1], shape (N, C, H, W)."""
        if self.config.flip_tta and not self.training:
            # Two passes rather than one over the concatenated batch: on CPU the doubled
            # batch falls out of cache and ran up to 1.6x slower (benchmarks/model_speed.py).
            return (self._logits(x) + self._logits(x.flip(-1))) / 2
        return self._logits(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self._pooled(x)))

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        # Global max pool: position-invariant, which suits off-centre catalog crops.
        return torch.amax(self.features(x), dim=(2, 3))

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """The features the head reads (N, D), averaged with the mirror image's under flip
        TTA, so that in eval mode ``head(pooled_features(x))`` equals ``forward(x)`` to float
        rounding (the head is linear). The out-of-scope detector scores them."""
        if self.config.flip_tta and not self.training:
            return (self._pooled(x) + self._pooled(x.flip(-1))) / 2
        return self._pooled(x)


def build_model(config: ModelConfig) -> GarmentNet:
    return GarmentNet(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["FASHION_MNIST_CLASSES", "ModelConfig", "GarmentNet", "build_model", "count_parameters"]
