"""The object of a photo on a cluttered backdrop (floor, bed, carpet), found by OpenCV's
GrabCut: the one step of the conversion (preprocess.py) that a plain border colour cannot do.

Only photos whose border is far from one colour take this path (``CLUTTER_SPREAD``); it
costs about 15-20 ms on a home photo at the fast setting, where a plain photo converts in
under 1 ms (docs/zero-shot-accuracy.md).
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
from PIL import Image

# A plain backdrop (studio, catalog) has a border spread of 0-5 grey levels; floors, beds
# and carpets 15-45 (10th-90th percentiles on the team's real home photos, docs/zero-shot-accuracy.md).
CLUTTER_SPREAD = 8.0


def opencv() -> ModuleType:
    """OpenCV (a dependency), imported when a photo first needs it (plain imports stay light),
    on one thread: the conversion runs in one process per core already, and OpenCV's pool
    spent twice the CPU time on a thumbnail's connected components (0.10 against 0.03 ms)."""
    import cv2

    cv2.setNumThreads(1)
    return cv2


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) around a 2-D boolean mask's pixels, right and bottom
    exclusive; None when it has none. One OpenCV call: numpy's scans of the rows and the
    columns took 6 us on a thumbnail's mask (1 us here), and a conversion asks up to five
    times per photo."""
    left, top, width, height = opencv().boundingRect(np.asarray(mask, dtype=bool).view(np.uint8))
    return None if width == 0 else (left, top, left + width, top + height)


def grabcut(probe: np.ndarray, iterations: int = 4) -> np.ndarray | None:
    """Object mask by GrabCut, started from "the object is inside a 6% inset"."""
    cv2 = opencv()

    h, w = probe.shape[:2]
    rgb = np.ascontiguousarray(np.repeat(probe, 3, axis=2) if probe.shape[2] == 1 else probe).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    rect = (max(1, round(0.06 * w)), max(1, round(0.06 * h)), max(2, round(0.88 * w)), max(2, round(0.88 * h)))
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    # GrabCut starts its colour models with k-means from OpenCV's global random state: left
    # alone, a photo's cutout would depend on which photos the process converted before.
    cv2.setRNGSeed(0)
    try:
        cv2.grabCut(rgb, mask, rect, bgd, fgd, iterations, cv2.GC_INIT_WITH_RECT)
    except cv2.error:
        return None
    return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)


def object_mask(colour: Image.Image | None, probe: np.ndarray, k: int, input_size: int,
                fast: bool) -> np.ndarray | None:
    """The object's pixels at the probe's size (``probe``: the grey photo reduced by ``k``),
    segmented on ``colour`` where given, else on the grey; None when GrabCut finds nothing
    usable (an error, almost nothing, or everything)."""
    source = probe
    if colour is not None:
        small_colour = (colour.reduce(k) if k > 1 else colour).convert("RGB")
        source = np.asarray(small_colour).astype(np.float32)
    if fast:
        # GrabCut at about two pixels per output pixel, 2 iterations: about 4x cheaper.
        small = Image.fromarray(np.clip(source[..., 0] if source.shape[2] == 1 else source, 0, 255).astype(np.uint8))
        small = small.reduce(2) if max(small.size) >= 4 * input_size else small
        mask = grabcut(np.asarray(small).reshape(small.size[1], small.size[0], -1).astype(np.float32), 2)
        if mask is not None and mask.shape != probe.shape[:2]:
            mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(
                (probe.shape[1], probe.shape[0]), Image.Resampling.NEAREST)) > 127
    else:
        mask = grabcut(source)
    if mask is None or mask.sum() < 0.02 * mask.size or mask.all():
        return None
    return mask
