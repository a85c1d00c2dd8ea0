"""Handler of the 224-px benchmark: the stock image classifier with EfficientNet-Lite's preprocessing.

Any image -> RGB -> resize the short side to 256 -> centre crop 224 -> [-1, 1] (the TF-Lite models' scaling:
mean 0.5, std 0.5 per channel); answers the top 5 classes.
"""

from __future__ import annotations

from torchvision import transforms
from ts.torch_handler.image_classifier import ImageClassifier


class Lite0Handler(ImageClassifier):
    """Stock image classifier, EfficientNet-Lite preprocessing."""

    topk = 5
    image_processing = transforms.Compose(
        [
            transforms.Lambda(lambda image: image.convert("RGB")),
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ]
    )
