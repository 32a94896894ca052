"""Open one image file and turn it into model input, or say precisely why not.

Every outcome is a ``Decoded`` with a status; nothing here raises for a bad file, so a
nightly run over files nobody checked never stops on one of them.
"""

from __future__ import annotations

import os
import signal
import stat
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import IMAGE_FORMATS
from .model import ModelConfig
from .photo_jitter import jitter_photo
from .preprocess import draft_mode, to_model_array

# Pillow's own bomb check runs on the *declared* size before draft mode has had a chance
# to shrink a JPEG; we check the pixels actually decoded instead (see decode_file).
Image.MAX_IMAGE_PIXELS = None

STATUSES = ("ok", "missing", "unreadable", "unsupported", "too_large", "empty")
# Pillow can decode these; anything else it identifies is "unsupported". MPO (a camera
# JPEG carrying a second picture) and DIB (a BMP without its file header) are how Pillow
# names variants of registered kinds.
SUPPORTED_FORMATS = frozenset(IMAGE_FORMATS.values()) | {"MPO", "DIB"}
_INT32_MAX = 2**31 - 1
# EXIF orientations 5-8 swap width and height.
_TRANSPOSED = {5, 6, 7, 8}


@dataclass
class Decoded:
    status: str
    error: str | None = None
    array: np.ndarray | None = None
    width: int | None = None
    height: int | None = None
    file_size: int | None = None
    mtime_us: int | None = None  # microseconds since the epoch, UTC


def _fail(status: str, message: str, width: int | None = None, height: int | None = None) -> Decoded:
    return Decoded(status, message, None, width, height)


class DecodeTimeout(BaseException):
    """A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way
    (ours, or a library's) can swallow it and carry on decoding."""


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise DecodeTimeout in this thread after ``seconds`` (main thread of a process only).

    Pillow feeds its decoders in blocks and returns to Python between them, so the alarm
    gets through even on a file crafted to decode forever.
    """
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise DecodeTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def decode_file(path: str, config: ModelConfig, max_pixels: int, time_limit_s: float | None = None,
                jitter: tuple[int, ...] | None = None) -> Decoded:
    """Decode ``path`` at reduced size and convert it with the shared preprocessing.

    ``time_limit_s`` bounds the time spent on one file; a file that takes longer is
    reported as unreadable. ``jitter``: convert a jittered copy of the photo instead
    (photo_jitter.jitter_photo with this seed; ``learn``'s extra views, never ``tag``).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return _fail("missing", "file not found")
    except OSError as exc:
        return _fail("unreadable", f"cannot stat file: {exc.strerror or exc}")
    try:
        with time_limit(time_limit_s):
            result = _decode_stat(path, st, config, max_pixels, jitter)
    except DecodeTimeout:
        result = _fail("unreadable", f"decoding took longer than the {time_limit_s:g} s limit")
    result.file_size, result.mtime_us = st.st_size, st.st_mtime_ns // 1000
    return result


def _decode_stat(path: str, st: os.stat_result, config: ModelConfig, max_pixels: int,
                 jitter: tuple[int, ...] | None) -> Decoded:
    if not stat.S_ISREG(st.st_mode):
        return _fail("unsupported", "not a regular file")
    if st.st_size == 0:
        return _fail("empty", "file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # truncated-EXIF and palette warnings are not our user's problem
            with Image.open(path) as img:
                return _decode_open(img, config, max_pixels, jitter)
    except PermissionError as exc:
        return _fail("unreadable", f"permission denied: {exc.strerror or exc}")
    except UnidentifiedImageError:
        return _fail("unreadable", "not a recognised image (corrupt, or not an image despite its name)")
    except Exception as exc:  # noqa: BLE001 - the per-image boundary: no file may stop the run
        # Pillow reports corrupt and truncated data through a zoo of exception types
        # (OSError, SyntaxError, ValueError, struct.error, IndexError, ...), and a hostile
        # file can reach others; every one of them means this file is unusable.
        return _fail("unreadable", f"corrupt or truncated image data: {_short(exc)}")


def _decode_open(img: Image.Image, config: ModelConfig, max_pixels: int, jitter: tuple[int, ...] | None
                 ) -> Decoded:
    if img.format not in SUPPORTED_FORMATS:
        return _fail("unsupported", f"unsupported image format {img.format}")
    width, height = img.size
    if width <= 0 or height <= 0:
        return _fail("empty", "image has no pixels", width, height)
    if max(width, height) > _INT32_MAX:  # only a corrupt header declares this; keep the row's int32 columns valid
        return _fail("too_large", f"declared size {width}x{height} is impossible")
    if img.format in ("JPEG", "MPO"):
        # Only 28x28 is needed: let libjpeg decode at 1/2, 1/4 or 1/8 scale directly.
        target = 4 * config.input_size
        img.draft(draft_mode(config), (target, target))
    decoded_pixels = img.size[0] * img.size[1]
    # Checked before anything else touches the pixels: reading EXIF from a PNG can mean
    # decoding the whole image to reach a chunk after the pixel data.
    if decoded_pixels > max_pixels:
        return _fail("too_large", f"{img.size[0]}x{img.size[1]} pixels exceeds the limit of {max_pixels}",
                     width, height)
    orientation = _orientation(img)
    if orientation in _TRANSPOSED:
        width, height = height, width
    img.seek(0)  # first frame of animated GIF/WebP/TIFF
    img.load()
    if orientation not in (None, 1):
        img = ImageOps.exif_transpose(img)
    if jitter is not None:
        img = jitter_photo(img, jitter)
    return Decoded("ok", None, to_model_array(img, config), width, height)


def _orientation(img: Image.Image) -> int | None:
    try:
        value = img.getexif().get(0x0112)
    except Exception:  # a broken EXIF block must not cost us the image
        return None
    return int(value) if isinstance(value, int) else None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    return text[:200]
