"""One shoe out of a pair: a lever of the conversion (``levers.Levers.pair``), measured
in docs/zero-shot-accuracy.md and not in the default (the bundled model does not read a
single shoe seen from above any better than the pair)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .cutout import opencv

# Two objects are a pair when the smaller has at least this share of the larger's area,
# their boxes agree in width and height within this ratio, and together they hold this
# share of the item's pixels.
PAIR_AREA = 0.5
PAIR_BOX = 0.6
PAIR_SHARE = 0.85
# How deep the outline may be peeled to separate two objects, as a share of the item's size.
PAIR_NECK = 0.1
# A shoe is solid (this share of its box at least) and at most this many times as long as
# it is wide; a trouser leg or a stripe of a shirt is not.
SHOE_ELONGATION = 3.2
PAIR_SOLID = 0.35
# The two outlines overlap at least this much (intersection over union), one mirrored or not.
PAIR_ALIKE = 0.55


def one_of_a_pair(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Two alike objects side by side (a pair of shoes): the larger one's mask and the
    rest of the item's mask, or None. Objects that touch are told apart by peeling their
    outline away (at most PAIR_NECK of the item's size), so a narrow contact separates
    them and a body does not: trousers (legs joined at the waist), a bag (the handle goes,
    the bag stays one) and a worn figure are never split."""
    cv2 = opencv()

    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if rows.size == 0:
        return None
    m = np.pad(mask.astype(np.uint8), 1)
    dist = cv2.distanceTransform(m, cv2.DIST_L2, 3)[1:-1, 1:-1]
    reach = PAIR_NECK * max(rows[-1] - rows[0], cols[-1] - cols[0])
    for r in [0.0, *np.arange(1.0, reach + 1e-6)]:
        n, labels, stats, _ = cv2.connectedComponentsWithStats((dist > r).astype(np.uint8), connectivity=8)
        if n < 2:
            return None
        if n >= 3:
            first = _a_pair(labels, stats)
            if first:
                kept = labels == first
                if r > 0:  # grow it back over what was peeled off, within the item
                    away = cv2.distanceTransform((~kept).astype(np.uint8), cv2.DIST_L2, 3)
                    kept = mask & (away <= r + 1.0)
                return kept, mask & ~kept
    return None


def _a_pair(labels: np.ndarray, stats: np.ndarray) -> int:
    """The label of the larger of two alike objects side by side that make up the item, or 0."""
    areas = stats[1:, 4]
    first, second = np.argsort(areas)[::-1][:2] + 1
    xa, ya, wa, ha, area_a = (int(v) for v in stats[first])
    xb, yb, wb, hb, area_b = (int(v) for v in stats[second])
    if area_b < PAIR_AREA * area_a or area_a + area_b < PAIR_SHARE * int(areas.sum()):
        return 0
    if min(wa, wb) < PAIR_BOX * max(wa, wb) or min(ha, hb) < PAIR_BOX * max(ha, hb):
        return 0
    across = max(0, min(xa + wa, xb + wb) - max(xa, xb)) / min(wa, wb)  # shared share of width
    down = max(0, min(ya + ha, yb + hb) - max(ya, yb)) / min(ha, hb)
    if not (across < 0.25 and down > 0.5):
        return 0
    for w, h, area in ((wa, ha, area_a), (wb, hb, area_b)):
        if max(w, h) > SHOE_ELONGATION * min(w, h) or area < PAIR_SOLID * w * h:
            return 0
    # Left and right shoe are mirror images; two shoes facing one way are not.
    a = _outline(labels[ya : ya + ha, xa : xa + wa] == first)
    b = _outline(labels[yb : yb + hb, xb : xb + wb] == second)
    iou = max(float((a & c).sum()) / max(1, int((a | c).sum())) for c in (b, b[:, ::-1]))
    return int(first) if iou >= PAIR_ALIKE else 0


def _outline(part: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(part.astype(np.uint8) * 255).resize((16, 16), Image.Resampling.BILINEAR)) > 127
