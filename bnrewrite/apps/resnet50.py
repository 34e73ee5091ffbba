"""ResNet-50 with torchvision's architecture (v1.5: stride on the 3x3 conv), written in the project.

torchvision does not import beside the local torch build, so the benchmark carries its own copy:
``conv1 7x7/2 -> bn -> relu -> maxpool 3x3/2 -> layer1..4 (3, 4, 6, 3 Bottlenecks, widths 64..512,
expansion 4) -> avgpool -> fc``, with torchvision's initialisation (Kaiming-normal fan-out convs,
BN weight 1 / bias 0). Parameter names and shapes match ``torchvision.models.resnet50`` so its
``state_dict`` loads. ``bn_shapes`` lists the BatchNorm input shapes of one forward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Bottleneck", "ResNet50", "resnet50", "bn_shapes"]


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * self.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * self.expansion),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet50(nn.Module):
    def __init__(self, num_classes: int = 1000, layers: tuple[int, ...] = (3, 4, 6, 3)) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        mods = [Bottleneck(self.inplanes, planes, stride)]
        self.inplanes = planes * Bottleneck.expansion
        mods += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(num_classes: int = 1000) -> ResNet50:
    """torchvision's ``resnet50()`` architecture, randomly initialised."""
    return ResNet50(num_classes)


def bn_shapes(batch: int = 256, size: int = 224) -> list[tuple[int, int, int, int]]:
    """Distinct BatchNorm input shapes of ResNet-50 at ``batch`` x 3 x ``size`` x ``size``, in order.

    Computed from the architecture (no forward pass): 12 shapes at 224 x 224.
    """
    shapes: list[tuple[int, int, int, int]] = []

    def add(c: int, s: int) -> None:
        if (batch, c, s, s) not in shapes:
            shapes.append((batch, c, s, s))

    s = (size + 2 * 3 - 7) // 2 + 1
    add(64, s)
    s = (s + 2 - 3) // 2 + 1
    inplanes = 64
    for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
        for b in range(blocks):
            stride = 2 if (i > 0 and b == 0) else 1
            add(planes, s)  # bn1
            s2 = (s + 2 - 3) // stride + 1
            add(planes, s2)  # bn2
            add(planes * 4, s2)  # bn3 (and the downsample BN)
            s = s2
            inplanes = planes * 4
    del inplanes
    return shapes
