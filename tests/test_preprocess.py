"""The one preprocessing function, on real files in every storage variant."""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from catalog_tagger import preprocess
from catalog_tagger.decode import decode_file
from catalog_tagger.model import ModelConfig
from catalog_tagger.preprocess import image_to_tensor, to_8bit, to_model_array
from catalog_tagger.synth import render_catalog_photo

CONFIG = ModelConfig()
BIG = 10**9


def _item() -> np.ndarray:
    """A light 'garment' on black, filling the height as Fashion-MNIST items do: a
    T-shape, asymmetric so that rotations and flips are detectable."""
    item = np.zeros((28, 28), np.uint8)
    item[0:6, 2:26] = 200  # sleeves across the top
    item[6:28, 9:19] = 230  # body
    item[20:26, 19:22] = 120  # a pocket on one side only
    return item


def _similar(a: np.ndarray, b: np.ndarray, tolerance: float = 25.0) -> bool:
    return float(np.abs(a.astype(int) - b.astype(int)).mean()) < tolerance


def test_fashion_mnist_style_input_is_not_negated_again():
    out = to_model_array(Image.fromarray(_item()), CONFIG)[0]
    assert _similar(out, _item(), 3.0)


def test_dark_on_white_photo_is_converted_to_light_on_black():
    photo = render_catalog_photo(_item(), scale=10, canvas=(400, 500))
    out = to_model_array(photo, CONFIG)[0]
    assert out[0, 0] == 0 and out.max() > 150
    assert _similar(out, _item())


def test_transparent_background_is_composited_onto_white(tmp_path):
    photo = np.asarray(render_catalog_photo(_item(), 10).convert("L"))
    alpha = np.where(photo < 250, 255, 0).astype(np.uint8)
    # Transparent pixels hold black colour values: dropping alpha would show a black backdrop.
    rgba = np.dstack([photo, photo, photo, alpha]) * (alpha[..., None] > 0)
    Image.fromarray(rgba.astype(np.uint8), "RGBA").save(tmp_path / "cutout.png")
    out = decode_file(str(tmp_path / "cutout.png"), CONFIG, BIG).array[0]
    assert _similar(out, _item())


@pytest.mark.parametrize("mode", ["L", "RGB", "P"])
def test_a_colour_key_backdrop_is_composited_onto_white(tmp_path, mode):
    # PNG optimisers store a white backdrop as one see-through colour (tRNS), here black.
    photo = np.asarray(render_catalog_photo(_item(), 10).convert("L")).copy()
    photo[photo >= 250] = 0
    keyed = Image.fromarray(photo, "L").convert(mode)
    keyed.save(tmp_path / "keyed.png", transparency=(0, 0, 0) if mode == "RGB" else 0)
    out = decode_file(str(tmp_path / "keyed.png"), CONFIG, BIG).array[0]
    assert _similar(out, _item())


@pytest.mark.parametrize("mode", ["LA", "P", "CMYK", "1", "RGB", "I;16", "I", "F"])
def test_every_pillow_mode_becomes_8_bit(mode):
    base = render_catalog_photo(_item(), 4)
    if mode == "LA":
        img = base.convert("LA")
    elif mode == "P":
        img = base.convert("P", palette=Image.Palette.ADAPTIVE)
        img.info["transparency"] = 0
    elif mode in ("I;16", "I"):
        img = Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257)
        img = img if mode == "I;16" else img.convert("I")
    elif mode == "F":
        img = Image.fromarray(np.asarray(base.convert("L")).astype(np.float32) / 255.0, "F")
    else:
        img = base.convert(mode)
    flat = to_8bit(img)
    assert flat.mode in ("L", "RGB")
    out = to_model_array(img, CONFIG)[0]
    assert out.shape == (28, 28) and out.dtype == np.uint8
    if mode not in ("P", "1"):  # palette with a transparent index and 1-bit lose detail by design
        assert _similar(out, _item(), 30)


def test_16_bit_values_are_scaled_not_clipped():
    grey = np.full((10, 10), 40000, np.uint16)
    flat = np.asarray(to_8bit(Image.fromarray(grey)))
    assert 150 < flat.mean() < 160  # 40000 / 65535 * 255 = 155.6; clipping would give 255


def test_exif_orientation_is_applied(tmp_path):
    photo = render_catalog_photo(_item(), 10, canvas=(300, 400))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    photo.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "sideways.jpg", quality=95, exif=exif)
    decoded = decode_file(str(tmp_path / "sideways.jpg"), CONFIG, BIG)
    assert (decoded.width, decoded.height) == (300, 400)
    assert _similar(decoded.array[0], _item())


def test_animated_gif_uses_the_first_frame(tmp_path):
    first = render_catalog_photo(_item(), 5)
    second = render_catalog_photo(np.flipud(_item()), 5)
    first.save(tmp_path / "anim.gif", save_all=True, append_images=[second], duration=100, loop=0)
    out = decode_file(str(tmp_path / "anim.gif"), CONFIG, BIG).array[0]
    assert _similar(out, _item()) and not _similar(out, np.flipud(_item()), 10)


def test_large_jpegs_are_decoded_at_reduced_size(tmp_path, monkeypatch):
    path = tmp_path / "big.jpg"
    render_catalog_photo(_item(), 40, canvas=(1080, 1440)).save(path, quality=90)
    sizes = []
    original = Image.Image.load

    def spy(self):
        sizes.append(self.size)
        return original(self)

    monkeypatch.setattr(Image.Image, "load", spy)
    decoded = decode_file(str(path), CONFIG, max_pixels=200 * 200)  # far below 1080x1440
    assert decoded.status == "ok" and (decoded.width, decoded.height) == (1080, 1440)
    assert max(w * h for w, h in sizes) <= 200 * 200


def test_rgb_models_get_three_channels_at_their_size():
    config = ModelConfig(channels=3, input_size=64, mean=(0.5,) * 3, std=(0.25,) * 3)
    tensor = image_to_tensor(render_catalog_photo(_item(), 10), config)
    assert tensor.shape == (3, 64, 64) and tensor.dtype.is_floating_point
    assert 0.0 <= float(tensor.min()) and float(tensor.max()) <= 1.0


def test_blank_image_does_not_crash():
    out = to_model_array(Image.new("RGB", (50, 80), "white"), CONFIG)
    assert out.shape == (1, 28, 28) and out.max() == 0


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("shape", [(52, 40), (130, 100), (390, 300, 3), (1300, 1000, 3)])
def test_a_noise_field_converts_to_an_empty_frame(tmp_path, shape, fmt):
    # Shrunk to 28x28 a noise field averages into a flat box the network calls a Bag; the
    # conversion empties it instead (the detector's blank rule then flags it), at any size.
    rng = np.random.default_rng(sum(shape))
    path = tmp_path / f"noise.{fmt.lower()}"
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path, fmt, quality=90)
    decoded = decode_file(str(path), CONFIG, 10**9)
    assert decoded.status == "ok" and decoded.array is not None and decoded.array.max() == 0


def test_neighbour_correlation_tells_noise_from_photos():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (112, 84, 1)).astype(np.float32)
    ramp = np.add.outer(np.arange(112.0), np.arange(84.0))[..., None]
    fabric = ramp + rng.normal(0, 8, ramp.shape)  # shading with a little grain on top
    assert abs(preprocess.neighbour_correlation(noise)) < 0.05
    assert preprocess.neighbour_correlation(fabric) > 0.9
    # too small or too even to say: never taken for noise
    assert preprocess.neighbour_correlation(noise[:4, :4]) == 1.0
    assert preprocess.neighbour_correlation(np.full((50, 50, 3), 200.0) + rng.normal(0, 1, (50, 50, 3))) == 1.0


def test_products_on_noisy_backdrops_are_not_taken_for_noise(fmnist_test):
    rng = np.random.default_rng(3)
    for k in range(20):  # two of each class, small photos with noise of 60 grey levels, far worse than any camera's
        item = fmnist_test.images[np.flatnonzero(fmnist_test.labels == k % 10)[k // 10]].reshape(28, 28)
        photo = render_catalog_photo(item, 4, canvas=(120, 160), noise=60.0, rng=rng)
        assert to_model_array(photo, CONFIG).max() > 0, k


def test_noisy_backdrop_does_not_stretch_the_crop():
    rng = np.random.default_rng(0)
    photo = render_catalog_photo(_item(), 10, canvas=(600, 800), noise=6.0, rng=rng)
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=85)
    out = to_model_array(Image.open(buffer), CONFIG)[0]
    assert _similar(out, _item())


@pytest.mark.parametrize("background", [(200, 180, 230), (40, 60, 20), (255, 255, 255)])
def test_each_channel_maps_its_background_to_0_and_the_far_end_to_255(background):
    # A product band spanning the full height and no wider than that: nothing is resized
    # or sharpened, so the output pixels are exactly the mapped input pixels.
    rng = np.random.default_rng(sum(background))
    bg = np.array(background, np.float64)
    light = bg.mean() >= 128
    photo = np.empty((28, 28, 3), np.uint8)
    photo[:] = background
    far = rng.integers(0, 100, (28, 20, 3)) if light else rng.integers(160, 256, (28, 20, 3))
    photo[:, 4:24] = far
    out = to_model_array(Image.fromarray(photo, "RGB"), ModelConfig(channels=3, mean=(0.5,) * 3, std=(0.25,) * 3))
    got = out.transpose(1, 2, 0)[:, 4:24].astype(int)
    scale = 255 / np.maximum(bg, 1) if light else 255 / np.maximum(255 - bg, 1)
    want = np.clip(np.floor((bg - far if light else far - bg) * scale + 0.5), 0, 255)
    assert np.abs(got - want).max() <= 1  # float32 vs float64 rounding at most
    assert (out.transpose(1, 2, 0)[:, :4] == 0).all()  # the background itself


# --- Real-photo levers (docs/zero-shot-accuracy.md) ------------------------------------

def _shirt_mask(width: int, height: int) -> np.ndarray:
    """A T-shirt silhouette (sleeves and body) as a boolean mask filling most of the frame."""
    mask = np.zeros((height, width), bool)
    mask[int(0.15 * height) : int(0.35 * height), int(0.12 * width) : int(0.88 * width)] = True  # sleeves
    mask[int(0.15 * height) : int(0.9 * height), int(0.3 * width) : int(0.7 * width)] = True  # body
    return mask


def _draw(shape: np.ndarray, backdrop: np.ndarray, fill: float, edge: float) -> Image.Image:
    """``shape`` painted ``fill`` with a 3-pixel ``edge`` (the soft shadow a studio light
    leaves around a white garment) onto ``backdrop``."""
    body = Image.fromarray(shape.astype(np.uint8) * 255)
    inner = np.asarray(body.filter(ImageFilter.MinFilter(7))) > 127
    photo = backdrop.astype(np.float32).copy()
    photo[shape] = edge
    photo[inner] = fill
    return Image.fromarray(np.clip(photo + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")


def _expected(shape: np.ndarray) -> np.ndarray:
    """Where the garment should land on the 28x28 canvas (trimmed, longest edge 28, centred)."""
    rows, cols = np.nonzero(shape.any(1))[0], np.nonzero(shape.any(0))[0]
    crop = shape[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    scale = 28 / max(crop.shape)
    size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
    small = np.asarray(Image.fromarray(crop.astype(np.uint8) * 255).resize(size, Image.Resampling.BOX)) > 200
    canvas = np.zeros((28, 28), bool)
    x, y = (28 - size[0] + 1) // 2, (28 - size[1] + 1) // 2
    canvas[y : y + size[1], x : x + size[0]] = small
    return canvas


def _silhouette_recall(out: np.ndarray, shape: np.ndarray, level: int = 30) -> float:
    """Share of the garment's own 28x28 area the model sees as product (not black)."""
    return float((out[_expected(shape)] > level).mean())


@pytest.mark.parametrize("backdrop, fill, edge", [(255, 252, 215), (236, 250, 200), (242, 242, 205)])
def test_a_white_shirt_on_a_white_or_light_grey_backdrop_keeps_its_silhouette(backdrop, fill, edge):
    # Negation alone maps a white shirt on white to near-black: only its outline is left.
    shape = _shirt_mask(300, 400)
    photo = _draw(shape, np.full(shape.shape, backdrop, np.float32), fill, edge)
    out = to_model_array(photo, CONFIG)[0]
    assert _silhouette_recall(out, shape) > 0.9
    assert out[:, :2].max() == 0 and out[:, -2:].max() == 0  # beside the item stays black


def test_a_dark_garment_keeps_its_own_brightness():
    # The floor lifts only the faint parts of an item; a dark shirt is not flattened.
    shape = _shirt_mask(300, 400)
    photo = _draw(shape, np.full(shape.shape, 255.0), 30, 30)
    out = to_model_array(photo, CONFIG)[0]
    assert _silhouette_recall(out, shape, 200) > 0.9


def test_a_garment_on_a_cluttered_floor_is_cut_out():
    rng = np.random.default_rng(3)
    h, w = 400, 300
    # Wooden floorboards: bands of different brown-greys with grain, nothing like a plain backdrop.
    boards = np.repeat(rng.uniform(120, 200, (1, w // 25 + 1)), 25, axis=1)[:, :w]
    floor = boards + rng.normal(0, 12, (h, w)) + 15 * np.sin(np.arange(h)[:, None] / 7.0)
    shape = _shirt_mask(w, h)
    out = to_model_array(_draw(shape, floor, 45, 45), CONFIG)[0]
    # The floor is gone: the shirt is there, and beside it (under the sleeves) is black.
    assert _silhouette_recall(out, shape, 60) > 0.85
    near = np.asarray(Image.fromarray(_expected(shape).astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(3))) > 0
    assert (~near).sum() > 50 and out[~near].mean() < 10


def test_a_garment_the_grey_of_the_carpet_is_cut_out_by_its_colour(tmp_path):
    # Red on a green carpet of the same brightness: in grey the two are one texture, so
    # the cutout works on the colours the JPEG is decoded with.
    h, w = 400, 300
    yy, xx = np.mgrid[0:h, 0:w]
    texture = 25 * np.sin(xx / 6.0 + yy / 9.0) + np.random.default_rng(0).normal(0, 8, (h, w))
    shape = _shirt_mask(w, h)
    photo = np.empty((h, w, 3))
    photo[:] = (40, 120, 60)  # grey level 89
    photo[shape] = (200, 40, 60)  # grey level 90
    photo += texture[..., None]
    Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8), "RGB").save(tmp_path / "carpet.jpg", quality=90)
    out = decode_file(str(tmp_path / "carpet.jpg"), CONFIG, BIG).array[0]
    assert _silhouette_recall(out, shape) > 0.85


def _worn_top(head: bool) -> Image.Image:
    """A dark top worn by a person (head on a neck above the shoulders) on white."""
    h, w = 160, 80
    photo = np.full((h, w), 255.0)
    yy, xx = np.mgrid[0:h, 0:w]
    if head:
        photo[(yy - 16) ** 2 / 14**2 + (xx - 40) ** 2 / 10**2 <= 1] = 60  # face and hair
        photo[28:36, 36:44] = 150  # neck
    photo[36:120, 10:70] = 70  # the top: shoulders, sleeves and body
    photo[120:160, 22:58] = 40  # jeans below it
    return Image.fromarray(photo.astype(np.uint8), "L")


def test_the_head_of_a_model_is_cut_out_of_a_worn_photo():
    with_head = to_model_array(_worn_top(True), CONFIG)[0]
    rows = np.nonzero(with_head.max(axis=1) > 30)[0]
    top_row = with_head[rows[0]]
    # The first row the model sees is the shoulders (wide), not the top of the head.
    assert (top_row > 30).sum() > 10


SKIN = (224, 172, 140)


def _worn_t_shirt(shirt: tuple[int, int, int], arms: tuple[int, int, int] = SKIN) -> Image.Image:
    """A person in a short-sleeved T-shirt on white, in colour: hair and face, neck, the
    T-shirt, bare arms hanging beside it (apart from the body, as in most catalog photos),
    jeans below."""
    h, w = 160, 100
    photo = np.full((h, w, 3), 255, np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    head = (yy - 16) ** 2 / 14**2 + (xx - 50) ** 2 / 10**2 <= 1
    photo[head] = SKIN
    photo[head & (yy < 9)] = (40, 30, 20)  # hair
    photo[28:36, 45:55] = SKIN  # neck
    photo[36:56, 12:88] = shirt  # shoulders and short sleeves
    photo[56:110, 25:75] = shirt  # the body
    photo[56:108, 12:22] = arms
    photo[56:108, 78:88] = arms
    photo[110:160, 28:72] = (50, 60, 110)  # jeans
    return Image.fromarray(photo, "RGB")


def _runs(row: np.ndarray) -> int:
    lit = np.concatenate([[False], row > 30, [False]])
    return int((np.diff(lit.astype(np.int8)) == 1).sum())


def test_the_bare_arms_of_a_worn_t_shirt_leave_the_frame():
    # With the arms beside it, a T-shirt reads as long sleeves (Pullover, Shirt) to a model
    # trained on Fashion-MNIST's product shots; the arms have the colour of the face.
    from dataclasses import replace

    from catalog_tagger.levers import DEFAULT
    from catalog_tagger.preprocess import convert

    photo = _worn_t_shirt((40, 70, 160))
    before = convert(photo, CONFIG, replace(DEFAULT, skin=False))[0]
    after = to_model_array(photo, CONFIG)[0]
    middle = lambda out: out[np.nonzero(out.max(axis=1) > 30)[0][0] + 8]  # noqa: E731  below the sleeves
    assert _runs(middle(before)) == 3  # arm, body, arm
    assert _runs(middle(after)) == 1  # the body alone
    # The sleeves stay: the top row (the shoulders) is wider than the body below it.
    rows = np.nonzero(after.max(axis=1) > 30)[0]
    assert (after[rows[0]] > 30).sum() > (middle(after) > 30).sum() + 4


def test_a_head_framed_by_long_hair_is_found_by_its_face():
    # Hair down to the shoulders hides the neck, so the silhouette never narrows: the face's
    # skin colour says where the head ends.
    from dataclasses import replace

    from catalog_tagger.levers import DEFAULT
    from catalog_tagger.preprocess import convert

    photo = np.asarray(_worn_t_shirt((40, 70, 160))).copy()
    photo[0:44, 34:66] = (40, 30, 20)  # long hair, from the crown over the shoulders
    yy, xx = np.mgrid[0:160, 0:100]
    photo[((yy - 18) ** 2 / 11**2 + (xx - 50) ** 2 / 8**2 <= 1)] = SKIN  # the face inside it
    photo = Image.fromarray(photo, "RGB")
    width = lambda out: int((out > 30).any(axis=0).sum())  # noqa: E731
    height = lambda out: int((out > 30).any(axis=1).sum())  # noqa: E731
    without = convert(photo, CONFIG, replace(DEFAULT, face=False))[0]
    after = to_model_array(photo, CONFIG)[0]
    # Scaled to 28 rows either way: without the head (a fifth of the figure) the body is
    # shown larger, so it is wider in the frame.
    assert height(without) == height(after) == 28
    assert width(after) >= width(without) + 2


def test_a_garment_the_colour_of_skin_and_a_grey_photo_keep_everything():
    from dataclasses import replace

    from catalog_tagger.levers import DEFAULT
    from catalog_tagger.preprocess import convert

    without = replace(DEFAULT, skin=False)
    # A beige T-shirt: the patch across the body's middle is the garment, not skin.
    beige = _worn_t_shirt(SKIN)
    assert np.array_equal(to_model_array(beige, CONFIG), convert(beige, CONFIG, without))
    # A grey photo has no colour to tell skin by: the arms stay, bit for bit as before.
    grey = _worn_t_shirt((40, 70, 160)).convert("L")
    assert np.array_equal(to_model_array(grey, CONFIG), convert(grey, CONFIG, without))
    # Long sleeves and a glove-sized hand: nothing long and skin-coloured beside the body.
    long_sleeves = _worn_t_shirt((40, 70, 160), arms=(40, 70, 160))
    assert np.array_equal(to_model_array(long_sleeves, CONFIG), convert(long_sleeves, CONFIG, without))


def test_a_collar_or_hanger_is_not_taken_for_a_head():
    # A narrow hook above a coat, widening without a neck: nothing is cut.
    photo = np.full((160, 80), 255, np.uint8)
    photo[0:12, 38:42] = 60  # hanger hook
    photo[12:20, 30:50] = 60  # collar
    photo[20:160, 10:70] = 70
    out = to_model_array(Image.fromarray(photo, "L"), CONFIG)[0]
    rows = np.nonzero(out.max(axis=1) > 30)[0]
    assert (out[rows[0]] > 30).sum() <= 4


def test_fashion_mnist_like_images_convert_exactly_as_before_the_levers():
    # The levers act on light or cluttered backdrops only: a light-on-black item
    # (Fashion-MNIST, or a photo already in its form) gets the v1 conversion bit for bit,
    # so the Fashion-MNIST accuracy of a model cannot move.
    from catalog_tagger.data.idx import read_idx
    from catalog_tagger.levers import DEFAULT, V1
    from catalog_tagger.preprocess import convert

    rng = np.random.default_rng(5)
    noisy = _item().astype(int) + rng.integers(-30, 30, (28, 28)) * (_item() > 0)
    items = [_item(), np.fliplr(_item()), np.clip(noisy, 0, 255).astype(np.uint8)]
    test_set = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
    if test_set.exists():
        items += list(np.asarray(read_idx(test_set))[:300])
    for item in items:
        img = Image.fromarray(item.astype(np.uint8))
        assert (convert(img, CONFIG, DEFAULT) == convert(img, CONFIG, V1)).all()



def _patchwork_floor(seed: int) -> Image.Image:
    """A cluttered home photo: patches of carpet and floor with grain, a garment on it, JPEG."""
    rng = np.random.default_rng(seed)
    h, w = 400, 300
    coarse = rng.uniform(40, 220, (rng.integers(3, 12), rng.integers(3, 12)))
    photo = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.Resampling.NEAREST)).astype(float)
    photo += rng.normal(0, rng.uniform(3, 20), (h, w))
    y0, x0 = rng.integers(40, 120), rng.integers(30, 100)
    photo[y0 : y0 + 200, x0 : x0 + 120] = rng.uniform(30, 220) + rng.normal(0, 10, (200, 120))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=80)
    return Image.open(buffer)


@pytest.mark.parametrize("seed", [10, 11, 24, 30])
def test_a_cluttered_photo_converts_the_same_whatever_ran_before(seed):
    # GrabCut starts from OpenCV's global random state; unseeded, a photo's tag would depend
    # on which photos the worker converted before it (these photos came out differently).
    import cv2

    photo = _patchwork_floor(seed)
    outs = []
    for state in range(4):
        cv2.setRNGSeed(state)  # what other photos before this one would have left behind
        outs.append(to_model_array(photo, CONFIG))
    assert all((out == outs[0]).all() for out in outs[1:])


# --- One shoe out of a pair (lever set "default+pair"; measured, not in the default) -----

def _paste(photo: Image.Image, shape: Image.Image, xy: tuple[int, int], grey: int = 60) -> None:
    photo.paste(grey, xy, shape)


def _shoe_from_above() -> Image.Image:
    """A sole seen from above, toe up: widest at the ball of the foot, narrower at the heel."""
    yy, xx = np.mgrid[0:300, 0:120]
    half = 60 * np.where(yy < 120, 1.0, 1.0 - 0.3 * (yy - 120) / 180)
    inside = np.abs(xx - 60) <= half * np.sqrt(np.clip(1 - ((yy - 150) / 150) ** 2, 0, 1))
    return Image.fromarray(inside.astype(np.uint8) * 255).rotate(10, expand=True, resample=Image.Resampling.BILINEAR)


def _pair_of_shoes(gap: int) -> Image.Image:
    """Left and right shoe (mirror images), toes out, ``gap`` pixels apart at the heels
    (at 10 they touch)."""
    photo = Image.new("L", (420, 500), 250)
    left = _shoe_from_above()
    _paste(photo, left, (210 - left.size[0] - gap // 2 + 30, 100))
    _paste(photo, left.transpose(Image.Transpose.FLIP_LEFT_RIGHT), (210 + (gap + 1) // 2 - 30, 100))
    return photo.convert("RGB")


def _columns(out: np.ndarray) -> int:
    return int((out.max(axis=0) > 30).sum())


@pytest.mark.parametrize("gap", [40, 10])
def test_a_pair_of_shoes_converts_to_one_shoe(gap):
    from catalog_tagger.levers import DEFAULT, LEVER_SETS
    from catalog_tagger.preprocess import convert

    photo = _pair_of_shoes(gap)
    assert _columns(convert(photo, CONFIG, DEFAULT)[0]) >= 20  # both shoes, side by side
    one = convert(photo, CONFIG, LEVER_SETS["default+pair"])[0]
    assert _columns(one) <= 14
    turned = convert(photo, CONFIG, LEVER_SETS["default+pair-turned"])[0]
    assert int((turned.max(axis=1) > 30).sum()) <= 14  # laid on its side: wide, not tall


def _side_view_shoe() -> Image.Image:
    photo = Image.new("L", (500, 400), 250)
    shoe = Image.new("L", (500, 400), 0)
    from PIL import ImageDraw

    ImageDraw.Draw(shoe).polygon([(60, 300), (60, 150), (200, 140), (330, 230), (440, 250), (450, 300)], fill=255)
    _paste(photo, shoe, (0, 0))
    return photo.convert("RGB")


def _trousers() -> Image.Image:
    """Two legs apart, joined only by a waistband a tenth of the height."""
    photo = np.full((480, 260), 250, np.uint8)
    photo[40:80, 40:220] = 70  # waistband
    photo[80:440, 40:115] = 70  # legs, a gap of 30 between them
    photo[80:440, 145:220] = 70
    return Image.fromarray(photo).convert("RGB")


def _worn_figure() -> Image.Image:
    """A dark top worn by a person, head and legs apart (the legs joined by the body)."""
    photo = np.asarray(_worn_top(True)).copy()
    photo[120:160] = 255
    photo[120:160, 18:36] = 40  # left leg
    photo[120:160, 44:62] = 40  # right leg
    return Image.fromarray(photo).convert("RGB")


def _bag() -> Image.Image:
    photo = np.full((400, 400), 250, np.uint8)
    photo[150:360, 60:340] = 80  # the bag
    yy, xx = np.mgrid[0:400, 0:400]
    ring = np.abs(np.hypot((yy - 150) / 110.0, (xx - 200) / 100.0) - 1) < 0.08
    photo[ring & (yy < 150)] = 80  # the handle
    return Image.fromarray(photo).convert("RGB")


@pytest.mark.parametrize("draw", [_side_view_shoe, _trousers, _worn_figure, _bag])
def test_one_item_is_not_split_as_a_pair(draw):
    from catalog_tagger.levers import DEFAULT, LEVER_SETS
    from catalog_tagger.preprocess import convert

    photo = draw()
    assert (convert(photo, CONFIG, LEVER_SETS["default+pair"]) == convert(photo, CONFIG, DEFAULT)).all()


@pytest.mark.parametrize("rows", [1, 2, 7, 276, 277])
@pytest.mark.parametrize("channels", [1, 3])
def test_the_border_median_is_numpys_bit_for_bit(rows, channels):
    rng = np.random.default_rng(rows * channels)
    # Whole grey levels (as decoded pixels are, with ties) and arbitrary floats.
    for values in (rng.integers(0, 256, (rows, channels)).astype(np.float32),
                   rng.normal(128, 60, (rows, channels)).astype(np.float32)):
        assert np.array_equal(preprocess._median(values), np.median(values, axis=0))


def test_the_mask_box_is_pillows_getbbox():
    rng = np.random.default_rng(0)
    for shape, density in [((80, 60), 0.02), ((5, 7), 0.3), ((40, 40), 0.0), ((1, 1), 1.0)]:
        mask = rng.random(shape) < density
        for part in (mask, mask[1:, 2:]):  # whole masks and crops of them (strided views)
            expected = Image.fromarray(part.astype(np.uint8) * 255, "L").getbbox()
            assert preprocess._bbox(part, 1, part.shape[::-1]) == expected


def test_tall_counts_the_rows_that_hold_the_item_not_its_span():
    # Two blobs 20 rows apart span a tall box, but four rows hold the item: not a figure.
    from catalog_tagger.worn import _tall

    mask = np.zeros((40, 20), bool)
    mask[5:7, 8:12] = mask[25:27, 8:12] = True
    assert not _tall(mask)
    mask[5:27, 10] = True  # joined by a line: 22 rows hold it
    assert _tall(mask)
