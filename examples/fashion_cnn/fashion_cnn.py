"""The demo's embedded classifier: a residual CNN for 28x28 grayscale Fashion-MNIST, heavy in its later stages.

Most of its 234 MFLOPs sit after the first stage (16 channels at 28 px: 7% of the FLOPs, 9% of the time), so
requests a cache head answers there skip the rest: on two CPU cores that is what makes the cache pay in served
throughput, not only in FLOPs. TorchServe model file: exactly one class is defined here (imported classes do not count).
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
    """Stem + three residual stages (16, 96, 192 channels at 28, 14, 7 px) + linear classifier."""

    def __init__(self, widths: tuple[int, int, int] = (16, 96, 192), num_classes: int = 10) -> None:
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
