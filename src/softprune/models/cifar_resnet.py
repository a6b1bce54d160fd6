"""CIFAR ResNet-(6n+2) of He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), Sec. 4.2.

This is the network the Soft Filter Pruning (He et al., IJCAI 2018) and FPGM (He et al., CVPR 2019) papers
prune: a 16-channel stem, three stages of n basic blocks with 16, 32 and 64 channels, global average
pooling and one linear layer. Shortcuts that change shape use option A (parameter-free: subsample, then
append zero channels), so the parameter counts match the published 0.27M / 0.85M / 1.7M.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SoftpruneError

__all__ = ["BasicBlock", "CifarResNet", "ShortcutA", "resnet20", "resnet32", "resnet56", "resnet110"]


class ShortcutA(nn.Module):
    """Option-A shortcut: keep every stride-th pixel, then append zero channels after the identity ones."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise SoftpruneError(
                f"an option-A shortcut can only add channels, got {in_planes} -> {out_planes}; "
                "use out_planes >= in_planes"
            )
        self.in_planes = in_planes
        self.out_planes = out_planes
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.pad (not torch.zeros + cat) so that a torch.fx trace shows the zero channels as one pad node.
        return F.pad(
            x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, self.out_planes - self.in_planes)
        )

    def extra_repr(self) -> str:
        return f"{self.in_planes}, {self.out_planes}, stride={self.stride}"


class BasicBlock(nn.Module):
    """conv3x3(stride)-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # Not in-place: pruning hooks read activations that an in-place ReLU would overwrite.
        self.relu = nn.ReLU()
        self.shortcut: nn.Module
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = ShortcutA(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu(out)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images (He et al. 2016, Sec. 4.2) with option-A shortcuts."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
            raise SoftpruneError(
                f"a CIFAR ResNet needs depth 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth!r}; "
                "pick a depth of that form"
            )
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        init_weights(self)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) convolutions, BN scale 1 and shift 0; Linear keeps PyTorch's default."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 (n=3, 0.27M parameters) of He et al. 2016."""
    return CifarResNet(20, num_classes, in_channels)


def resnet32(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-32 (n=5, 0.46M parameters) of He et al. 2016."""
    return CifarResNet(32, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-56 (n=9, 0.85M parameters) of He et al. 2016."""
    return CifarResNet(56, num_classes, in_channels)


def resnet110(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-110 (n=18, 1.7M parameters) of He et al. 2016."""
    return CifarResNet(110, num_classes, in_channels)
