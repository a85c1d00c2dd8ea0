"""A second benchmark workload: torchvision's stock MobileNetV2 for 10 classes on 3x32x32 Fashion-MNIST inputs.

TorchServe model file: exactly one class is defined here (the torchvision parent is imported). The inputs are the
benchmark ResNet-18's (``examples/resnet18_fmnist/fmnist_resnet_handler.py``): 28x28 grayscale resized to 32x32,
normalised, repeated to three channels. Weights come from ``tools/train_backbone.py``.
"""

from __future__ import annotations

from torchvision.models import MobileNetV2


class MobileNetV2FMNIST(MobileNetV2):
    """``torchvision.models.MobileNetV2(num_classes=10)``, unchanged: about 12 MFLOPs per 32x32 image."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(num_classes=num_classes)
