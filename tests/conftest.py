from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from catalog_tagger.cli import cli
from catalog_tagger.data.fashion_mnist import Split, load_split
from catalog_tagger.data.idx import write_idx

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_catalog"


def make_tiny_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable 28x28 images: class k is a bright block whose place and size depend on k."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        row, col = 2 + 2 * (k % 5), 2 + 10 * (k // 5)
        images[i, row : row + 10, col : col + 8 + (k % 3)] = 220
    return images, labels


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Fashion-MNIST-shaped dataset small enough to train on in seconds."""
    folder = tmp_path_factory.mktemp("tiny-fmnist")
    for split, n, seed in (("train", 1200, 1), ("t10k", 300, 2)):
        images, labels = make_tiny_split(n, seed)
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels)
    return folder


@pytest.fixture(scope="session")
def fmnist_test() -> Split:
    """The real Fashion-MNIST test set (make test installs it; these tests never skip)."""
    return load_split("test", allow_download=False)


@pytest.fixture()
def run_cli():
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)

    return invoke
