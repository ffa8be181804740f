"""Project architectures: small CNN/ResNet backbones registered by name, timm-style.

`ARCHS[name](in_chans, **kwargs) -> Backbone(stem, stages, channels)`; `training.models.build_model`
wraps a backbone in a `StagedNet` (preprocess -> stem -> stages -> GAP -> classifier) for
`library: project` specs. `cnn_tiny` exists for tests only (timm's `test_*` archs); the others are
the demo's students and teacher. Adding an arch = one builder function + one `ARCHS` entry; the
registry-parametrised tests in `tests/test_models.py` pick it up.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F



class Backbone(NamedTuple):
    stem: nn.Module
    stages: list[nn.Module]
    channels: list[int]          # output channels of each stage


def norm_layer(c: int, norm: str = "batch") -> nn.Module:
    """`batch`: BatchNorm2d (statistics of the batch, per process under DDP); `group`: GroupNorm
    with 4 groups (per-image statistics: the same on any number of processes)."""
    if norm == "batch":
        return nn.BatchNorm2d(c)
    if norm == "group":
        return nn.GroupNorm(4, c)
    raise TypeError(f"norm must be 'batch' or 'group', not {norm!r}")


def conv_bn(cin: int, cout: int, stride: int = 1, k: int = 3, norm: str = "batch") -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), norm_layer(cout, norm),
                         nn.ReLU(inplace=True))


def cnn_tiny(in_chans: int = 3, norm: str = "batch") -> Backbone:
    """For tests only: a few thousand parameters, two stages (stride 2 each); `norm=group` has
    no batch statistics (the DDP equality test trains it)."""
    return Backbone(conv_bn(in_chans, 8, norm=norm), [conv_bn(8, 12, 2, norm=norm), conv_bn(12, 16, 2, norm=norm)],
                    [12, 16])


def cnn_small(in_chans: int = 3, width: int = 32) -> Backbone:
    """Student for 28/32 px: about 0.12M parameters at width 32, three stages (28 -> 14 -> 7 -> 7).

    Downsamples early (the first stage already works at 14 px): on a CPU most of a small CNN's
    time goes to full-resolution layers, so this is about 3x cheaper per image than a net that
    keeps 32 channels at 28 px, for the same parameter budget.
    """
    w = width
    stages = [
        nn.Sequential(conv_bn(w // 2, w, 2), conv_bn(w, w)),              # 14 x 14
        nn.Sequential(conv_bn(w, 2 * w, 2), conv_bn(2 * w, 2 * w)),       # 7 x 7
        nn.Sequential(conv_bn(2 * w, 3 * w)),                             # 7 x 7
    ]
    return Backbone(conv_bn(in_chans, w // 2), stages, [w, 2 * w, 3 * w])


def cnn_fmnist(in_chans: int = 1, width: int = 32) -> Backbone:
    """Fashion-MNIST teacher: VGG-style, about 0.29M parameters at width 32 (28 -> 14 -> 7)."""
    w = width
    stages = [
        nn.Sequential(conv_bn(w, w), conv_bn(w, w)),
        nn.Sequential(nn.MaxPool2d(2), conv_bn(w, 2 * w), conv_bn(2 * w, 2 * w)),
        nn.Sequential(nn.MaxPool2d(2), conv_bn(2 * w, 4 * w), conv_bn(4 * w, 4 * w)),
    ]
    return Backbone(conv_bn(in_chans, w), stages, [w, 2 * w, 4 * w])


class BasicBlock(nn.Module):
    """He et al. 2016 basic residual block (two 3x3 convs, projection shortcut on shape change)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


def resnet_narrow(in_chans: int = 3, width: int = 16, blocks: list[int] | tuple[int, ...] = (2, 2, 2, 2)) -> Backbone:
    """CIFAR-style ResNet-18 shape for 32 px (3x3 stem, no max-pool), widths w, 2w, 4w, 8w.

    About 0.7M parameters at width 16 (11M at width 64, the CIFAR ResNet-18).
    """
    chans = [width, 2 * width, 4 * width, 8 * width]
    stages, cin = [], width
    for i, (c, n) in enumerate(zip(chans, blocks)):
        layers = [BasicBlock(cin if j == 0 else c, c, (1 if i == 0 else 2) if j == 0 else 1) for j in range(n)]
        stages.append(nn.Sequential(*layers))
        cin = c
    return Backbone(conv_bn(in_chans, width), stages, chans[: len(stages)])


# timm-style registry of project architectures: name -> builder(in_chans, **kwargs) -> Backbone
ARCHS: dict[str, Callable[..., Backbone]] = {
    "cnn_tiny": cnn_tiny,
    "cnn_small": cnn_small,
    "cnn_fmnist": cnn_fmnist,
    "resnet_narrow": resnet_narrow,
}
