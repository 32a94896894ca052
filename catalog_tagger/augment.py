"""Batch-level augmentations: pure functions from a float batch (N, C, H, W) to another.

Working on whole batches held in memory (as airbench does) costs a few tensor ops per
batch instead of a Python call per image, which matters on a 2-core CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror half the batch left-right: garments are (nearly) symmetric, and catalog
    shoes face either way while Fashion-MNIST's mostly face left."""
    flip = torch.rand(x.shape[0], generator=generator, device="cpu").to(x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def random_translate(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``pad`` pixels, filling with background (zero).

    Real catalog crops are rarely centred to the pixel the way Fashion-MNIST's are.
    """
    if pad <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    # Gather with per-image offsets via index arithmetic: one op for the whole batch.
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).to(x.device)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).to(x.device)
    idx_n = torch.arange(n, device=x.device).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[idx_n, rows.view(n, h, 1), cols.view(n, 1, w)]
    return out.permute(0, 3, 1, 2).contiguous()


def train_augment(x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, pad: int = 2,
                  worn_prob: float = 0.0) -> torch.Tensor:
    """The augmentation applied to every training batch."""
    x = worn_by_a_model(x, labels, generator, worn_prob)
    return random_translate(random_flip(x, generator), pad, generator)


# Fashion-MNIST class ids, for the catalog-photo simulation below.
UPPER_BODY = (0, 2, 3, 4, 6)  # T-shirt/top, Pullover, Dress, Coat, Shirt
TROUSER = 1
DRESS = 3


def _paste(canvas: torch.Tensor, item: torch.Tensor, top: int, left: int) -> None:
    """Max-composite ``item`` (h, w) into ``canvas`` at (top, left), clipped to the canvas."""
    h, w = item.shape
    ch, cw = canvas.shape
    t0, l0 = max(0, top), max(0, left)
    t1, l1 = min(ch, top + h), min(cw, left + w)
    if t1 > t0 and l1 > l0:
        region = canvas[t0:t1, l0:l1]
        torch.maximum(region, item[t0 - top : t1 - top, l0 - left : l1 - left], out=region)


def _resize(item: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return F.interpolate(item[None, None], size=(max(1, h), max(1, w)), mode="bilinear",
                         antialias=True, align_corners=False)[0, 0]


def _ellipse(h: int, w: int, value: float) -> torch.Tensor:
    ys = (torch.arange(h) + 0.5) / h * 2 - 1
    xs = (torch.arange(w) + 0.5) / w * 2 - 1
    return ((ys[:, None] ** 2 + xs[None, :] ** 2) <= 1).float() * value


def fit_to_canvas(canvas: torch.Tensor, size: int) -> torch.Tensor:
    """The Fashion-MNIST conversion on a tensor: trim to content, longest edge to ``size``, centre."""
    rows = torch.nonzero(canvas.amax(1) > 0.02)
    cols = torch.nonzero(canvas.amax(0) > 0.02)
    if len(rows) == 0:
        return torch.zeros(size, size)
    crop = canvas[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = crop.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    out = torch.zeros(size, size)
    out[(size - nh + 1) // 2 : (size - nh + 1) // 2 + nh, (size - nw + 1) // 2 : (size - nw + 1) // 2 + nw] = \
        _resize(crop, nh, nw).clamp(0, 1)
    return out


def worn_by_a_model(x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, prob: float) -> torch.Tensor:
    """Put some upper-body garments on a simulated model, as catalog photos show them.

    Real catalog shots of tops and dresses show a person: a head above the garment, arms,
    and legs (in trousers, or bare under a dress) below it. After the Fashion-MNIST
    conversion the garment fills only the middle of the frame. Fashion-MNIST's own items
    are cut out, so without this the network never sees that. The legs are real trouser
    items from the same batch; head and arms are plain shapes of skin-like grey.
    """
    if prob <= 0:
        return x
    n, _, size, _ = x.shape
    # The composites are drawn on the CPU: one copy there and one back per batch, so a
    # GPU run does not stall on a transfer per image.
    labels_cpu = labels.cpu()
    trousers = torch.nonzero(labels_cpu == TROUSER).flatten()
    upper = torch.isin(labels_cpu, torch.tensor(UPPER_BODY))
    pick = torch.nonzero(upper & (torch.rand(n, generator=generator) < prob)).flatten()
    if len(pick) == 0:
        return x
    x_cpu = x.cpu()
    worn = torch.empty(len(pick), size, size)
    r = torch.rand(len(pick), 8, generator=generator).tolist()
    for k, i in enumerate(pick.tolist()):
        u = r[k]
        garment = x_cpu[i, 0]
        gw = int(16 + 8 * u[0])  # garment width on a 28-wide body scale
        gh = int(gw * (0.9 + 0.3 * u[1]))
        head_h = int(gw * (0.35 + 0.15 * u[2]))
        legs_h = int(gh * (0.4 + 1.0 * u[3]))  # from a waist crop down to full-length legs
        width = 36
        canvas = torch.zeros(head_h + gh + legs_h, width)
        left = (width - gw) // 2
        skin = 0.25 + 0.45 * u[4]
        head_w = max(3, int(head_h * 0.75))
        _paste(canvas, _ellipse(head_h, head_w, skin), 0, (width - head_w) // 2)
        if u[5] < 0.6:  # arms hanging beside the body, touching it
            arm = torch.full((int(gh * 0.8), max(1, gw // 8)), skin)
            _paste(canvas, arm, head_h + gh // 6, left - arm.shape[1] + 1)
            _paste(canvas, arm, head_h + gh // 6, left + gw - 1)
        if labels_cpu[i] == DRESS or len(trousers) == 0:
            leg = torch.full((legs_h, max(1, gw // 7)), skin)
            _paste(canvas, leg, head_h + gh - 1, left + gw // 2 - gw // 5)
            _paste(canvas, leg, head_h + gh - 1, left + gw // 2 + gw // 10)
        else:
            t = x_cpu[trousers[int(u[6] * len(trousers))], 0]
            _paste(canvas, _resize(t, legs_h + gh // 3, int(gw * 0.8)), head_h + gh * 2 // 3, left + gw // 10)
        # The garment is drawn last: it covers the top of the legs and its own neckline.
        g = _resize(garment, gh, gw)
        region = canvas[head_h : head_h + gh, left : left + gw]
        canvas[head_h : head_h + gh, left : left + gw] = torch.where(g > 0.05, g, region)
        worn[k] = fit_to_canvas(canvas, size)
    out = x.clone()
    out[pick.to(x.device), 0] = worn.to(x.device, x.dtype)
    return out
