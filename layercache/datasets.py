"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, as arrays or as an ImageFolder of PNGs.

Used by the demo, the benchmarks and the tests; the product itself never needs a dataset (it learns from logs).
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np

from layercache.errors import LogError

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(split: str = "test", root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 28, 28)`` uint8 and labels ``(N,)`` of the ``train`` (60k) or ``test`` (10k) split.

    Raises:
        LogError: the files are missing (hint: ``apt-get install -y dataset-fashion-mnist``).
    """
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split={split!r} must be 'train' or 'test'")
    images, labels = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.is_file() or not labels.is_file():
        raise LogError(
            f"Fashion-MNIST not found in {root}. Hint: apt-get update && apt-get install -y dataset-fashion-mnist"
        )
    return _read_idx(images), _read_idx(labels)


def write_image_folder(images: np.ndarray, labels: np.ndarray, out: Path, *, start: int = 0) -> int:
    """Write PNGs as ``out/<label>/<index>.png`` (index = ``start`` + position, zero padded); returns the count."""
    from PIL import Image

    for i, (img, lbl) in enumerate(zip(images, labels)):
        d = out / str(int(lbl))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{start + i:05d}.png")
    return len(images)
