"""Real photos as 224-px traffic: seeded random crops of the photographs scikit-image bundles, sent as JPEG.

Nothing here downloads anything: the photos come inside the ``scikit-image`` wheel (``skimage/data``). Each request
is a random crop (20-100% of the area, aspect 3:4-4:3) of one photo, flipped half the time, brightness and
contrast jittered, resized so its short side is 256-384 px and encoded as JPEG at quality 80-95: bodies of about
15-50 KB, as a photo service receives.

The crops of one photo resemble each other, so the unseen requests (other seeds) are easier than a stream of new
photographs would be: use this traffic for what logging, replay and serving cost at 224 px, not for how well
heads generalise.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

__all__ = ["photo_requests", "photo_sources"]

# Bundled images that are not photographs (drawings, test patterns, text) or too small to crop.
_NOT_PHOTOS = {"chessboard_GRAY", "chessboard_RGB", "color", "logo", "microaneurysms", "page", "phantom", "text",
               "horse", "clock_motion"}  # fmt: skip


def _data_dir() -> Path:
    try:
        import skimage
    except ImportError as exc:  # pragma: no cover - an install without the benchmark's extras
        raise ImportError(
            "the 224-px photo traffic needs scikit-image (its bundled photos): pip install -r requirements.txt"
        ) from exc
    return Path(skimage.__file__).parent / "data"


def photo_sources(min_side: int = 256) -> list[tuple[str, Image.Image]]:
    """The bundled photographs with both sides >= ``min_side``, as RGB, sorted by name."""
    out = []
    for path in sorted(_data_dir().glob("*")):
        if path.suffix.lower() not in (".png", ".jpg") or path.stem in _NOT_PHOTOS:
            continue
        with Image.open(path) as image:
            if min(image.size) >= min_side:
                out.append((path.stem, image.convert("RGB")))
    if not out:
        raise FileNotFoundError(f"no photos of at least {min_side} px under {_data_dir()}")
    return out


def _crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = image.size
    for _ in range(10):
        area = w * h * rng.uniform(0.2, 1.0)
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw, ch = round(np.sqrt(area * aspect)), round(np.sqrt(area / aspect))
        if cw <= w and ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return image.crop((x, y, x + cw, y + ch))
    return image


def photo_requests(
    n: int, seed: int, sources: Sequence[tuple[str, Image.Image]] | None = None
) -> tuple[list[bytes], list[str]]:
    """``n`` JPEG request bodies and the photo each was cropped from, seeded (the same seed, the same bytes)."""
    sources = list(sources) if sources is not None else photo_sources()
    rng = np.random.default_rng(seed)
    bodies, names = [], []
    for _ in range(n):
        name, image = sources[int(rng.integers(len(sources)))]
        crop = _crop(image, rng)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop = ImageEnhance.Brightness(crop).enhance(rng.uniform(0.8, 1.2))
        crop = ImageEnhance.Contrast(crop).enhance(rng.uniform(0.8, 1.2))
        short = int(rng.integers(256, 385))
        scale = short / min(crop.size)
        crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))), Image.BICUBIC)
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=int(rng.integers(80, 96)))
        bodies.append(buf.getvalue())
        names.append(name)
    return bodies, names
