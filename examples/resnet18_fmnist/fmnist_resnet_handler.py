"""Handler of the benchmark backbone: Fashion-MNIST preprocessing from its README.

uint8 28x28 grayscale -> [0, 1] tensor -> bilinear resize to 32x32 on the tensor -> normalise (0.2860, 0.3530)
-> 3 channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision import transforms
from torchvision.transforms import functional as TF
from ts.torch_handler.image_classifier import ImageClassifier


def _to_input(image) -> torch.Tensor:  # noqa: ANN001 - a PIL image
    t = TF.to_tensor(image.convert("L"))
    if t.shape[-2:] != (28, 28):
        t = TF.resize(t, [28, 28], antialias=True)
    t = F.interpolate(t[None], size=(32, 32), mode="bilinear", align_corners=False)[0]
    return ((t - 0.2860) / 0.3530).expand(3, -1, -1).contiguous()


class FashionResNetHandler(ImageClassifier):
    """Stock image classifier with the backbone's own preprocessing; answers the top 3 classes."""

    topk = 3
    image_processing = transforms.Lambda(_to_input)
