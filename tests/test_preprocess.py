"""The one preprocessing function, on real files in every storage variant."""

import io

import numpy as np
import pytest
from PIL import Image

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
