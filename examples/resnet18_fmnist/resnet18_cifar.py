"""Model file of the benchmark backbone: torchvision ResNet-18 with a CIFAR-style stem, 10 classes.

Weights: ``../shared/backbones/resnet18_fmnist.fp16.pt`` (a float16 state_dict; loading copies into float32).
"""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet


class ResNet18CIFAR(ResNet):
    """ResNet-18, 3x3 stride-1 stem, no max-pool (32x32 inputs)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.maxpool = nn.Identity()
