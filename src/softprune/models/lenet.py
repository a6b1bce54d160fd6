"""LeNet-5 of LeCun et al., "Gradient-Based Learning Applied to Document Recognition" (Proc. IEEE 1998).

The common modern form for 28x28 inputs: the first convolution pads by 2 so that the feature maps have
the 32x32 geometry of the original, ReLU replaces the scaled tanh and max pooling the trainable subsampling.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LeNet5", "lenet5"]


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) for 28x28 images, with ReLU and max pooling."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.relu3(self.fc1(x))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)


def lenet5(num_classes: int = 10, in_channels: int = 1) -> LeNet5:
    """LeNet-5 (LeCun et al. 1998) for 28x28 inputs, 61.7K parameters with 10 classes."""
    return LeNet5(num_classes, in_channels)
