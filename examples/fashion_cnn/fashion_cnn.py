"""The demo's embedded default classifier: a small residual CNN for 28x28 grayscale Fashion-MNIST.

TorchServe model file: exactly one class is defined here (imported classes do not count).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock


def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
    down = None
    if stride != 1 or cin != cout:
        down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
    return nn.Sequential(BasicBlock(cin, cout, stride, down), BasicBlock(cout, cout))


class FashionCNN(nn.Module):
    """Stem + three residual stages (16, 32, 64 channels at 28, 14, 7 px) + linear classifier; ~45 MFLOPs."""

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), num_classes: int = 10) -> None:
        super().__init__()
        w0, w1, w2 = widths
        self.stem = nn.Sequential(nn.Conv2d(1, w0, 3, 1, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU(inplace=True))
        self.layer1 = _stage(w0, w0, 1)
        self.layer2 = _stage(w0, w1, 2)
        self.layer3 = _stage(w1, w2, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))
