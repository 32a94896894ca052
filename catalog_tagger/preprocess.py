"""The one conversion from any product photo to the model's input.

Fashion-MNIST was made from product photos by a documented conversion (Xiao et al. 2017,
arXiv:1708.07747, section 2): trim the border colour, resize the longest edge to 28,
sharpen, centre on a 28x28 canvas, negate, 8-bit grayscale. A catalog photo must go
through the same steps or the model sees something it never saw in training. Images that
already look like Fashion-MNIST (light garment on a dark background) are recognised by
their border and not negated a second time.

Training on the Fashion-MNIST IDX files skips this function only because those images
are its output already; a test tags the test set written out as PNG files and checks the
accuracy matches ``evaluate``.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageFilter

from .model import ModelConfig

PREPROCESSING = {
    "name": "fashion-mnist-conversion",
    "version": 1,
    "steps": [
        "exif-transpose", "first-frame", "alpha-onto-white", "to-8-bit",
        "estimate-background-from-border", "trim-background (tolerance 5%)",
        "negate-if-light-background (background -> 0)", "resize-longest-edge", "unsharp-mask",
        "centre-on-square-canvas",
    ],
}

# Border pixels closer than this to the background colour are trimmed (the paper's 5%).
TRIM_TOLERANCE = 0.05 * 255
# Below this, a border is "dark": the image is already Fashion-MNIST style (no negation).
LIGHT_BACKGROUND = 128
SHARPEN_BELOW_SCALE = 0.75
SHARPEN_PERCENT = 50


def to_8bit(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 'L' or 'RGB', transparency composited onto white.

    Handles palette/LA/RGBA transparency, CMYK, 1-bit, 16- and 32-bit integer and float
    images. 16-bit values are scaled, not clipped (Pillow's own I;16 -> L clips).
    """
    mode = img.mode
    if "transparency" in img.info and mode in ("P", "L", "RGB", "1"):
        # A colour key (PNG tRNS) marks one colour as see-through; optimisers such as
        # optipng store a white backdrop that way, as transparent black.
        img = img.convert("RGBA")
        mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode == "P":
        img = img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        peak = arr.max() if arr.size else 0.0
        if mode == "F" and peak <= 1.0:
            scale = 255.0
        elif peak > 255:
            scale = 255.0 / 65535.0 if peak <= 65535 else 255.0 / peak
        else:
            scale = 1.0
        return Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8), "L")
    if mode == "1":
        return img.convert("L")
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV


def _border(arr: np.ndarray) -> np.ndarray:
    """All pixels on the outermost rows and columns, as (K, channels)."""
    a = arr.reshape(arr.shape[0], arr.shape[1], -1)
    return np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]]).astype(np.float32)


def _foreground_bbox(img: Image.Image, size: int) -> tuple[tuple[int, int, int, int] | None, np.ndarray]:
    """Bounding box of the product, and the background colour (per channel).

    The background is the median border colour. A pixel is product when it differs from
    it by more than the paper's 5%, raised on noisy backdrops to four robust standard
    deviations of the border. The mask is computed on a box-reduced copy (about four
    pixels per output pixel) so that sensor and JPEG noise average out instead of
    stretching the box to the image edge.
    """
    k = max(1, max(img.size) // (4 * size))
    probe = img.reduce(k) if k > 1 else img
    arr = np.asarray(probe)
    a = arr.reshape(arr.shape[0], arr.shape[1], -1).astype(np.float32)
    border = _border(arr)
    background = np.median(border, axis=0)
    spread = 1.4826 * float(np.median(np.abs(border - background), axis=0).max())
    tolerance = max(TRIM_TOLERANCE, 4.0 * spread)
    diff = np.abs(a - background.reshape(1, 1, -1)).max(axis=2)
    box = Image.fromarray(((diff > tolerance) * 255).astype(np.uint8), "L").getbbox()
    if box is None or k == 1:
        return box, background
    left, top, right, bottom = box
    return (left * k, top * k, min(img.size[0], right * k), min(img.size[1], bottom * k)), background


def to_model_array(img: Image.Image, config: ModelConfig) -> np.ndarray:
    """A decoded PIL image -> uint8 array (C, S, S) in Fashion-MNIST form (light on black)."""
    img = to_8bit(img)
    if config.channels == 1 and img.mode != "L":
        img = img.convert("L")
    elif config.channels == 3 and img.mode != "RGB":
        img = img.convert("RGB")
    bbox, background = _foreground_bbox(img, config.input_size)
    arr = np.asarray(img)
    if bbox is not None:
        arr = arr[bbox[1] : bbox[3], bbox[0] : bbox[2]]

    # Map the background to 0 and the far end of the range to 255, per channel: plain
    # negation for white backdrops, and a gentle stretch for grey or off-white ones.
    bg = background.astype(np.float32).reshape(1, 1, -1)
    a = arr.reshape(arr.shape[0], arr.shape[1], -1).astype(np.float32)
    if float(background.mean()) >= LIGHT_BACKGROUND:
        out = (bg - a) * (255.0 / np.maximum(bg, 1.0))
    else:
        out = (a - bg) * (255.0 / np.maximum(255.0 - bg, 1.0))
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)

    h, w = out.shape[:2]
    size = config.input_size
    scale = size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    small = Image.fromarray(out.squeeze(2) if out.shape[2] == 1 else out)
    if (new_w, new_h) != (w, h):
        small = small.resize((new_w, new_h), Image.Resampling.BOX if scale < 0.5 else Image.Resampling.BILINEAR)
    if scale < SHARPEN_BELOW_SCALE:
        # Fashion-MNIST's conversion sharpens after shrinking, to undo the blur of the
        # resize; an image that was not shrunk (already Fashion-MNIST-like) is left alone.
        small = small.filter(ImageFilter.UnsharpMask(radius=1, percent=SHARPEN_PERCENT, threshold=0))
    canvas = Image.new(small.mode, (size, size), 0)
    # Fashion-MNIST puts the odd pixel of padding before the item, not after it.
    canvas.paste(small, ((size - new_w + 1) // 2, (size - new_h + 1) // 2))
    result = np.asarray(canvas)
    return result[None] if result.ndim == 2 else result.transpose(2, 0, 1)


def image_to_tensor(img: Image.Image, config: ModelConfig) -> torch.Tensor:
    """A PIL image -> the model's input, float (C, S, S) in [0, 1]."""
    return torch.from_numpy(to_model_array(img, config).copy()).float().div_(255)
