"""Jittered copies of a photo, for learning from a few hundred reviewed photos.

``learn`` fine-tunes on each reviewed photo's conversion and on ``LearnConfig.views``
conversions of the same photo turned, cropped and lit a little differently. The
conversion (preprocess.convert) decides from the photo where the item is, what the
backdrop is and how bright the item becomes; a slightly different photo of the same item
gives a different 28x28 input, and the network learns which of those differences do not
change the label. Flips and shifts of the 28x28 input (augment.train_augment) cannot
show that: they come after the conversion.

Measured on real catalog photos with 200 labels chosen by ``review`` (``benchmarks/learn_levers.py``
and the review loop): docs/review-loop.md, "Jittered views of the reviewed photos".
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance

from .preprocess import to_8bit

# Ranges of one draw, chosen as what a second shot of the same item on the same set
# differs by: a slight turn, the framing, the exposure.
MAX_TURN_DEGREES = 8.0
MAX_CROP_SHARE = 0.06  # per side
BRIGHTNESS = (0.85, 1.15)
CONTRAST = (0.8, 1.25)


def jitter_photo(img: Image.Image, seed: tuple[int, ...]) -> Image.Image:
    """``img`` turned, cropped and lit at random (reproducibly from ``seed``), in mode L or RGB."""
    rng = np.random.default_rng(seed)
    # YCbCr (a JPEG decoded for the cutout's colours) is no mode to blend in: its neutral
    # chroma is 128, not 0. Everything else becomes what the conversion starts from.
    img = img.convert("RGB") if img.mode == "YCbCr" else to_8bit(img)
    w, h = img.size
    # The corner stands for the backdrop: a turn uncovers backdrop, not black.
    backdrop = img.getpixel((0, 0))
    img = img.rotate(float(rng.uniform(-MAX_TURN_DEGREES, MAX_TURN_DEGREES)), resample=Image.Resampling.BILINEAR,
                     fillcolor=backdrop)
    left, top, right, bottom = rng.uniform(0, MAX_CROP_SHARE, 4) * (w, h, w, h)
    box = (int(left), int(top), max(int(left) + 1, int(w - right)), max(int(top) + 1, int(h - bottom)))
    img = img.crop(box)
    img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(*BRIGHTNESS)))
    return ImageEnhance.Contrast(img).enhance(float(rng.uniform(*CONTRAST)))
