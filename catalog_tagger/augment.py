"""Batch-level augmentations: pure functions from a float batch (N, C, H, W) to another.

Working on whole batches held in memory (as airbench does) costs a few tensor ops per
batch instead of a Python call per image, which matters on a 2-core CPU.
"""

from __future__ import annotations

from typing import TypedDict

import torch
import torch.nn.functional as F


class AugmentOptions(TypedDict):
    """How often each simulation of real photos is applied (see ``train_augment``)."""

    worn_prob: float
    headless_prob: float
    pair_prob: float
    floor_prob: float
    above_prob: float


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


def train_augment(x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, *, pad: int = 2,
                  worn_prob: float = 0.0, headless_prob: float = 0.0, pair_prob: float = 0.0,
                  floor_prob: float = 0.0, above_prob: float = 0.0) -> torch.Tensor:
    """The augmentation applied to every training batch. ``labels`` are best on the CPU
    (the drawing decisions are taken there). A probability of 0 draws nothing from
    ``generator``, so adding an augmentation leaves the others' random streams as they were."""
    x = worn_by_a_model(x, labels, generator, worn_prob, headless_prob)
    x = shoes_in_pairs(x, labels, generator, pair_prob)
    x = shoes_from_above(x, labels, generator, above_prob)
    x = lift_to_floor(x, generator, floor_prob)
    return random_translate(random_flip(x, generator), pad, generator)


# The level the conversion of a real photo lifts every item pixel to (preprocess.FLOOR, of 255).
FLOOR = 40 / 255
# Fashion-MNIST's background is 0; its items' pixels are lit at least this much.
ITEM_LEVEL = 0.02


def lift_to_floor(x: torch.Tensor, generator: torch.Generator, prob: float) -> torch.Tensor:
    """Lift the inside of some items to the floor the real-photo conversion gives every item
    pixel (``preprocess`` item-floor): a white shirt on white is a faint shape there, and
    dark patterns of Fashion-MNIST items never look this way on a real photo. The item's
    edge (pixels with background around them) keeps its soft ramp."""
    if prob <= 0:
        return x
    chosen = (torch.rand(x.shape[0], generator=generator) < prob).to(x.device).view(-1, 1, 1, 1)
    item = (x > ITEM_LEVEL).float()
    inside = -F.max_pool2d(-item, 3, stride=1, padding=1) > 0  # eroded: every neighbour is item too
    return torch.where(chosen & inside, x.clamp(min=FLOOR), x)


# Fashion-MNIST class ids, for the catalog-photo simulation below.
UPPER_BODY = (0, 2, 3, 4, 6)  # T-shirt/top, Pullover, Dress, Coat, Shirt
TROUSER = 1
DRESS = 3
FOOTWEAR = (5, 7, 9)  # Sandal, Sneaker, Ankle boot


# The simulated model is drawn on a canvas this wide (in pixels of a 28-wide body scale) and
# at most this tall: head (<= 11) + garment (<= 27) + legs (<= 37), see ``_figure``.
CANVAS_WIDTH = 36
CANVAS_HEIGHT = 76
# A canvas pixel counts as part of the figure (for the trim to content) above this level.
CONTENT_LEVEL = 0.02
# A garment pixel covers what is drawn beneath it above this level.
GARMENT_LEVEL = 0.05


def resample_weights(out_pos: torch.Tensor, out_size: torch.Tensor, in_pos: torch.Tensor,
                     in_size: torch.Tensor) -> torch.Tensor:
    """Weights of antialiased bilinear resizing, as a matrix per item: how much input pixel
    ``in_pos`` contributes to output pixel ``out_pos`` when an edge of ``in_size`` pixels is
    resized to ``out_size``. Positions outside ``[0, size)`` get weight 0, which is how a
    resized patch is placed into (and clipped by) a larger frame in the same product.

    The weights are ``F.interpolate(mode="bilinear", antialias=True)``'s (a triangle filter
    widened by the downscaling factor, normalised per output pixel), so one batched matrix
    product resizes images of different sizes to different sizes, which ``F.interpolate``
    cannot do in one call. Shapes broadcast: (K, R, 1) outputs by (K, 1, C) inputs -> (K, R, C).
    """
    out_size, in_size = out_size.float(), in_size.float()
    scale = in_size / out_size
    support = torch.where(scale >= 1, scale, torch.ones_like(scale))
    center = scale * (out_pos.float() + 0.5)
    weights = (1 - ((in_pos.float() + 0.5 - center) / support).abs()).clamp(min=0)
    weights = weights * ((in_pos >= 0) & (in_pos < in_size)) * ((out_pos >= 0) & (out_pos < out_size))
    total = weights.sum(-1, keepdim=True)
    return weights / torch.where(total > 0, total, torch.ones_like(total))


def _resize_into(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: torch.Tensor,
                 width: torch.Tensor, frame: tuple[int, int],
                 src_top: torch.Tensor | int = 0, src_left: torch.Tensor | int = 0,
                 src_height: torch.Tensor | int | None = None, src_width: torch.Tensor | int | None = None
                 ) -> torch.Tensor:
    """Each image (K, h, w), or its window ``[src_top, +src_height) x [src_left, +src_width)``,
    resized to ``height x width`` and placed at ``(top, left)`` of an empty ``frame``
    (K, *frame); what falls outside the frame is cut off. All sizes and places are (K,) tensors."""
    k, h, w = images.shape
    device = images.device

    def column(v: torch.Tensor | int | None, default: int) -> torch.Tensor:
        v = default if v is None else v
        return (v if isinstance(v, torch.Tensor) else torch.full((k,), v)).to(device).view(k, 1, 1)

    out_r = torch.arange(frame[0], device=device).view(1, -1, 1) - top.view(k, 1, 1)
    out_c = torch.arange(frame[1], device=device).view(1, -1, 1) - left.view(k, 1, 1)
    in_r = torch.arange(h, device=device).view(1, 1, -1) - column(src_top, 0)
    in_c = torch.arange(w, device=device).view(1, 1, -1) - column(src_left, 0)
    vertical = resample_weights(out_r, height.view(k, 1, 1), in_r, column(src_height, h))
    horizontal = resample_weights(out_c, width.view(k, 1, 1), in_c, column(src_width, w))
    return vertical @ images.float() @ horizontal.transpose(1, 2)


def _box(rows: torch.Tensor, cols: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: torch.Tensor,
         width: torch.Tensor) -> torch.Tensor:
    """(K, R, C) masks of the rectangles ``[top, +height) x [left, +width)``, one per item."""
    def inside(pos: torch.Tensor, start: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        start, size = start.view(-1, 1, 1), size.view(-1, 1, 1)
        return (pos >= start) & (pos < start + size)
    return inside(rows, top, height) & inside(cols, left, width)


def fit_to_canvas(canvas: torch.Tensor, size: int) -> torch.Tensor:
    """The Fashion-MNIST conversion on tensors (K, H, W) -> (K, size, size): trim each to its
    content, longest edge to ``size``, centre. An empty canvas gives an empty image."""
    k, height, width = canvas.shape
    device = canvas.device
    lit_rows = canvas.amax(2) > CONTENT_LEVEL
    lit_cols = canvas.amax(1) > CONTENT_LEVEL

    def extent(lit: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = lit.int().argmax(1)
        last = n - 1 - lit.flip(1).int().argmax(1)
        return first, last - first + 1

    top, h = extent(lit_rows, height)
    left, w = extent(lit_cols, width)
    scale = size / torch.maximum(h, w).double()
    # Python's round() (half to even), which torch.round also does.
    nh = torch.round(h * scale).long().clamp(min=1)
    nw = torch.round(w * scale).long().clamp(min=1)
    out = _resize_into(canvas, (size - nh + 1) // 2, (size - nw + 1) // 2, nh, nw, (size, size),
                       src_top=top, src_left=left, src_height=h, src_width=w)
    return out.clamp(0, 1) * lit_rows.any(1).view(k, 1, 1).to(device)


def _figure(u: torch.Tensor, is_dress: torch.Tensor, have_trousers: bool, headless_prob: float
            ) -> dict[str, torch.Tensor]:
    """The simulated person's proportions from 8 uniform draws per item (K, 8), float64 so
    that the integer sizes come out as Python's arithmetic on the same draws gives them."""
    gw = (16 + 8 * u[:, 0]).long()  # garment width on a 28-wide body scale
    gh = (gw * (0.9 + 0.3 * u[:, 1])).long()
    head_h = (gw * (0.35 + 0.15 * u[:, 2])).long()
    legs_h = (gh * (0.4 + 1.0 * u[:, 3])).long()  # from a waist crop down to full-length legs
    head_w = (head_h * 0.75).long().clamp(min=3)
    return {
        "gw": gw, "gh": gh, "head_h": head_h, "legs_h": legs_h, "head_w": head_w,
        "left": (CANVAS_WIDTH - gw) // 2,
        "skin": (0.25 + 0.45 * u[:, 4]).float(),
        "arms": u[:, 5] < 0.6,  # arms hanging beside the body, touching it
        "head": u[:, 7] >= headless_prob,
        "bare_legs": is_dress | (not have_trousers),
    }


def worn_by_a_model(x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, prob: float,
                    headless_prob: float = 0.0) -> torch.Tensor:
    """Put some upper-body garments on a simulated model, as catalog photos show them.

    Real catalog shots of tops and dresses show a person: a head above the garment, arms,
    and legs (in trousers, or bare under a dress) below it. After the Fashion-MNIST
    conversion the garment fills only the middle of the frame. Fashion-MNIST's own items
    are cut out, so without this the network never sees that. The legs are real trouser
    items from the same batch; head and arms are plain shapes of skin-like grey.
    ``headless_prob`` of the figures have no head, as the conversion leaves a worn photo
    once it has cut the head off (preprocess head crop).

    Every figure of the batch is drawn at once, with masks and batched matrix products on
    ``x``'s device: a loop over images cost 16 ms per batch of 256 on a CPU core, which
    was the whole of a GPU training step.
    """
    if prob <= 0:
        return x
    n, _, size, _ = x.shape
    device = x.device
    labels_cpu = labels.cpu()
    trousers = torch.nonzero(labels_cpu == TROUSER).flatten()
    upper = torch.isin(labels_cpu, torch.tensor(UPPER_BODY))
    pick = torch.nonzero(upper & (torch.rand(n, generator=generator) < prob)).flatten()
    if len(pick) == 0:
        return x
    u = torch.rand(len(pick), 8, generator=generator).double()
    f = {k: v.to(device) for k, v in _figure(u, labels_cpu[pick] == DRESS, len(trousers) > 0,
                                                    headless_prob).items()}
    gw, gh, head_h, legs_h, left, skin = f["gw"], f["gh"], f["head_h"], f["legs_h"], f["left"], f["skin"]
    k = len(pick)
    rows = torch.arange(CANVAS_HEIGHT, device=device).view(1, -1, 1)
    cols = torch.arange(CANVAS_WIDTH, device=device).view(1, 1, -1)
    skin = skin.view(k, 1, 1)

    # The head: an ellipse filling its head_h x head_w box, centred above the garment.
    head_w = f["head_w"].view(k, 1, 1)
    head_left = (CANVAS_WIDTH - head_w) // 2
    hh = head_h.view(k, 1, 1)
    ys = (rows.float() + 0.5) / hh.float() * 2 - 1
    xs = ((cols - head_left).float() + 0.5) / head_w.float() * 2 - 1
    head = (rows < hh) & (cols >= head_left) & (cols < head_left + head_w) & (ys**2 + xs**2 <= 1)
    shapes = head & f["head"].view(k, 1, 1)
    # Arms beside the body, touching it.
    arm_h, arm_w, arm_top = (gh * 0.8).long(), (gw // 8).clamp(min=1), head_h + gh // 6
    arms = _box(rows, cols, arm_top, left - arm_w + 1, arm_h, arm_w) | _box(rows, cols, arm_top, left + gw - 1,
                                                                             arm_h, arm_w)
    shapes = shapes | (arms & f["arms"].view(k, 1, 1))
    # Bare legs under a dress (or when the batch has no trousers to borrow).
    leg_w, leg_top, mid = (gw // 7).clamp(min=1), head_h + gh - 1, left + gw // 2
    legs = _box(rows, cols, leg_top, mid - gw // 5, legs_h, leg_w) | _box(rows, cols, leg_top, mid + gw // 10,
                                                                           legs_h, leg_w)
    shapes = shapes | (legs & f["bare_legs"].view(k, 1, 1))
    canvas = shapes.float() * skin
    frame = (CANVAS_HEIGHT, CANVAS_WIDTH)
    if len(trousers):
        # Otherwise: a real trouser item of the batch, resized to the legs and drawn over the hips.
        which = trousers[(u[:, 6] * len(trousers)).long()].to(device)
        worn_trousers = _resize_into(x[which, 0], head_h + gh * 2 // 3, left + gw // 10,
                                     legs_h + gh // 3, (gw * 0.8).long(), frame)
        canvas = torch.maximum(canvas, worn_trousers * ~f["bare_legs"].view(k, 1, 1))
    # The garment is drawn last: it covers the top of the legs and its own neckline.
    garment = _resize_into(x[pick.to(device), 0], head_h, left, gh, gw, frame)
    covers = _box(rows, cols, head_h, left, gh, gw) & (garment > GARMENT_LEVEL)
    canvas = torch.where(covers, garment, canvas)
    out = x.clone()
    out[pick.to(device), 0] = fit_to_canvas(canvas, size).to(x.dtype)
    return out


def _some_shoes(labels: torch.Tensor, generator: torch.Generator, prob: float) -> torch.Tensor:
    """Indices of the footwear items drawn with probability ``prob`` (none and no draw at 0)."""
    if prob <= 0:
        return torch.empty(0, dtype=torch.long)
    chosen = torch.rand(len(labels), generator=generator) < prob
    return torch.nonzero(torch.isin(labels.cpu(), torch.tensor(FOOTWEAR)) & chosen).flatten()


def shoes_in_pairs(x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, prob: float) -> torch.Tensor:
    """Show some shoes as a pair, side by side, as product photos often do: the item and a
    copy (mirrored or not, a little lower or higher) overlapping by up to half a shoe, the
    whole fitted back into the frame. Fashion-MNIST has one shoe per image."""
    size = x.shape[-1]
    pick = _some_shoes(labels, generator, prob)
    if len(pick) == 0:
        return x
    u = torch.rand(len(pick), 3, generator=generator)
    device = x.device
    k = len(pick)
    shoe = x[pick.to(device), 0]
    mirrored = torch.where((u[:, 0] < 0.5).to(device).view(k, 1, 1), shoe.flip(-1), shoe)
    shift = (size // 2 + u[:, 1] * size // 2).long().to(device)  # the second shoe's left edge
    drop = ((u[:, 2] - 0.5) * size / 4).long().to(device)  # and how much lower it stands
    frame = (size + size // 4, 2 * size)
    same = torch.full((k,), size, device=device)
    top = torch.full((k,), size // 8, device=device)
    first = _resize_into(shoe, top, torch.zeros_like(same), same, same, frame)
    second = _resize_into(mirrored, top + drop, shift, same, same, frame)
    out = x.clone()
    out[pick.to(device), 0] = fit_to_canvas(torch.maximum(first, second), size).to(x.dtype)
    return out


# A shoe seen from above, as home photos show footwear (a pair on the floor, toes up): its
# outline along the length t (0 = toe, 1 = heel), as a share of the widest point, the ball.
BALL = 0.3  # where along the length the sole is widest
WAIST = 0.7  # the arch is this much of the ball's width
HEEL_ROUND = 0.15  # the last share of the length closes the heel in a half-ellipse
# How the pair lies and how the camera sees it. The ball's half-width, as a share of the
# sole's length: a shoe drawn 1.8-2.5 times as long as wide, wider than a bare sole, as the
# upper looks from standing height (a pair side by side about as wide as a shoe is long).
HALF_WIDTH = (0.20, 0.28)
# The gap between the two shoes of a pair, as a share of the length: people set a pair down
# side by side, touching or a little apart.
PAIR_GAP = (-0.04, 0.06)
# A camera held at standing height looks down on the floor at up to about 50 degrees from
# the vertical: the length shrinks to this share (cos 50 = 0.64), the width does not.
FORESHORTENING = (0.6, 1.0)


def _sole_outline(t: torch.Tensor) -> torch.Tensor:
    """Half-width of a sole along its length ``t`` in [0, 1], 1 at the ball."""
    toe = (1 - ((BALL - t) / BALL).clamp(min=0) ** 2).clamp(min=0).sqrt()
    arch = WAIST + (1 - WAIST) * (0.5 + 0.5 * torch.cos(torch.pi * ((t - BALL) / (1 - BALL)).clamp(0, 1) * 2))
    body = torch.where(t < BALL, toe, arch)
    heel = (1 - ((t - (1 - HEEL_ROUND)) / HEEL_ROUND).clamp(min=0) ** 2).clamp(min=0).sqrt()
    return body * heel * ((t >= 0) & (t <= 1))


def shoes_from_above(x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, prob: float
                     ) -> torch.Tensor:
    """Show some shoes as seen from above, toes up, mostly in pairs, as people photograph
    footwear at home: Fashion-MNIST has side views only, and after the conversion a pair from
    above reads as a Bag or a Trouser. The side view's columns become the sole's length and
    each column's height its width, the top of the shoe (laces, straps, the collar) along the
    middle and the sole at the edges, as one sees them from above, standing: the length
    foreshortened, the two shoes of a pair close together."""
    size = x.shape[-1]
    pick = _some_shoes(labels, generator, prob)
    if len(pick) == 0:
        return x
    k = len(pick)
    u = torch.rand(k, 6, generator=generator)
    device = x.device
    shoe = x[pick.to(device), 0].float()
    lit = shoe > ITEM_LEVEL
    cols_lit = lit.any(1)
    rows_idx = torch.arange(size, device=device).view(1, size, 1)
    top = torch.where(lit, rows_idx, size).amin(1).float()  # (k, size) per column
    bottom = torch.where(lit, rows_idx, -1).amax(1).float()
    col_idx = torch.arange(size, device=device).view(1, size)
    first = torch.where(cols_lit, col_idx, size).amin(1).float()
    last = torch.where(cols_lit, col_idx, -1).amax(1).float()
    # Which end is the toe: Fashion-MNIST shoes mostly face left, the heel (the higher end) right.
    left_high = top[:, :size // 2].masked_fill(~cols_lit[:, :size // 2], size).amin(1)
    right_high = top[:, size // 2:].masked_fill(~cols_lit[:, size // 2:], size).amin(1)
    toe_right = left_high < right_high

    # The footbed's tone: the side view's sole, the lowest lit row of each column, on average.
    sole = shoe.gather(1, bottom.clamp(min=0).long().unsqueeze(1))[:, 0]
    footbed = 0.8 * (sole * cols_lit).sum(1) / cols_lit.sum(1).clamp(min=1)

    length, width = 2 * size, 3 * size  # the canvas: one sole's length tall, a wide pair across

    def draw(column: int, bounds: tuple[float, float]) -> torch.Tensor:
        low, high = bounds
        return (low + (high - low) * u[:, column]).to(device).view(k, 1, 1)

    half = draw(0, HALF_WIDTH) * length  # the ball's half-width, pixels
    gap = draw(1, PAIR_GAP) * length
    seen = draw(5, FORESHORTENING) * length  # the sole's length as the camera sees it
    single = (u[:, 2] < 0.25).to(device).view(k, 1, 1)
    drop = ((u[:, 3] - 0.5) * 0.2 * length).to(device).view(k, 1, 1)  # the second shoe a little ahead
    r = torch.arange(length, device=device).view(1, length, 1).float() + 0.5
    c = torch.arange(width, device=device).view(1, 1, width).float() + 0.5
    # Toes turned out or in a little, the two feet alike (mirrored).
    angle = ((u[:, 4] - 0.5) * 0.6).to(device).view(k, 1, 1)
    centre = torch.where(single, torch.full_like(gap, width / 2), width / 2 - gap / 2 - half)
    feet = []
    for offset, centre_c, turn in ((torch.zeros_like(drop), centre, angle), (drop, width - centre, -angle)):
        # Rotate the canvas about the sole's middle, then read the sole in its own frame.
        dr, dc = r - offset - length / 2, c - centre_c
        rr = dr * torch.cos(turn) - dc * torch.sin(turn) + length / 2
        cc = dr * torch.sin(turn) + dc * torch.cos(turn)
        t = (rr - length / 2) / seen + 0.5
        reach = half * _sole_outline(t)
        s = cc / reach.clamp(min=1e-6)
        inside = (s.abs() <= 1) & (reach > 0)
        # Where in the side view each pixel of the sole comes from.
        along = torch.where(toe_right.view(k, 1, 1), 1 - t, t).clamp(0, 1)
        src_c = first.view(k, 1, 1) + along * (last - first).view(k, 1, 1)
        col = src_c.round().long().clamp(0, size - 1).expand(k, length, width)
        col_top = top.gather(1, col.reshape(k, -1)).view(k, length, width)
        col_bottom = bottom.gather(1, col.reshape(k, -1)).view(k, length, width)
        src_r = col_top + s.abs().clamp(max=1) * (col_bottom - col_top).clamp(min=0)
        grid = torch.stack([(src_c.expand(k, length, width) + 0.5) / size * 2 - 1,
                            (src_r + 0.5) / size * 2 - 1], dim=-1)
        sampled = F.grid_sample(shoe.unsqueeze(1), grid, mode="bilinear", padding_mode="border",
                                align_corners=False)[:, 0]
        # Seen from above, the footbed shows between a sandal's straps.
        feet.append(torch.maximum(sampled, footbed.view(k, 1, 1)) * inside * (col_bottom >= col_top))
    canvas = torch.where(single, feet[0], torch.maximum(feet[0], feet[1]))
    out = x.clone()
    out[pick.to(device), 0] = fit_to_canvas(canvas, size).to(x.dtype)
    return out
