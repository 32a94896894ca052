"""Render Fashion-MNIST items as catalog-style product photos.

Used to build ``sample_catalog/``, the tests' "real photo" checks and the benchmarks'
synthetic catalogs: the item is negated (dark garment on white, as a studio shot),
enlarged smoothly, placed on a white canvas with margins, optionally with a little
sensor noise.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def render_catalog_photo(
    item: np.ndarray,
    scale: int = 10,
    canvas: tuple[int, int] | None = None,
    noise: float = 0.0,
    rng: np.random.Generator | None = None,
    offset: tuple[int, int] = (0, 0),
) -> Image.Image:
    """A 28x28 light-on-black uint8 item -> an RGB photo, dark on white.

    ``canvas`` is (width, height) of the photo (default: exactly the enlarged item);
    ``noise`` is the standard deviation of Gaussian noise in grey levels; ``offset``
    moves the item from the centre.
    """
    if item.ndim != 2:
        raise ValueError(f"expected a 2-D item, got shape {item.shape}")
    size = (item.shape[1] * scale, item.shape[0] * scale)
    enlarged = Image.fromarray(255 - item, "L").resize(size, Image.Resampling.BICUBIC)
    if canvas is None:
        photo = enlarged
    else:
        photo = Image.new("L", canvas, 255)
        x = (canvas[0] - size[0]) // 2 + offset[0]
        y = (canvas[1] - size[1]) // 2 + offset[1]
        photo.paste(enlarged, (x, y))
    arr = np.asarray(photo, dtype=np.float32)
    if noise > 0:
        rng = rng if rng is not None else np.random.default_rng(0)
        arr = arr + rng.normal(0.0, noise, arr.shape).astype(np.float32)
    grey = np.clip(arr + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")


def fashion_mnist_png(item: np.ndarray) -> Image.Image:
    """The item exactly as Fashion-MNIST stores it (light on black, 28x28 grayscale)."""
    return Image.fromarray(item, "L")
