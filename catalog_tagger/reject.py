"""The out-of-scope decision of a learned model, tuned on the retailer's reviewed photos.

A fine-tuned model's features and logits move, so the bundled detector's threshold (fitted
on Fashion-MNIST through the bundled network) means nothing for it. The reviewed photos are
the evidence instead: those labeled with a class are in scope, those marked ``other`` are
not. ``learn`` scores each with a model that never trained on it (its cross-validation
fold), and this module turns those out-of-fold scores into the card's ``out_of_scope`` entry.

The score is the energy of the logits (``out_of_scope.energy``): on the fine-tuned models it
separated real out-of-scope photos from in-scope ones better than the relative Mahalanobis
distance, refitted on either Fashion-MNIST or the reviewed photos (docs/out-of-scope.md), and it
needs no feature statistics. The ink, size and grain bounds describe the conversion of a photo,
not the network, and are kept from the starting model's detector.

The threshold: the lowest (so the most out-of-scope photos caught) at which at most
``max_in_scope_flagged`` of the reviewed in-scope photos are flagged, bounds included. With
fewer than ``min_other`` rows marked ``other`` there is no evidence that flagging pays on
this catalog, so only ``fallback_flag_share`` of them are flagged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .metrics import CONFIDENCE_LEVEL, clopper_pearson_lower, clopper_pearson_upper
from .out_of_scope import Detector, energy


@dataclass(frozen=True)
class ReviewedScores:
    """Out-of-fold logits and model inputs of the reviewed photos, split by what the person said."""

    in_scope_logits: np.ndarray
    in_scope_images: np.ndarray
    in_scope_random: np.ndarray  # bool: from review's random slice
    other_logits: np.ndarray
    other_images: np.ndarray
    other_random: np.ndarray


def _flagged_by_bounds(detector: Detector, logits: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Rows the ink, size or grain bounds flag, whatever the score."""
    if len(images) == 0:
        return np.zeros(0, bool)
    never = replace(detector, threshold=1e300)  # the score alone flags nothing
    return np.array([r is not None for r in never.reasons(np.zeros((len(images), 0)), logits, images)], bool)


def _threshold(scores: np.ndarray, allowed: int) -> float:
    """The threshold above which at most ``allowed`` of ``scores`` lie (ties stay below): an
    order statistic, not an interpolated quantile, so that the promised share is never exceeded
    on the photos it was fitted on. (The bounds spent the rest of the share already.)"""
    ranked = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    if len(ranked) == 0:
        return 0.0
    if allowed >= len(ranked):
        return float(ranked[-1]) - 1.0
    return float(ranked[max(0, allowed)])


def _rate(hits: np.ndarray, upper: bool) -> dict[str, Any]:
    n, k = int(len(hits)), int(np.sum(hits))
    bound = clopper_pearson_upper(k, n, CONFIDENCE_LEVEL) if upper else clopper_pearson_lower(k, n, CONFIDENCE_LEVEL)
    return {"n": n, "share": k / n if n else None, f"{'upper' if upper else 'lower'}_bound": bound}


def tune_detector(scores: ReviewedScores, start: Detector | None, max_in_scope_flagged: float, min_other: int,
                  fallback_flag_share: float) -> dict[str, Any]:
    """The card's ``out_of_scope`` entry for a learned model, with how it was chosen and what
    it did on the reviewed photos (out of fold): the share of in-scope ones flagged, with a
    one-sided upper bound, and of ``other`` ones caught, with a lower bound (Clopper-Pearson,
    ``CONFIDENCE_LEVEL``), on all of them and on the random slice alone (unbiased)."""
    if start is None:  # a starting model without a detector: no bounds to keep
        start = Detector("energy", 0.0, 0.0, 1.0, 0.0, min_grain=-1.0)
    draft = Detector("energy", 0.0, start.ink_low, start.ink_high, start.min_side, min_grain=start.min_grain)
    bound_in = _flagged_by_bounds(draft, scores.in_scope_logits, scores.in_scope_images)
    bound_out = _flagged_by_bounds(draft, scores.other_logits, scores.other_images)
    s_in, s_out = energy(scores.in_scope_logits), energy(scores.other_logits)
    n_other = len(s_out)
    enough = n_other >= min_other
    share = max_in_scope_flagged if enough else fallback_flag_share
    threshold = _threshold(s_in[~bound_in], int(np.floor(share * len(s_in) + 1e-9)) - int(bound_in.sum()))
    detector = replace(draft, threshold=threshold)
    flagged, caught = bound_in | (s_in > threshold), bound_out | (s_out > threshold)
    how = (f"lowest threshold flagging at most {share:.0%} of the {len(s_in)} reviewed in-scope photos"
           + ("" if enough else f" (fallback: {n_other} marked other, fewer than {min_other})"))
    measured = {"in_scope_flagged": _rate(flagged, upper=True), "other_caught": _rate(caught, upper=False),
                "random_slice": {"in_scope_flagged": _rate(flagged[scores.in_scope_random], upper=True),
                                 "other_caught": _rate(caught[scores.other_random], upper=False)}}
    fitted_on = (f"energy threshold from out-of-fold scores of {len(s_in)} reviewed in-scope photos and "
                 f"{n_other} marked other: flags {flagged.mean() if len(flagged) else 0:.1%} of the in-scope "
                 f"ones" + (f", catches {caught.mean():.1%} of the other ones" if n_other else "")
                 + "; ink, size and grain bounds of the starting model")
    return {**replace(detector, fitted_on=fitted_on).to_dict(), "flag_share": share,
            "chosen": {"source": "reviewed photos" if enough else "reviewed in-scope photos only (fallback)",
                       "rule": how, "max_in_scope_flagged": max_in_scope_flagged, "min_other": min_other,
                       "fallback_flag_share": fallback_flag_share, "in_scope": len(s_in), "other": n_other,
                       "confidence_level": CONFIDENCE_LEVEL, "out_of_fold": True, **measured}}
