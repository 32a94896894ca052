"""Steps of the conversion (preprocess.py) for a top worn by a model: the head goes (found
by its neck, or by the face's skin colour where long hair or a hood hides the neck), and
with it (``Levers.skin``) the bare arms, measured on the model's own face colour. A
Fashion-MNIST top starts at the collar and has nothing beside its sleeves; a worn T-shirt
with the arms left in reads as long sleeves (a Pullover or Shirt) to the bundled model.
Measured per class in docs/zero-shot-accuracy.md."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .cutout import mask_box, opencv
from .levers import Levers


def worn_garment(mask: np.ndarray, colour: Image.Image | None, k: int,
                 levers: Levers) -> tuple[np.ndarray, np.ndarray | None]:
    """The item of a light-backdrop photo (``mask``, at the probe's size; ``colour``: the
    photo in colour, or None; ``k``: the probe's reduction) without the model's head and,
    with ``levers.skin``, without the bare arms; and those arms' pixels, which the
    conversion blanks (None when nothing was taken as skin)."""
    # Both head steps look at tall objects only (a figure); most photos are not, and one
    # test here spares them both steps (it was taken up to three times per photo).
    if not _tall(mask):
        return mask, None
    body = below_the_neck(mask)
    if not levers.skin or colour is None or (body is mask and not levers.face):
        return body, None
    ycc = colour if colour.mode == "YCbCr" else colour.convert("YCbCr")
    small = np.asarray(ycc.reduce(k) if k > 1 else ycc)
    if body is mask:
        body = below_the_face(mask, small)
        if body is mask:
            return mask, None
    skin = bare_skin(body, mask & ~body, small)
    if skin is not None:
        body = body & ~skin
    if levers.hem:
        body = above_the_hem(body, small)
    return body, skin


def _tall(mask: np.ndarray) -> bool:
    """Taller than 1.3 times its width, over at least 8 rows that hold some of it: a
    figure, or a long garment."""
    box = mask_box(mask)
    if box is None:
        return False
    left, top, right, bottom = box
    if bottom - top < 8 or bottom - top < 1.3 * (right - left):
        return False  # the common case, told from the box alone
    return int(np.count_nonzero(mask[top:bottom].any(axis=1))) >= 8


def below_the_neck(mask: np.ndarray) -> np.ndarray:
    """A tall object (``_tall``: the caller's test) whose top is a narrow blob over much
    wider shoulders is worn by a model: the head goes. Fashion-MNIST tops start at the collar."""
    row_widths = mask.sum(axis=1)
    rows = np.flatnonzero(row_widths)
    top, bottom = rows[0], rows[-1] + 1
    widths = row_widths[top:bottom].astype(np.float32)
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


# Skin tones of every shade, in YCbCr (the classic box of Chai and Ngan, widened a little).
SKIN_CB = (77.0, 135.0)
SKIN_CR = (134.0, 180.0)
# A face covers at least this share of the figure's box (a thumbnail's face: about 3%;
# 0.005 and 0.02 measured the same on dev thumbnails).
FACE_MIN_AREA = 0.01


def below_the_face(mask: np.ndarray, ycc: np.ndarray) -> np.ndarray:
    """A tall object (``_tall``: the caller's test) with a face at its top, where the head
    does not narrow into a neck (long hair over the shoulders, a hood): everything down to
    the chin goes."""
    cv2 = opencv()
    box = mask_box(mask)
    if box is None:
        return mask
    left, top, right, bottom = box
    height, width = bottom - top, right - left
    zone = slice(top, top + int(0.3 * height))
    c = ycc[zone]  # compared as uint8: the bounds are whole numbers, so no float copy is needed
    skin = mask[zone] & (c[..., 0] > 60) & (c[..., 1] >= SKIN_CB[0]) & (c[..., 1] <= SKIN_CB[1]) & (
        c[..., 2] >= SKIN_CR[0]) & (c[..., 2] <= SKIN_CR[1])
    n, _, stats, _ = cv2.connectedComponentsWithStats(skin.astype(np.uint8), connectivity=8)
    if n < 2:
        return mask
    face = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    f_left, f_top, f_width, f_height, area = (int(v) for v in stats[face, :5])
    centre = f_left + f_width / 2 - left
    if (area < FACE_MIN_AREA * height * width or f_width > 0.45 * width or f_top > 0.15 * height
            or not width / 3 <= centre <= 2 * width / 3 or f_height < 0.5 * f_width):
        return mask
    cut = mask.copy()
    cut[: top + f_top + f_height] = False
    return cut


# Skin is told from a garment by its chroma, measured on the model's own face: a pixel within
# SKIN_CHROMA of the face's (Cb, Cr) is skin (dev thumbnails: 15-25 all within 0.3 points of
# each other; 6 keeps half the arms, 35 eats warm-coloured tops). Skin tones of every shade
# sit at Cr 135-175; a face below SKIN_MIN_CR is a grey photo, and nothing is taken.
SKIN_CHROMA = 18.0
SKIN_MIN_CR = 134.0
# An arm runs along the body: at least this share of the body's height.
SKIN_MIN_SPAN = 0.3


def _middle(values: np.ndarray) -> np.ndarray:
    """The upper median along the first axis (np.median's averaging costs 3x on a few
    hundred pixels, and a colour needs no half steps)."""
    return np.partition(values, len(values) // 2, axis=0)[len(values) // 2]


def bare_skin(body: np.ndarray, head: np.ndarray, ycc: np.ndarray) -> np.ndarray | None:
    """The bare arms of a worn photo: pixels of the face's colour in long strips beside the
    body's middle. ``body``: the mask below the neck; ``head``: the pixels cut above it;
    ``ycc``: the photo as YCbCr at the masks' size. None when the face is not skin-coloured
    or when skin would be most of the body (a garment the colour of skin)."""
    cv2 = opencv()

    face = ycc[head]
    if len(face) < 6:
        return None
    face = face[face[:, 0] >= _middle(face[:, 0])]  # the face is brighter than the hair
    cb, cr = (int(v) for v in _middle(face[:, 1:]))
    if cr < SKIN_MIN_CR:
        return None
    # Measured on every pixel and masked by the body after: on a thumbnail that is 8x
    # cheaper than gathering the body's pixels and scattering the near ones back. Chroma
    # values are whole numbers, so integer squares give float32's answer exactly.
    d_cb = ycc[..., 1].astype(np.int32) - cb
    d_cr = ycc[..., 2].astype(np.int32) - cr
    skin = body & (d_cb * d_cb + d_cr * d_cr < SKIN_CHROMA**2)
    if np.count_nonzero(skin) > 0.5 * np.count_nonzero(body):
        return None
    box = mask_box(body)
    if box is None:
        return None
    left, top, right, bottom = box
    centre = (left + right - 1) // 2
    _, labels, stats, _ = cv2.connectedComponentsWithStats(skin.astype(np.uint8), connectivity=8)
    blob_left, blob_width = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_WIDTH]
    # A hand out of a sleeve is a small blob (taking it away shortens the sleeve the model
    # reads), and a skin-coloured patch across the body's middle is the garment itself.
    arms = (stats[:, cv2.CC_STAT_HEIGHT] >= SKIN_MIN_SPAN * (bottom - top)) & (
        (blob_left > centre) | (blob_left + blob_width <= centre))
    arms[0] = False  # the background label
    return np.asarray(arms[labels])


# Not in the default (docs/zero-shot-accuracy.md): cutting a worn top at its hem took the
# jeans away (T-shirts .75 -> .78, Pullovers .62 -> .67) but long shirts and coats lost
# their length (.57 -> .52, .61 -> .54): dev 80.5% against 80.8% without it.
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
