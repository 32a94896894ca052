"""Find, verify and load Fashion-MNIST, and split it for training.

Where the data comes from, in order: an explicit ``--data-dir``, ``$CATALOG_TAGGER_DATA``,
the user cache directory, the Debian/Ubuntu package ``dataset-fashion-mnist``, and last a
download from the official mirrors (checked against the published MD5s) into the cache.
When all of them fail, one error lists every place tried and how to get the data.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import platformdirs

from ..errors import DataError, UsageError
from .idx import read_idx_bytes, read_payload

log = logging.getLogger(__name__)

ENV_VAR = "CATALOG_TAGGER_DATA"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
)
FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
# Published MD5s of the official .gz files (what the mirrors serve).
DOWNLOAD_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
# SHA-256 of the uncompressed payloads: stable however a packager re-compressed them.
CONTENT_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
HOW_TO_GET = (
    "install the Debian/Ubuntu package (apt-get install dataset-fashion-mnist), "
    f"or put the four IDX files in a folder and pass --data-dir or set {ENV_VAR}"
)


@dataclass(frozen=True)
class Split:
    """Images as one uint8 array (N, H, W) and integer labels (N,)."""

    images: np.ndarray
    labels: np.ndarray
    checksums: dict[str, str]

    def __len__(self) -> int:
        return len(self.labels)


def cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("catalog-tagger")) / "fashion-mnist"


def candidate_dirs(data_dir: Path | None = None) -> list[tuple[str, Path]]:
    """The places searched, in order, each with a label used in error messages."""
    places: list[tuple[str, Path]] = []
    if data_dir is not None:
        places.append(("--data-dir", Path(data_dir)))
    if os.environ.get(ENV_VAR):
        places.append((f"${ENV_VAR}", Path(os.environ[ENV_VAR])))
    places.append(("user cache", cache_dir()))
    places.append(("Debian package dataset-fashion-mnist", SYSTEM_DIR))
    return places


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _split_from(folder: Path, split: str) -> Split:
    images_path = _find_file(folder, FILES[(split, "images")])
    labels_path = _find_file(folder, FILES[(split, "labels")])
    assert images_path is not None and labels_path is not None
    checksums: dict[str, str] = {}
    arrays = []
    for path in (images_path, labels_path):
        payload = read_payload(path)
        stem = path.name.removesuffix(".gz")
        checksums[stem] = hashlib.sha256(payload).hexdigest()
        array = read_idx_bytes(payload, str(path))
        official = CONTENT_SHA256.get(stem)
        if official and checksums[stem] != official:
            # Same size as the official release but other bytes smells of corruption; a
            # dataset of another size is simply someone's own data in this format.
            report = log.warning if len(array) in (60000, 10000) else log.info
            report("%s differs from the official Fashion-MNIST release (sha256 %s)", path, checksums[stem])
        arrays.append(array)
    images, labels = arrays
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{images_path}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected a 1-D label array, got shape {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{folder}: {len(images)} {split} images but {len(labels)} labels")
    if len(labels) and int(labels.max()) > 9:
        raise DataError(f"{labels_path}: label {int(labels.max())} is outside Fashion-MNIST's 10 classes")
    return Split(images, labels.astype(np.int64), checksums)


def _complete(folder: Path) -> bool:
    return all(_find_file(folder, stem) for stem in FILES.values())


def download(target: Path, mirrors: tuple[str, ...] | None = None, timeout: float = 20.0) -> list[str]:
    """Fetch the four .gz files into ``target``, checking MD5s; returns the problems met."""
    mirrors = MIRRORS if mirrors is None else mirrors
    target.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    for stem in FILES.values():
        name = stem + ".gz"
        if (target / name).is_file():
            continue
        for mirror in mirrors:
            url = mirror + name
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    payload = response.read()
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                problems.append(f"{url}: {getattr(exc, 'reason', exc)}")
                continue
            if hashlib.md5(payload).hexdigest() != DOWNLOAD_MD5[name]:
                problems.append(f"{url}: MD5 mismatch (download corrupted or not the official file)")
                continue
            with tempfile.NamedTemporaryFile(dir=target, delete=False) as tmp:
                tmp.write(payload)
            os.replace(tmp.name, target / name)
            break
        else:
            return problems
    return problems


def locate(data_dir: Path | None = None, allow_download: bool = True) -> Path:
    """The first folder holding all four files, downloading into the cache as a last resort."""
    tried = []
    for label, folder in candidate_dirs(data_dir):
        if _complete(folder):
            return folder
        tried.append(f"{label} ({folder})")
    if allow_download:
        problems = download(cache_dir())
        if _complete(cache_dir()):
            return cache_dir()
        first = problems[0] if problems else "unknown error"
        tried.append(f"download from the official mirrors ({first})")
    raise DataError(f"Fashion-MNIST not found; tried: {'; '.join(tried)}. To fix: {HOW_TO_GET}.")


def load_split(split: str, data_dir: Path | None = None, allow_download: bool = True) -> Split:
    """Load 'train' (60k) or 'test' (10k) from the first place that has the data."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return _split_from(locate(data_dir, allow_download), split)


def train_val_indices(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded, stratification-free split of the 60k training set into train/validation.

    The test set never takes part: it is only for the final, reported evaluation.
    """
    if not 0 < val_size < n:
        raise UsageError(f"--val-size must be between 1 and {n - 1} (the training set has {n} images), "
                         f"got {val_size}")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[val_size:]), np.sort(order[:val_size])
