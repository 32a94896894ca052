"""Classes of the retailer's own, learned from reviewed photos (``learn --new-classes``).

Nearly half of a real clothing catalog is none of the ten Fashion-MNIST classes: watches,
belts, wallets, caps. ``other`` keeps such photos out of the garment labels; a reviewer who
types a name of their own instead ("Watch") asks for a class. ``learn --new-classes`` appends
every such name with enough photos to the model's classes, behind the ones it had, so a
model's class indices and everything keyed on them (the "worn by a model" augmentation, the
detector's bounds) keep their meaning.

The head's new rows start imprinted (Qi et al., "Low-shot learning with imprinted weights",
2018): the mean penultimate feature of the class's reviewed photos, scaled to the norm of the
existing rows, so before a single step the new class already scores photos like its own
higher than the others; fine-tuning then moves every row together.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace

import numpy as np
import torch

from .checkpoint import LoadedModel
from .data.labeled import class_key
from .model import build_model


@dataclass(frozen=True)
class ClassPlan:
    """What the reviewed labels ask of the class list."""

    classes: tuple[str, ...]  # the model's classes, then the new ones in order of first appearance
    new: dict[str, int]  # new class -> reviewed photos
    too_few: dict[str, int]  # names with too few photos for a class yet: learned as `other`


def near_known(name: str, known: tuple[str, ...]) -> str | None:
    """The known class ``name`` is most likely a typo of ("Shrit" -> "Shirt"), if any: a
    slip of the keyboard must not become a class of its own."""
    keys = {class_key(c): c for c in known}
    close = difflib.get_close_matches(class_key(name), list(keys), n=1, cutoff=0.8)
    return keys[close[0]] if close else None


def plan_classes(known: tuple[str, ...], names: list[str], min_labels: int) -> ClassPlan:
    """The class list for reviewed labels ``names`` that are not among ``known`` (matched
    loosely, as ``class_key`` does; the first spelling seen names the class): a class for
    each name with at least ``min_labels`` photos."""
    counts: dict[str, int] = {}
    spelling: dict[str, str] = {}
    for name in names:
        key = class_key(name)
        spelling.setdefault(key, name.strip())
        counts[key] = counts.get(key, 0) + 1
    new = {spelling[k]: n for k, n in counts.items() if n >= min_labels}
    too_few = {spelling[k]: n for k, n in counts.items() if n < min_labels}
    return ClassPlan(tuple(known) + tuple(new), new, too_few)


def extend_model(init: LoadedModel, classes: tuple[str, ...], images: np.ndarray, labels: np.ndarray
                 ) -> LoadedModel:
    """``init`` with a head for ``classes`` (``init.classes`` first, unchanged): each new class's
    row imprinted from the mean feature of its photos among ``images``/``labels`` (uint8
    inputs, class indices into ``classes``)."""
    old = len(init.classes)
    if classes[:old] != init.classes:
        raise ValueError("new classes go after the model's own")
    if len(classes) == old:
        return init
    config = replace(init.config, classes=classes)
    model = build_model(config)
    state = {k: v for k, v in init.model.state_dict().items() if not k.startswith("head.")}
    model.load_state_dict(state, strict=False)
    source = init.model.eval()
    with torch.no_grad():
        weight, bias = source.head.weight, source.head.bias
        scale = weight.norm(dim=1).mean()
        rows = []
        for index in range(old, len(classes)):
            batch = torch.from_numpy(images[labels == index]).float() / 255.0
            mean = source.pooled_features(batch).mean(0)
            rows.append(mean / mean.norm().clamp_min(1e-12) * scale)
        model.head.weight.copy_(torch.cat([weight, torch.stack(rows)]))
        model.head.bias.copy_(torch.cat([bias, bias.mean().expand(len(rows))]))
    return replace(init, model=model.eval(), config=config)
