"""TorchServe handler of the demo classifier: the stock image classifier with Fashion-MNIST preprocessing."""

from __future__ import annotations

from torchvision import transforms
from ts.torch_handler.image_classifier import ImageClassifier


class FashionHandler(ImageClassifier):
    """Any image -> grayscale 28x28 -> normalised tensor (1, 28, 28); answers the top 3 classes."""

    topk = 3
    image_processing = transforms.Compose(
        [
            transforms.Grayscale(1),
            transforms.Resize((28, 28)),
            transforms.ToTensor(),
            transforms.Normalize((0.2860,), (0.3530,)),
        ]
    )
