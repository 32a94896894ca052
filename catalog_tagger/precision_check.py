"""Whether ``tag --target-precision P`` can vouch for P on the photos being tagged.

The review thresholds in a card are measured on the photos its calibration was fitted
on. A model calibrated on Fashion-MNIST validation images says nothing about precision on
a retailer's photos (measured: "0.95" auto-accepted real catalog photos at 69%). So a
target precision counts as verified only when both hold:

1. the calibration was fitted on the retailer's own photos: ``learn`` (out-of-fold
   predictions on reviewed photos, ``calibration.source = "own_photos"``) or ``train`` on
   their labeled photos (calibrated on a held-out share of them); and
2. today's photos look like those: the share of rows the threshold auto-accepts is
   within ``DRIFT_TOLERANCE`` of the share it accepted on the calibration photos. That
   share moves with the confidence distribution, so photos of another kind (another
   studio, home photos, items outside the classes) show up in it without any label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# Largest difference in auto-accepted share (absolute) still taken as "photos like the
# calibration photos"; with a few hundred calibration photos, sampling alone moves it by
# a few points.
DRIFT_TOLERANCE = 0.15

NEXT_STEP = ("review a sample (catalog-tagger review TAGS --budget 200 --out review.xlsx), then learn from it "
             "(catalog-tagger learn review.xlsx --out MODEL) and tag with that model")


@dataclass(frozen=True)
class PrecisionCheck:
    verified: bool
    reason: str

    def metadata(self) -> dict[str, str]:
        return {"target_precision_verified": "true" if self.verified else "false",
                "target_precision_note": self.reason}


def calibrated_on_own_photos(card: dict[str, Any]) -> bool:
    calibration = card.get("calibration") or {}
    if calibration.get("source") == "own_photos":
        return True
    config = (card.get("training") or {}).get("config") or {}
    return bool(config.get("data") or config.get("manifest")) and "temperature" in calibration


def _coverage_at(card: dict[str, Any], threshold: float) -> float | None:
    """The auto-accepted share the card's review table gives for ``threshold``."""
    table = (card.get("calibration") or {}).get("review_table") or []
    rows = [row for row in table if abs(row[0] - threshold) <= 1e-9]
    return float(rows[0][2]) if rows else None


def check_target_precision(card: dict[str, Any], threshold: float, confidences: np.ndarray) -> PrecisionCheck:
    """``confidences``: the calibrated top-1 confidence of today's labeled rows."""
    if not calibrated_on_own_photos(card):
        return PrecisionCheck(False, "the review threshold comes from a calibration on Fashion-MNIST images, not on "
                                     "photos like yours, so the precision is not verified; " + NEXT_STEP)
    expected = _coverage_at(card, threshold)
    if expected is None or len(confidences) == 0:
        return PrecisionCheck(False, "nothing to compare today's photos with; precision not verified")
    accepted = float(np.mean(confidences >= threshold))
    if abs(accepted - expected) > DRIFT_TOLERANCE:
        return PrecisionCheck(False, f"today's photos do not look like the calibration photos ({accepted:.0%} "
                                     f"auto-accepted against {expected:.0%} on them), so the precision is not "
                                     "verified; " + NEXT_STEP)
    return PrecisionCheck(True, f"calibrated on your own photos; {accepted:.0%} auto-accepted today against "
                                f"{expected:.0%} on the calibration photos")
