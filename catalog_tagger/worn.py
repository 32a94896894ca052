"""Steps of the conversion (preprocess.py) for a top worn by a model: the head goes, and
with it (``Levers.skin``) the bare arms, measured on the model's own face colour. A
Fashion-MNIST top starts at the collar and has nothing beside its sleeves; a worn T-shirt
with the arms left in reads as long sleeves (a Pullover or Shirt) to the bundled model.
Measured per class in docs/zero-shot-accuracy.md."""

from __future__ import annotations

import numpy as np

from .cutout import opencv


def below_the_neck(mask: np.ndarray) -> np.ndarray:
    """A tall object whose top is a narrow blob over much wider shoulders is worn by a
    model: the head goes. Fashion-MNIST tops start at the collar."""
    rows = np.nonzero(mask.any(axis=1))[0]
    if rows.size < 8:
        return mask
    top, bottom = rows[0], rows[-1] + 1
    cols = np.nonzero(mask.any(axis=0))[0]
    if bottom - top < 1.3 * (cols[-1] + 1 - cols[0]):
        return mask
    widths = mask[top:bottom].sum(axis=1).astype(np.float32)
    widest = float(widths.max())
    head_zone = widths[: max(3, int(0.35 * len(widths)))]
    narrow = head_zone < 0.4 * widest
    if not narrow[: max(2, len(widths) // 30)].all():
        return mask
    wide = np.nonzero((head_zone > 0.6 * widest) & (np.cumsum(narrow) > 0))[0]
    if wide.size == 0 or wide[0] < 4:
        return mask
    # A head narrows into a neck before the shoulders; a collar, hood or hanger does not.
    above = widths[: wide[0]]
    lower = above[len(above) // 3 :]
    neck = len(above) - 1 - int(np.argmin(lower[::-1]))  # the lowest narrowest row
    if neck < 3 or float(above[neck]) > 0.8 * float(above[:neck].max()):
        return mask
    cut = mask.copy()
    cut[: top + neck] = False
    return cut


# Skin is told from a garment by its chroma, measured on the model's own face: a pixel within
# SKIN_CHROMA of the face's (Cb, Cr) is skin (dev thumbnails: 15-25 all within 0.3 points of
# each other; 6 keeps half the arms, 35 eats warm-coloured tops). Skin tones of every shade
# sit at Cr 135-175; a face below SKIN_MIN_CR is a grey photo, and nothing is taken.
SKIN_CHROMA = 18.0
SKIN_MIN_CR = 134.0
# An arm runs along the body: at least this share of the body's height.
SKIN_MIN_SPAN = 0.3


def bare_skin(body: np.ndarray, head: np.ndarray, ycc: np.ndarray) -> np.ndarray | None:
    """The bare arms of a worn photo: pixels of the face's colour in long strips beside the
    body's middle. ``body``: the mask below the neck; ``head``: the pixels cut above it;
    ``ycc``: the photo as YCbCr at the masks' size. None when the face is not skin-coloured
    or when skin would be most of the body (a garment the colour of skin)."""
    cv2 = opencv()

    face = ycc[head].astype(np.float32)
    if len(face) < 6:
        return None
    face = face[face[:, 0] >= np.median(face[:, 0])]  # the face is brighter than the hair
    cb, cr = float(np.median(face[:, 1])), float(np.median(face[:, 2]))
    if cr < SKIN_MIN_CR:
        return None
    inside = np.nonzero(body)
    chroma = ycc[inside][:, 1:].astype(np.float32) - np.array((cb, cr), np.float32)
    near = np.einsum("ij,ij->i", chroma, chroma) < SKIN_CHROMA**2
    if near.sum() > 0.5 * len(near):
        return None
    skin = np.zeros_like(body)
    skin[inside[0][near], inside[1][near]] = True
    rows, cols = np.flatnonzero(body.any(axis=1)), np.flatnonzero(body.any(axis=0))
    centre = (cols[0] + cols[-1]) // 2
    _, labels, stats, _ = cv2.connectedComponentsWithStats(skin.astype(np.uint8), connectivity=8)
    left, width = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_WIDTH]
    # A hand out of a sleeve is a small blob (taking it away shortens the sleeve the model
    # reads), and a skin-coloured patch across the body's middle is the garment itself.
    arms = (stats[:, cv2.CC_STAT_HEIGHT] >= SKIN_MIN_SPAN * (rows[-1] + 1 - rows[0])) & (
        (left > centre) | (left + width <= centre))
    arms[0] = False  # the background label
    return np.asarray(arms[labels])


# Not in the default (docs/zero-shot-accuracy.md): cutting a worn top at its hem took the
# jeans away (T-shirts .62 -> .68) but long shirts became pullovers (.55 -> .47): dev 79.6%
# against 79.7% without it.
HEM_JUMP = 45.0


def above_the_hem(body: np.ndarray, ycc: np.ndarray) -> np.ndarray:
    """Worn photos: where the body's colour changes for good (a top over jeans), the rows
    below leave the item."""
    rows = np.flatnonzero(body.any(axis=1))
    if rows.size < 12:
        return body
    c = ycc.astype(np.float32)
    counts = body.sum(axis=1).astype(np.float32)
    sums = (c * body[..., None]).sum(axis=1)
    top, bottom = rows[0], rows[-1] + 1
    best, at = 0.0, 0
    for r in range(top + int(0.35 * (bottom - top)), bottom - int(0.1 * (bottom - top))):
        n_up, n_down = counts[top:r].sum(), counts[r:bottom].sum()
        if n_up < 1 or n_down < 1:
            continue
        up, down = sums[top:r].sum(axis=0) / n_up, sums[r:bottom].sum(axis=0) / n_down
        jump = float(np.abs(up - down).max())
        if jump > best:
            best, at = jump, r
    if best < HEM_JUMP:
        return body
    cut = body.copy()
    cut[at:] = False
    return cut
