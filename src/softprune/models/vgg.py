"""VGG-16 with batch normalization for 32x32 images.

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition" (ICLR 2015),
in the CIFAR form used by Li et al., "Pruning Filters for Efficient ConvNets" (ICLR 2017) and Liu et al.,
"Learning Efficient Convolutional Networks through Network Slimming" (ICCV 2017): thirteen
conv3x3-BN-ReLU layers, global average pooling and a single linear classifier.
"""

from __future__ import annotations

import torch
from torch import nn

from .cifar_resnet import init_weights

__all__ = ["VGG16_CFG", "CifarVGG", "vgg16_bn_cifar"]

# Output channels of each conv layer; "M" is a 2x2 max pool.
VGG16_CFG: tuple[int | str, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
)


class CifarVGG(nn.Module):
    """VGG with BN for CIFAR (Simonyan & Zisserman 2015; CIFAR variant of Li et al. 2017 / Liu et al. 2017)."""

    def __init__(
        self, cfg: tuple[int | str, ...] = VGG16_CFG, num_classes: int = 10, in_channels: int = 3
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [
                    nn.Conv2d(channels, int(item), 3, padding=1, bias=False),
                    nn.BatchNorm2d(int(item)),
                    nn.ReLU(),
                ]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def vgg16_bn_cifar(num_classes: int = 10, in_channels: int = 3) -> CifarVGG:
    """VGG-16 with BN for CIFAR (14.7M parameters with 10 classes)."""
    return CifarVGG(VGG16_CFG, num_classes, in_channels)
