"""Training augmentations: the batched "worn by a model" drawing against the per-image loop it
replaced (kept below as the reference), and the resampling weights against torch's own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from catalog_tagger import augment
from catalog_tagger.augment import (
    DRESS,
    FLOOR,
    FOOTWEAR,
    TROUSER,
    UPPER_BODY,
    fit_to_canvas,
    lift_to_floor,
    resample_weights,
    shoes_from_above,
    shoes_in_pairs,
    train_augment,
    worn_by_a_model,
)


@pytest.mark.parametrize("n", [1, 2, 5, 28, 37, 75])
def test_resample_weights_are_torchs_antialiased_bilinear_weights(n):
    for m in range(1, 61):
        # F.interpolate applied to each basis image gives its weights column by column.
        basis = torch.eye(n).view(n, 1, 1, n)
        expected = F.interpolate(basis, size=(1, m), mode="bilinear", antialias=True, align_corners=False)
        got = resample_weights(torch.arange(m).view(1, m, 1), torch.tensor([[[m]]]), torch.arange(n).view(1, 1, n),
                               torch.tensor([[[n]]]))[0]
        torch.testing.assert_close(got, expected.view(n, m).T, atol=1e-5, rtol=0)


def test_fit_to_canvas_trims_scales_and_centres_each_canvas():
    canvas = torch.zeros(3, 76, 36)
    canvas[0, 10:50, 5:15] = 0.8  # tall: 40 rows -> 28, 10 cols -> 7
    canvas[1, 0:4, 0:36] = 0.5  # wide: 36 cols -> 28, 4 rows -> 3
    fitted = fit_to_canvas(canvas, 28)
    lit = fitted > 0.01
    assert lit[0].any(1).sum() == 28 and lit[0].any(0).sum() == 7
    assert lit[1].any(0).sum() == 28 and lit[1].any(1).sum() == 3
    assert torch.equal(fitted[2], torch.zeros(28, 28))  # nothing drawn: nothing made up
    torch.testing.assert_close(fitted[:2], torch.stack([reference_fit_to_canvas(c, 28) for c in canvas[:2]]),
                               atol=1e-5, rtol=0)


def _batch(seed: int, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    # Items shaped like Fashion-MNIST's: a lit, slightly textured block with dark margins.
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 3:25, 6:22] = 0.3 + 0.7 * torch.rand(n, 1, 22, 16, generator=g)
    return x, labels


@pytest.mark.parametrize("prob", [1.0, 0.3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_batched_figure_is_the_per_image_loops_figure(seed, prob):
    x, labels = _batch(seed)
    if seed == 2:  # no trousers in the batch: every figure gets bare legs
        labels[labels == TROUSER] = DRESS
    g_batched, g_loop = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    got = worn_by_a_model(x, labels, g_batched, prob)
    expected = reference_worn_by_a_model(x, labels, g_loop, prob)
    # The same random draws in the same order: what the training draws next is unchanged.
    assert torch.equal(g_batched.get_state(), g_loop.get_state())
    per_image = (got - expected).abs().amax((1, 2, 3))
    # Float rounding of the resampling can move a pixel across the trim threshold (about 1
    # image in 500 on Fashion-MNIST); everything else agrees to rounding.
    assert (per_image > 1e-4).sum() <= 1
    assert torch.isin(labels[per_image > 0], torch.tensor(UPPER_BODY)).all()
    assert float(got.min()) >= 0 and float(got.max()) <= 1


def test_only_upper_body_garments_are_worn_and_they_shrink():
    x, labels = _batch(5)
    out = worn_by_a_model(x, labels, torch.Generator().manual_seed(0), 1.0)
    upper = torch.isin(labels, torch.tensor(UPPER_BODY))
    assert torch.equal(out[~upper], x[~upper])
    # A person around the garment: the garment no longer fills the frame's width.
    assert ((out[upper] > 0.05).any(2).sum(-1) < (x[upper] > 0.05).any(2).sum(-1)).float().mean() > 0.9


def test_headless_figures_draw_the_same_random_numbers_and_lose_only_the_head():
    x, labels = _batch(7)
    g_head, g_none = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    with_head = worn_by_a_model(x, labels, g_head, 1.0, headless_prob=0.0)
    headless = worn_by_a_model(x, labels, g_none, 1.0, headless_prob=1.0)
    assert torch.equal(g_head.get_state(), g_none.get_state())
    upper = torch.isin(labels, torch.tensor(UPPER_BODY))
    assert torch.equal(with_head[~upper], headless[~upper])
    # Without a head above it, the garment fills more of the fitted frame.
    lit_with, lit_without = (with_head[upper] > 0.05).flatten(1).sum(1), (headless[upper] > 0.05).flatten(1).sum(1)
    assert (lit_without > lit_with).float().mean() > 0.8


def test_lift_to_floor_lifts_the_inside_of_items_and_keeps_their_edges():
    x = torch.zeros(2, 1, 28, 28)
    x[:, :, 5:20, 5:20] = 0.1  # a dark item
    x[:, :, 10, 10] = 0.9
    out = lift_to_floor(x, torch.Generator().manual_seed(0), 1.0)
    assert float(out[:, :, 6:19, 6:19].min()) == pytest.approx(FLOOR)  # the inside is lifted
    assert float(out[0, 0, 10, 10]) == pytest.approx(0.9)  # what is brighter stays
    assert torch.equal(out[:, :, 5, 5:20], x[:, :, 5, 5:20])  # the edge keeps its value
    assert float(out[:, :, :5].abs().max()) == 0  # the background stays black


def test_shoes_in_pairs_shows_two_shoes_side_by_side():
    x, labels = _batch(3)
    out = shoes_in_pairs(x, labels, torch.Generator().manual_seed(0), 1.0)
    shoes = torch.isin(labels, torch.tensor(FOOTWEAR))
    assert torch.equal(out[~shoes], x[~shoes])
    lit = out[shoes, 0] > 0.05

    def extent(lit_lines: torch.Tensor) -> torch.Tensor:
        first = lit_lines.int().argmax(1)
        return 28 - lit_lines.flip(1).int().argmax(1) - first

    height, width = extent(lit.any(2)), extent(lit.any(1))
    assert (width == 28).all() and (height < 24).all()  # the pair is much wider than tall


def _side_views(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shoes as Fashion-MNIST draws them, toe left: a long low sole and a thin strap up to the
    heel, most of their box empty (a sandal)."""
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 20:23, 1:27] = 0.5 + 0.5 * torch.rand(n, 1, 3, 26, generator=g)  # the sole
    x[:, :, 10:20, 22:24] = 0.8  # the heel strap
    x[:, :, 14:16, 4:24] = 0.6  # a strap over the foot
    return x, torch.tensor(FOOTWEAR).repeat(n // len(FOOTWEAR) + 1)[:n]


def test_shoes_from_above_stand_toes_up_on_a_footbed():
    x, labels = _side_views(60)
    labels[::5] = 0  # a T-shirt/top now and then: left as it is
    out = shoes_from_above(x, labels, torch.Generator().manual_seed(0), 1.0)
    shoes = torch.isin(labels, torch.tensor(FOOTWEAR))
    assert torch.equal(out[~shoes], x[~shoes])
    assert out.min() >= 0 and out.max() <= 1
    lit = out[shoes, 0] > 0.05
    rows, cols = lit.any(2).sum(1), lit.any(1).sum(1)
    # The side view is twice as wide as tall; from above a single sole stands upright (a
    # quarter of them), and a pair side by side, seen from standing height, is at most about
    # twice as wide as long.
    side = x[shoes, 0] > 0.05
    assert (side.any(1).sum(1) >= 2 * side.any(2).sum(1)).all()
    assert (cols <= 2.1 * rows).all() and (rows > 1.2 * cols).float().mean() >= 0.15
    # The straps' gaps are filled by the footbed: the soles cover most of their outline.
    assert lit.float().sum((1, 2)).div(rows * cols).min() > 0.5
    assert (x[shoes, 0] > 0.05).float().mean() < 0.3


def test_shoes_from_above_are_foreshortened_as_a_standing_camera_sees_them(monkeypatch):
    """The same shoes under the same draws, seen from straight above and at the steepest
    tilt: the length shrinks to the tilt's share, the width stays."""
    x, labels = _side_views(40)

    def tall_by_wide(seen: float) -> torch.Tensor:
        monkeypatch.setattr(augment, "FORESHORTENING", (seen, seen))
        lit = shoes_from_above(x, labels, torch.Generator().manual_seed(1), 1.0)[:, 0] > 0.05
        return lit.any(2).sum(1).float() / lit.any(1).sum(1).float()

    assert 0.5 < (tall_by_wide(0.6) / tall_by_wide(1.0)).median() < 0.75


@pytest.mark.parametrize("option", ["headless_prob", "pair_prob", "floor_prob", "above_prob"])
def test_an_augmentation_left_at_zero_draws_nothing(option):
    """Adding an augmentation option leaves every other random stream (and so a run trained
    without it, and its --resume) as it was."""
    x, labels = _batch(4)
    streams = []
    for value in (0.0, 0.5):
        g = torch.Generator().manual_seed(0)
        train_augment(x, labels, g, worn_prob=0.3, **{option: value})
        streams.append(g.get_state())
    if option == "headless_prob":  # decided by a draw the figure took already
        assert torch.equal(*streams)
    else:
        assert not torch.equal(*streams)
        g = torch.Generator().manual_seed(0)
        train_augment(x, labels, g, worn_prob=0.3)
        assert torch.equal(g.get_state(), streams[0])


# The per-image implementation the batched one replaced (catalog_tagger/augment.py before
# 2026-11-30), kept as the reference the tests above compare against.

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


def reference_fit_to_canvas(canvas: torch.Tensor, size: int) -> torch.Tensor:
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


def reference_worn_by_a_model(x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                              prob: float) -> torch.Tensor:
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
        worn[k] = reference_fit_to_canvas(canvas, size)
    out = x.clone()
    out[pick.to(x.device), 0] = worn.to(x.device, x.dtype)
    return out
