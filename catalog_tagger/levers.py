"""Switches for each step of the one conversion (preprocess.py), and the named sets of them
that docs/zero-shot-accuracy.md measured photo style by photo style.

``DEFAULT`` is what ``train`` and ``tag`` use; the other sets exist so that a benchmark
(benchmarks/zero_shot_levers.py) can re-measure any lever on photos the team does not have.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Levers:
    """Switches for each step of the conversion, so a benchmark can measure each on its own
    (benchmarks/zero_shot_levers.py). ``DEFAULT`` is what train and tag use."""

    mask: str = "border"  # "border": colour difference only (v1); "contrast": + local contrast
    fill_holes: bool | str = False  # True, or "faint": only where the item is mostly invisible
    blank_outside_mask: bool = False  # pixels outside the object become background
    brightness: str = "none"  # "none", "floor" (item pixels >= FLOOR), "stretch" (p95 -> 225), "stretch-floor"
    head_crop: bool = False  # worn photos: cut the head above the shoulders out of the frame
    clutter: str = "none"  # "none", "grabcut", "grabcut-fast" (OpenCV; only where the backdrop is not plain)
    edge_threshold: float = 12.0
    close_size: int = 3
    pair: str = "none"  # "one": of two alike objects side by side keep the larger; "one-turned": + lay a tall one down
    skin: bool = False  # worn photos: pixels of the face's colour (bare arms, legs) leave the item
    face: bool = False  # (with skin) a head that does not narrow into a neck: cut below a face of skin colour
    hem: bool = False  # worn photos (with skin): rows below a lasting change of colour (top over jeans) go
    colour_cutout: bool = False  # GrabCut on the photo's colours (decoded as YCbCr) rather than on grey


V1 = Levers()


# Measured lever by lever in docs/zero-shot-accuracy.md.
DEFAULT = Levers(fill_holes="faint", brightness="floor", head_crop=True, skin=True, face=True,
                 clutter="grabcut-fast", colour_cutout=True)
LEVER_SETS = {
    "v1": V1,
    "v2": replace(DEFAULT, colour_cutout=False, skin=False, face=False),  # default of 2026-11-30: cutout on grey
    "v1-stretch": Levers(brightness="stretch"),
    "v1-stretch-floor": Levers(brightness="stretch-floor"),
    "v1-floor": Levers(brightness="floor"),
    "cf-floor": Levers(mask="contrast", fill_holes=True, brightness="floor"),
    "cf-head-floor": Levers(mask="contrast", fill_holes=True, head_crop=True, brightness="floor"),
    "fill": Levers(fill_holes=True),
    "contrast-fill": Levers(mask="contrast", fill_holes=True),
    "cf-stretch": Levers(mask="contrast", fill_holes=True, brightness="stretch"),
    "cf-stretch-floor": Levers(mask="contrast", fill_holes=True, brightness="stretch-floor"),
    "cf-blank": Levers(mask="contrast", fill_holes=True, blank_outside_mask=True),
    "v1-head": Levers(head_crop=True),
    "cf-head": Levers(mask="contrast", fill_holes=True, head_crop=True),
    "floor-head": Levers(brightness="floor", head_crop=True),
    "floor+grabcut": Levers(brightness="floor", clutter="grabcut"),
    "floor-head+grabcut": Levers(brightness="floor", head_crop=True, clutter="grabcut"),
    "floor+grabcut-fast": Levers(brightness="floor", clutter="grabcut-fast"),
    "floor-fill": Levers(fill_holes=True, brightness="floor"),
    "floor-fill+grabcut-fast": Levers(fill_holes=True, brightness="floor", clutter="grabcut-fast"),
    "final": Levers(brightness="floor", head_crop=True, clutter="grabcut-fast"),
    "final+fill": Levers(fill_holes=True, brightness="floor", head_crop=True, clutter="grabcut-fast"),
    "default": DEFAULT,
    "v1+grabcut": Levers(clutter="grabcut"),
    "v1+grabcut-stretch": Levers(clutter="grabcut", brightness="stretch"),
    "cf-stretch+grabcut": Levers(mask="contrast", fill_holes=True, brightness="stretch", clutter="grabcut"),
    "v2-full": replace(DEFAULT, colour_cutout=False, clutter="grabcut"),
    "default-full": replace(DEFAULT, clutter="grabcut"),
    "default+pair": replace(DEFAULT, pair="one"),
    "default+pair-turned": replace(DEFAULT, pair="one-turned"),
    "default-skin": replace(DEFAULT, skin=False, face=False),  # the default of 2026-12-01
    "default-face": replace(DEFAULT, face=False),
    "default+hem": replace(DEFAULT, hem=True),
}
