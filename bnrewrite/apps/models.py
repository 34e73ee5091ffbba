"""Small ResNets for the demo: 8x8 digits and CIFAR-10 32x32, with BatchNorm or GroupNorm.

``SmallResNet`` is a CIFAR-style ResNet: a 3x3 stem, three stages of basic blocks (widths
``(16, 32, 64)`` by default; the 2nd and 3rd stage halve the resolution), global average pooling and a
linear classifier. On 8x8 digits the stages see 8x8, 4x4 and 2x2 feature maps; on CIFAR-10 32x32,
16x16 and 8x8. Every op except BatchNorm treats samples independently, so the VDN pass can carry
virtual rows through it.

``norm="bn"`` uses ``nn.BatchNorm2d`` (which ``bnrewrite.convert_`` / ``bnrewrite.rewrite`` turn
into sampled BN); ``norm="gn"`` uses ``nn.GroupNorm`` with ``gn_groups`` groups, the usual
batch-independent alternative for micro-batches.

``head="bn1d"`` replaces the linear classifier with an MLP head, ``Linear(c, 128) -> BatchNorm1d(128)
-> ReLU -> Linear(128, classes)``: a BatchNorm over ``(N, C)`` inputs, one value per sample and
channel, as in projection heads, tabular and recommendation models. Sampling the batch there leaves
few values per channel; the sample plan's floor (``SamplingConfig.min_count``) is what keeps it safe.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["SmallResNet", "BasicBlock", "make_norm", "small_resnet"]

NORMS: tuple[str, ...] = ("bn", "gn")
HEADS: tuple[str, ...] = ("linear", "bn1d")


def make_norm(kind: str, channels: int, gn_groups: int = 8) -> nn.Module:
    """``nn.BatchNorm2d(channels)`` for ``"bn"``, ``nn.GroupNorm`` for ``"gn"``."""
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        groups = gn_groups if channels % gn_groups == 0 else 1
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {kind!r}")


class BasicBlock(nn.Module):
    """conv3x3-norm-relu-conv3x3-norm plus a (1x1 conv + norm when the shape changes) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str, gn_groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = make_norm(norm, cout, gn_groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = make_norm(norm, cout, gn_groups)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), make_norm(norm, cout, gn_groups)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A small CIFAR-style ResNet (see the module docstring)."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: tuple[int, ...] = (16, 32, 64),
        blocks: tuple[int, ...] = (1, 1, 1),
        norm: str = "bn",
        gn_groups: int = 8,
        head: str = "linear",
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        if len(widths) != len(blocks) or not widths:
            raise ValueError("widths and blocks must be non-empty and of the same length")
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn = make_norm(norm, widths[0], gn_groups)
        self.relu = nn.ReLU(inplace=False)
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(cin, w, stride, norm, gn_groups))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc: nn.Module = nn.Linear(cin, num_classes)
        if head == "bn1d":
            self.fc = nn.Sequential(
                nn.Linear(cin, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, num_classes)
            )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn(self.stem(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def small_resnet(
    in_channels: int = 1,
    num_classes: int = 10,
    norm: str = "bn",
    width: int = 16,
    blocks: int = 1,
    head: str = "linear",
) -> SmallResNet:
    """``SmallResNet`` with widths ``(width, 2*width, 4*width)`` and ``blocks`` blocks per stage."""
    return SmallResNet(
        in_channels,
        num_classes,
        widths=(width, 2 * width, 4 * width),
        blocks=(blocks,) * 3,
        norm=norm,
        head=head,
    )
