"""ResNet's residual blocks (torch at import; `zoo.architectures` imports this only when
building a ResNet). Convolutions have no bias; a 1x1 projection shortcut where the shape changes."""

from __future__ import annotations

from torch import nn


def shortcut(n_in: int, n_out: int, stride: int) -> nn.Module:
    if stride == 1 and n_in == n_out:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(n_in, n_out, 1, stride, bias=False), nn.BatchNorm2d(n_out))


class BasicBlock(nn.Module):
    """3x3 -> BN -> ReLU -> 3x3 -> BN, plus the shortcut, then ReLU (ResNet-18)."""

    def __init__(self, n_in: int, planes: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(n_in, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(),
            nn.Conv2d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes))
        self.shortcut = shortcut(n_in, planes, stride)

    def forward(self, x):
        return (self.body(x) + self.shortcut(x)).relu()


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 to 4x the planes, BN after each, plus the shortcut (ResNet-50)."""

    def __init__(self, n_in: int, planes: int, stride: int):
        super().__init__()
        out = planes * 4
        self.body = nn.Sequential(
            nn.Conv2d(n_in, planes, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(),
            nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(),
            nn.Conv2d(planes, out, 1, bias=False), nn.BatchNorm2d(out))
        self.shortcut = shortcut(n_in, out, stride)

    def forward(self, x):
        return (self.body(x) + self.shortcut(x)).relu()
