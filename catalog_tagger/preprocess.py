"""The one conversion from any product photo to the model's input.

Fashion-MNIST was made from product photos by a documented conversion (Xiao et al. 2017,
arXiv:1708.07747, section 2): trim the border colour, resize the longest edge to 28,
sharpen, centre on a 28x28 canvas, negate, 8-bit grayscale. A catalog photo must go
through the same steps or the model sees something it never saw in training. Images that
already look like Fashion-MNIST (light garment on a dark background) are recognised by
their border and not negated a second time.

Real photos are not Fashion-MNIST's source photos, so four steps were added (issue 19,
each measured per photo style in docs/zero-shot-accuracy.md): an item that is mostly
invisible inside its own outline (white on white) is filled, and every item's pixels are
lifted to at least a faint grey, so that it keeps its silhouette after negation; a tall
object with a head over the shoulders (a top worn by a model: a head narrowing into a neck,
or a face found by skin colour) loses the head, and its bare arms (the face's colour,
worn.py); and a cluttered backdrop (floor, bed, carpet: a border far from one colour) is
cut away with OpenCV's GrabCut, on the photo's colours (a JPEG is decoded as YCbCr for
that: its Y plane is the grey the model sees). Light-on-black input takes none of them.

Training on the Fashion-MNIST IDX files skips this function only because those images
are its output already; a test tags the test set written out as PNG files and checks the
accuracy matches ``evaluate``.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageFilter

from .cutout import CLUTTER_SPREAD, mask_box, object_mask
from .levers import DEFAULT, V1, Levers
from .model import ModelConfig
from .shoe_pairs import one_of_a_pair
from .worn import worn_garment

PREPROCESSING = {
    "name": "fashion-mnist-conversion",
    "version": 5,
    "steps": [
        "exif-transpose", "first-frame", "alpha-onto-white", "to-8-bit", "noise-field -> empty frame",
        "estimate-background-from-border", "trim-background (tolerance 5%)",
        "fill-faint-item (white on white)", "cut-head-of-worn-photo",
        "cut-head-above-a-face (skin colour; long hair, hoods)", "cut-bare-arms-of-worn-photo (the face's chroma)",
        "cluttered-backdrop: grabcut-cutout on the colours (jpeg decoded as YCbCr, opencv)",
        "negate-if-light-background (background -> 0)", "item-floor 40", "resize-longest-edge", "unsharp-mask",
        "centre-on-square-canvas",
    ],
}

# Border pixels closer than this to the background colour are trimmed (the paper's 5%).
TRIM_TOLERANCE = 0.05 * 255
# Below this, a border is "dark": the image is already Fashion-MNIST style (no negation).
LIGHT_BACKGROUND = 128
SHARPEN_BELOW_SCALE = 0.75
# Neighbouring pixels of a photo, at about four pixels per model pixel, correlate at least
# this much when the photo shows anything: shading, fabric and backdrops vary smoothly
# (2,136 real catalog and home photos: 0.44 and above, 99% above 0.67), while a noise field
# gives about 0 at any size and JPEG quality. Shrunk to 28x28 such a field averages into a
# flat box the network reads as a Bag, so the conversion returns an empty frame instead,
# which the out-of-scope detector reports as blank.
MIN_NEIGHBOUR_CORRELATION = 0.2
NOISE_BORDER_SPREAD = 1.0
SHARPEN_PERCENT = 50
_SHARPEN = ImageFilter.UnsharpMask(radius=1, percent=SHARPEN_PERCENT, threshold=0)


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


# Less than this share of a filled silhouette differs from the backdrop: a faint item.
FAINT_SHARE = 0.5


def _probe(img: Image.Image, size: int) -> tuple[np.ndarray, int]:
    """A box-reduced copy (about four pixels per output pixel), as (H, W, C) float32, and
    its reduction factor: sensor and JPEG noise average out at this size. At ``k`` = 1 (a
    thumbnail) the probe is the photo itself, and the conversion crops it rather than read
    the photo out of Pillow a second time."""
    k = max(1, max(img.size) // (4 * size))
    probe = img.reduce(k) if k > 1 else img
    arr = np.asarray(probe)
    return arr.reshape(arr.shape[0], arr.shape[1], -1).astype(np.float32), k


def neighbour_correlation(a: np.ndarray) -> float:
    """Correlation of each pixel's brightness (channel mean) with its right neighbour's in an
    (H, W, C) image; 1.0 where too small or too even to say."""
    grey = a.mean(2, dtype=np.float32) if a.ndim == 3 and a.shape[2] > 1 else a.reshape(a.shape[0], a.shape[1])
    u, v = grey[:, :-1].astype(np.float32), grey[:, 1:].astype(np.float32)
    if u.size < 64:
        return 1.0
    mu, mv = float(u.mean()), float(v.mean())
    variance = np.sqrt(max(float(np.square(u - mu).mean()) * float(np.square(v - mv).mean()), 0.0))
    # An even image (a blank page, a flat colour with a little JPEG noise: spread under 2
    # grey levels) is not a noise field; the detector's own rules deal with it.
    if variance <= 2.0**2:
        return 1.0
    return float(((u - mu) * (v - mv)).mean()) / variance


def _background(a: np.ndarray) -> tuple[np.ndarray, float]:
    """Median border colour and a robust spread (1.4826 MAD, largest channel) of the border."""
    border = _border(a)
    background = _median(border)
    spread = 1.4826 * float(_median(np.abs(border - background)).max())
    return background, spread


def _median(values: np.ndarray) -> np.ndarray:
    """Per-column median of (K, C) float32 values, equal to ``np.median(values, axis=0)``
    bit for bit, without its generic machinery: on a thumbnail, two ``np.median`` calls
    were a fifth of the conversion's time."""
    ordered = np.sort(values, axis=0)
    half = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[half]
    return (ordered[half - 1] + ordered[half]) / np.float32(2)


def _filter(mask: np.ndarray, f: ImageFilter.Filter) -> np.ndarray:
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255, "L").filter(f)) > 127


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the object: a pixel between object pixels both along its row and along its
    column is inside it (the white body of a shirt whose outline alone was found). Far
    cheaper than a flood fill, and it also closes holes that touch a concavity."""
    def span(m: np.ndarray) -> np.ndarray:
        any_ = m.any(axis=1, keepdims=True)
        first = np.argmax(m, axis=1)[:, None]
        last = m.shape[1] - 1 - np.argmax(m[:, ::-1], axis=1)[:, None]
        cols = np.arange(m.shape[1])[None, :]
        return any_ & (cols >= first) & (cols <= last)

    return mask | (span(mask) & span(mask.T).T)


def _object_mask(a: np.ndarray, background: np.ndarray, spread: float, levers: Levers) -> np.ndarray:
    """Product pixels of the probe: far from the border colour, or (``contrast``) edges,
    closed, holes filled and reduced to the central object."""
    tolerance = max(TRIM_TOLERANCE, 4.0 * spread)
    diff = np.abs(a - background.reshape(1, 1, -1)).max(axis=2)
    mask = diff > tolerance
    if levers.mask == "contrast":
        grey = Image.fromarray(np.clip(a.mean(axis=2), 0, 255).astype(np.uint8), "L")
        contrast = np.asarray(grey.filter(ImageFilter.MaxFilter(3))).astype(np.int16) - np.asarray(
            grey.filter(ImageFilter.MinFilter(3)))
        mask |= contrast > max(levers.edge_threshold, 6.0 * spread)
        if levers.close_size > 1:
            closed = _filter(mask, ImageFilter.MaxFilter(levers.close_size))
            mask = _filter(closed, ImageFilter.MinFilter(levers.close_size))
    if levers.fill_holes is True:
        mask = _fill_holes(mask)
    elif levers.fill_holes == "faint":
        # Only a faint item (white on white: mostly invisible inside its outline) is
        # filled; filling a worn top would also fill the gaps between arms and body.
        # An item covering half its box already cannot be faint: skip the fill (speed).
        extent = mask_box(mask)
        if extent is not None:
            box = (slice(extent[1], extent[3]), slice(extent[0], extent[2]))
            inner = mask[box]
            covered = np.count_nonzero(inner)  # a third of bool.sum()'s cost, the same count
            if covered < FAINT_SHARE * inner.size:
                filled = _fill_holes(inner)
                if covered < FAINT_SHARE * np.count_nonzero(filled):
                    mask = mask.copy()
                    mask[box] = filled
    return mask


def _bbox(mask: np.ndarray, k: int, full: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """The box (left, top, right, bottom) around the mask's pixels, scaled by ``k`` to the
    full image; None for an empty mask (Pillow's ``getbbox`` convention)."""
    box = mask_box(mask)
    if box is None or k == 1:
        return box
    left, top, right, bottom = box
    return (left * k, top * k, min(full[0], right * k), min(full[1], bottom * k))


def _within(mask: np.ndarray, bbox: tuple[int, int, int, int], k: int, shape: tuple[int, ...]) -> np.ndarray:
    """The part of a probe-sized ``mask`` inside ``bbox`` (full-size pixels), at the crop's
    ``shape``: which of the crop's pixels to blank."""
    box = (slice(bbox[1] // k, -(-bbox[3] // k)), slice(bbox[0] // k, -(-bbox[2] // k)))
    if mask[box].shape == shape[:2]:
        return mask[box]  # the probe is the photo (k = 1, thumbnails): nothing to resize
    part = Image.fromarray(mask[box].astype(np.uint8) * 255)
    return np.asarray(part.resize((shape[1], shape[0]), Image.Resampling.NEAREST)) > 127


def to_model_array(img: Image.Image, config: ModelConfig) -> np.ndarray:
    """A decoded PIL image -> uint8 array (C, S, S) in Fashion-MNIST form (light on black)."""
    return convert(img, config, DEFAULT)


def convert(img: Image.Image, config: ModelConfig, levers: Levers) -> np.ndarray:
    """``to_model_array`` with each lever chosen (benchmarks only; the product uses DEFAULT)."""
    # A JPEG decoded as YCbCr (``draft_mode``) carries the grey a grey decode gives, bit for
    # bit, as its Y plane, and the colours the cutout may want.
    img = img if img.mode == "YCbCr" else to_8bit(img)
    colour = img if config.channels == 1 and levers.colour_cutout and img.mode in ("RGB", "YCbCr") else None
    if config.channels == 1 and img.mode != "L":
        img = img.getchannel(0) if img.mode == "YCbCr" else img.convert("L")
    elif config.channels == 3 and img.mode != "RGB":
        img = img.convert("RGB")
    probe, k = _probe(img, config.input_size)
    background, spread = _background(probe)
    # A noise field's border varies (a 1,000 px field box-reduced to the probe: 3 grey levels),
    # so photos on an even backdrop (most thumbnails: 0) skip the measure and its cost.
    if spread > NOISE_BORDER_SPREAD and neighbour_correlation(probe) < MIN_NEIGHBOUR_CORRELATION:
        return np.zeros((config.channels, config.input_size, config.input_size), np.uint8)
    if levers.clutter != "none" and spread > CLUTTER_SPREAD:
        cut = _cutout(colour, probe, k, config, levers)
        if cut is not None:
            return cut
    light = float(background.mean()) >= LIGHT_BACKGROUND
    mask = _object_mask(probe, background, spread, levers if light else V1)
    skin = None
    if light and levers.head_crop:
        mask, skin = worn_garment(mask, colour, k, levers)
    pair = one_of_a_pair(mask) if light and levers.pair != "none" else None
    if pair is not None:
        mask, others = pair
    bbox = _bbox(mask, k, img.size)
    arr = probe if k == 1 else np.asarray(img)
    if bbox is not None:
        arr = arr[bbox[1] : bbox[3], bbox[0] : bbox[2]]

    # Map the background to 0 and the far end of the range to 255, per channel: plain
    # negation for white backdrops, and a gentle stretch for grey or off-white ones.
    bg = background.astype(np.float32).reshape(1, 1, -1)
    a = arr.reshape(arr.shape[0], arr.shape[1], -1).astype(np.float32, copy=False)
    if light:
        out = (bg - a) * (255.0 / np.maximum(bg, 1.0))
    else:
        out = (a - bg) * (255.0 / np.maximum(255.0 - bg, 1.0))
    if light and bbox is not None and (levers.blank_outside_mask or levers.brightness != "none"):
        box_mask = mask[bbox[1] // k : -(-bbox[3] // k), bbox[0] // k : -(-bbox[2] // k)]
        if box_mask.shape == a.shape[:2] and not levers.blank_outside_mask:
            inside = box_mask[..., None]  # the probe is the photo (thumbnails): nothing to resize
        else:
            crop = Image.fromarray(box_mask.astype(np.uint8) * 255, "L")
            if levers.blank_outside_mask:
                soft = np.asarray(crop.resize((a.shape[1], a.shape[0]), Image.Resampling.BILINEAR))
                soft = soft.astype(np.float32)[..., None] / 255.0
                inside = soft > 0.5
            else:
                inside = (np.asarray(crop.resize((a.shape[1], a.shape[0]), Image.Resampling.NEAREST)) > 127)[..., None]
        out = np.maximum(out, 0.0)
        if levers.brightness != "none":
            out = _brightness(out, inside, levers.brightness)
        if levers.blank_outside_mask:
            out = out * soft
    if skin is not None and bbox is not None:
        out = np.where(_within(skin, bbox, k, out.shape)[..., None], 0.0, out)
    if pair is not None and bbox is not None:
        # The other shoe's pixels inside this one's box (and a pixel around them) go.
        gone = _within(_filter(others, ImageFilter.MaxFilter(3)), bbox, k, out.shape)
        out = _turn(np.where(gone[..., None], 0.0, out), levers)
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    return _fit(out, config.input_size)


# A kept shoe this much taller than wide was seen from above, toe up: "one-turned" lays
# it on its side, toe to the left, as Fashion-MNIST's shoes face.
TALL_SHOE = 1.3


def _turn(out: np.ndarray, levers: Levers) -> np.ndarray:
    h, w = out.shape[:2]
    if levers.pair == "one-turned" and h > TALL_SHOE * w:
        return np.ascontiguousarray(np.rot90(out, 1))  # counter-clockwise: the toe (top) to the left
    return out


def _cutout(colour: Image.Image | None, probe: np.ndarray, k: int, config: ModelConfig,
            levers: Levers) -> np.ndarray | None:
    """Cluttered backdrop: segment the object (on ``colour`` where given, else on the grey
    probe), black out the rest, and make the object light on black whichever is brighter
    (a dark shirt on a pale floor is negated, a pale one on a dark carpet is not)."""
    mask = object_mask(colour, probe, k, config.input_size, fast=levers.clutter == "grabcut-fast")
    if mask is None:
        return None
    if levers.fill_holes is True:
        mask = _fill_holes(mask)
    pair = one_of_a_pair(mask) if levers.pair != "none" else None
    if pair is not None:
        mask = pair[0]
    grey = probe.mean(axis=2)
    inside, outside = float(np.median(grey[mask])), float(np.median(grey[~mask]))
    bbox = _bbox(mask, 1, (probe.shape[1], probe.shape[0]))
    if bbox is None:
        return None
    left, top, right, bottom = bbox
    g, m = grey[top:bottom, left:right], mask[top:bottom, left:right]
    out = (outside - g) if inside < outside else (g - outside)
    out = np.maximum(out, 0) * m
    if levers.brightness != "none":
        out = _brightness(out[..., None], m[..., None], levers.brightness)[..., 0]
    else:
        vals = out[m]
        out = out * (255.0 / max(float(np.percentile(vals, 99)) if vals.size else 1.0, 1.0))
    if pair is not None:
        out = _turn(out, levers)
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)[..., None]
    if config.channels == 3:
        out = np.repeat(out, 3, axis=2)
    # The probe has about four pixels per output pixel, so the shrink below still sharpens.
    return _fit(out, config.input_size)


# Fashion-MNIST items were contrast-stretched: their brightest 5% sit at about 225
# whatever the garment's colour (215-237 by class on the test set).
ITEM_P95 = 225.0


def _brightness(out: np.ndarray, inside: np.ndarray, how: str) -> np.ndarray:
    """Map the item's own range to Fashion-MNIST's: a white shirt on white negates to a
    faint grey, which the model reads as an empty frame."""
    if how == "floor":
        return np.where(inside, np.maximum(out, FLOOR), out)
    values = out[inside[..., 0]] if inside.any() else out.reshape(-1)
    p95 = float(np.percentile(values, 95)) if values.size else 0.0
    gain = min(8.0, ITEM_P95 / max(p95, 1.0))
    result = out * max(1.0, gain)
    if how == "stretch-floor":
        result = np.where(inside, np.maximum(result, FLOOR), result)
    return result


FLOOR = 40.0


def _fit(out: np.ndarray, size: int) -> np.ndarray:
    """Resize the longest edge to ``size``, sharpen, centre on a black square canvas."""
    h, w = out.shape[:2]
    scale = size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    small = out.squeeze(2) if out.shape[2] == 1 else out
    # Pillow only where it resizes or sharpens: an image already at its size (Fashion-MNIST
    # itself) goes onto the canvas as it is.
    if (new_w, new_h) != (w, h) or scale < SHARPEN_BELOW_SCALE:
        picture = Image.fromarray(small)
        if (new_w, new_h) != (w, h):
            picture = picture.resize((new_w, new_h), Image.Resampling.BOX if scale < 0.5 else Image.Resampling.BILINEAR)
        if scale < SHARPEN_BELOW_SCALE:
            # Fashion-MNIST's conversion sharpens after shrinking, to undo the blur of the
            # resize; an image that was not shrunk (already Fashion-MNIST-like) is left alone.
            picture = picture.filter(_SHARPEN)
        small = np.asarray(picture)
    # A numpy canvas: Pillow's new + paste + read-back cost three calls for a copy.
    # Fashion-MNIST puts the odd pixel of padding before the item, not after it.
    canvas = np.zeros((size, size, *small.shape[2:]), np.uint8)
    top, left = (size - new_h + 1) // 2, (size - new_w + 1) // 2
    canvas[top : top + new_h, left : left + new_w] = small
    return canvas[None] if canvas.ndim == 2 else canvas.transpose(2, 0, 1)


def draft_mode(config: ModelConfig, levers: Levers | None = None) -> str:
    """The mode a JPEG is decoded in for this conversion: grey for a 1-channel model, or
    YCbCr when its cutout wants colour (Y is the grey plane; chroma costs ~4% more decode)."""
    levers = DEFAULT if levers is None else levers
    if config.channels != 1:
        return "RGB"
    return "YCbCr" if levers.colour_cutout and levers.clutter != "none" else "L"


def image_to_tensor(img: Image.Image, config: ModelConfig) -> torch.Tensor:
    """A PIL image -> the model's input, float (C, S, S) in [0, 1]."""
    return torch.from_numpy(to_model_array(img, config).copy()).float().div_(255)
