"""Tests for layercache.datasets: Fashion-MNIST from the Debian package, ImageFolder export."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from layercache.datasets import CLASSES, FASHION_MNIST_DIR, load_fashion_mnist, write_image_folder
from layercache.errors import LogError


def test_load_fashion_mnist_test_split() -> None:
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    assert sorted(np.unique(labels).tolist()) == list(range(10)) == list(range(len(CLASSES)))
    assert np.bincount(labels).tolist() == [1000] * 10  # the test split is balanced
    assert 0 < images.mean() < 255 and images.max() == 255


def test_load_fashion_mnist_from_another_root(tmp_path: Path) -> None:
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(FASHION_MNIST_DIR / name, tmp_path / name)
    images, labels = load_fashion_mnist("test", root=tmp_path)
    ref_images, ref_labels = load_fashion_mnist("test")
    assert np.array_equal(images, ref_images) and np.array_equal(labels, ref_labels)


def test_idx_header_gives_the_shape(tmp_path: Path) -> None:
    # A hand-written idx pair: 2 images of 3x2 and their labels.
    pixels = np.arange(12, dtype=np.uint8)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + (2).to_bytes(4, "big"))
        f.write(pixels.tobytes())
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (2).to_bytes(4, "big") + bytes([7, 1]))
    images, labels = load_fashion_mnist("test", root=tmp_path)
    assert images.tolist() == pixels.reshape(2, 3, 2).tolist()
    assert labels.tolist() == [7, 1]


def test_missing_files_name_the_apt_package(tmp_path: Path) -> None:
    with pytest.raises(LogError, match=r"Fashion-MNIST not found in .*empty.*apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("test", root=tmp_path / "empty")
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(LogError, match="not found"):  # the labels are missing
        load_fashion_mnist("test", root=tmp_path)


def test_bad_split_name() -> None:
    with pytest.raises(ValueError, match="split='val' must be 'train' or 'test'"):
        load_fashion_mnist("val")


def test_write_image_folder_layout(tmp_path: Path) -> None:
    images, labels = load_fashion_mnist("test")
    out = tmp_path / "traffic"
    assert write_image_folder(images[:12], labels[:12], out, start=100) == 12
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert len(files) == 12
    expected = sorted(f"{int(lbl)}/{100 + i:05d}.png" for i, lbl in enumerate(labels[:12]))
    assert files == expected
    with Image.open(out / expected[0]) as first:
        index = int(Path(expected[0]).stem) - 100
        assert first.mode == "L" and first.size == (28, 28)
        assert np.array_equal(np.asarray(first), images[index])  # PNG is lossless
