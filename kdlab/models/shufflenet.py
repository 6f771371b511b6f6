"""ShuffleNets for 32x32 inputs.

* ``shufflev1``: RepDistiller's ShuffleV1 (groups 3, stage outputs 240/480/960, 4/8/4
  units, 1x1 stem of 24 channels, bias-free convolutions).
* ``shufflev2``: RepDistiller's ShuffleV2 (net size 1: stages of 116/232/464 channels with
  3/7/3 basic units after a downsampling unit, 1x1 stem of 24 channels, 1x1 conv to 1024).
* ``shufflenetv2``: the width-1.0 ShuffleNetV2 of weiaicunzai/pytorch-cifar100 used by the
  teacher-free KD paper (3x3 stem conv + BN without ReLU, convolutions with bias, a
  downsampling unit whose main branch is 1x1 (in->in), depthwise, 1x1 (in->out/2)).

The published nets pool with a fixed 4x4 window; here pooling is adaptive (same result at
32x32, and 8x8 inputs work).  Each unit ends with ``preact`` (an ``nn.Identity``) on the
tensor its final ReLU sees, then ``relu``.  In ShuffleNetV2 units only the branches end in
a ReLU; the units here concatenate and shuffle the branches *before* the ReLU, which gives
exactly the same output because the pass-through half is already non-negative (it is the
output of an earlier ReLU).  The stage taps are the three stages (RepDistiller's ``feat[1:-1]``).

Initialisation: PyTorch's default for every layer, as all three references (RepDistiller's
ShuffleV1/ShuffleV2, pytorch-cifar100's ShuffleNetV2) leave it.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from .common import ChannelShuffle, head, set_taps, stage
from .registry import register


def _conv_bn(
    in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False, relu: bool = False
):
    """conv-BN(-ReLU) as a list of (name, module) pairs."""
    layers = [
        ("conv", nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=bias)),
        ("bn", nn.BatchNorm2d(out_ch)),
    ]
    if relu:
        layers.append(("relu", nn.ReLU()))
    return layers


def _seq(*groups: list[tuple[str, nn.Module]]) -> nn.Sequential:
    """Chain conv-BN groups, numbering the names: conv1, bn1, relu1, conv2, ..."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for k, group in enumerate(groups, start=1):
        for key, module in group:
            layers[f"{key}{k}"] = module
    return nn.Sequential(layers)


# ----------------------------------------------------------------------------- ShuffleNet V1


class ShuffleV1Unit(nn.Module):
    """Grouped 1x1 - BN - ReLU - shuffle - depthwise 3x3 - BN - ReLU - grouped 1x1 - BN, then
    add the input (stride 1) or concatenate its 3x3/2 average pool (stride 2), then ReLU."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int, first_groups: int):
        super().__init__()
        mid = out_planes // 4
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU()
        self.shuffle = ChannelShuffle(first_groups)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else None
        self.preact = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.shuffle(self.relu1(self.bn1(self.conv1(x))))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.shortcut is None:
            out = out + x
        else:
            out = torch.cat([out, self.shortcut(x)], dim=1)
        return self.relu(self.preact(out))


class ShuffleNetV1(nn.Module):
    def __init__(
        self, out_planes: list[int], num_blocks: list[int], groups: int, num_classes: int = 100, in_chans: int = 3
    ):
        super().__init__()
        stem = 24
        self.conv1 = nn.Conv2d(in_chans, stem, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        in_planes = stem
        info = []
        for i, (planes, n) in enumerate(zip(out_planes, num_blocks), start=1):
            units = []
            for j in range(n):
                if j == 0:  # stride 2; the pooled input is concatenated
                    units.append(
                        ShuffleV1Unit(in_planes, planes - in_planes, 2, groups, 1 if in_planes == stem else groups)
                    )
                else:
                    units.append(ShuffleV1Unit(planes, planes, 1, groups, groups))
                in_planes = planes
            self.add_module(f"layer{i}", nn.Sequential(*units))
            info.append(stage(f"stage{i}", f"layer{i}", f"layer{i}.{n - 1}.preact", planes, 2**i))
        for key, module in head(in_planes, num_classes).items():
            self.add_module(key, module)
        set_taps(self, info)
        # no init_weights: the references keep PyTorch's default init

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


@register("shufflev1")
def shufflev1(num_classes: int = 100, in_chans: int = 3) -> ShuffleNetV1:
    """RepDistiller ShuffleV1: out planes 240/480/960, 4/8/4 units, 3 groups."""
    return ShuffleNetV1([240, 480, 960], [4, 8, 4], 3, num_classes, in_chans)


# ----------------------------------------------------------------------------- ShuffleNet V2


class ShuffleV2Unit(nn.Module):
    """Two branches concatenated, channel-shuffled, then ReLU.

    ``left`` is None for a basic unit: the first half of the channels passes through and
    ``right`` transforms the second half.  A downsampling unit feeds the whole input to both.
    Neither branch ends in a ReLU here (see the module docstring).
    """

    def __init__(self, left: nn.Module | None, right: nn.Module):
        super().__init__()
        self.left = left
        self.right = right
        self.shuffle = ChannelShuffle(2)
        self.preact = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        if self.left is None:
            half = x.shape[1] // 2
            a, b = x[:, :half], self.right(x[:, half:])
        else:
            a, b = self.left(x), self.right(x)
        return self.relu(self.preact(self.shuffle(torch.cat([a, b], dim=1))))


def _basic_unit(channels: int, bias: bool) -> ShuffleV2Unit:
    c = channels // 2
    right = _seq(
        _conv_bn(c, c, 1, bias=bias, relu=True),
        _conv_bn(c, c, 3, groups=c, bias=bias),
        _conv_bn(c, c, 1, bias=bias),
    )
    return ShuffleV2Unit(None, right)


def _down_unit_repdistiller(in_ch: int, out_ch: int) -> ShuffleV2Unit:
    mid = out_ch // 2
    left = _seq(_conv_bn(in_ch, in_ch, 3, stride=2, groups=in_ch), _conv_bn(in_ch, mid, 1))
    right = _seq(
        _conv_bn(in_ch, mid, 1, relu=True),
        _conv_bn(mid, mid, 3, stride=2, groups=mid),
        _conv_bn(mid, mid, 1),
    )
    return ShuffleV2Unit(left, right)


def _down_unit_cifar100(in_ch: int, out_ch: int) -> ShuffleV2Unit:
    mid = out_ch // 2
    left = _seq(_conv_bn(in_ch, in_ch, 3, stride=2, groups=in_ch, bias=True), _conv_bn(in_ch, mid, 1, bias=True))
    right = _seq(
        _conv_bn(in_ch, in_ch, 1, bias=True, relu=True),
        _conv_bn(in_ch, in_ch, 3, stride=2, groups=in_ch, bias=True),
        _conv_bn(in_ch, mid, 1, bias=True),
    )
    return ShuffleV2Unit(left, right)


class ShuffleNetV2(nn.Module):
    def __init__(self, variant: str, num_classes: int = 100, in_chans: int = 3):
        super().__init__()
        widths, last = [116, 232, 464], 1024
        repeats = [3, 7, 3]
        bias = variant == "cifar100"
        stem = 24
        if variant == "repdistiller":
            self.stem = _seq(_conv_bn(in_chans, stem, 1, relu=True))
            down = _down_unit_repdistiller
        else:
            self.stem = _seq(_conv_bn(in_chans, stem, 3, bias=True))
            down = _down_unit_cifar100
        in_ch = stem
        info = []
        for i, (width, n) in enumerate(zip(widths, repeats), start=1):
            units = [down(in_ch, width)] + [_basic_unit(width, bias) for _ in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*units))
            info.append(stage(f"stage{i}", f"layer{i}", f"layer{i}.{n}.preact", width, 2**i))
            in_ch = width
        self.conv_last = _seq(_conv_bn(in_ch, last, 1, bias=bias, relu=True))
        for key, module in head(last, num_classes).items():
            self.add_module(key, module)
        set_taps(self, info)
        # no init_weights: the references keep PyTorch's default init

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.conv_last(x)
        return self.fc(self.flatten(self.avgpool(x)))


@register("shufflev2")
def shufflev2(num_classes: int = 100, in_chans: int = 3) -> ShuffleNetV2:
    """RepDistiller ShuffleV2 (net size 1)."""
    return ShuffleNetV2("repdistiller", num_classes, in_chans)


@register("shufflenetv2")
def shufflenetv2(num_classes: int = 100, in_chans: int = 3) -> ShuffleNetV2:
    """pytorch-cifar100 ShuffleNetV2 (ratio 1), as used by teacher-free KD."""
    return ShuffleNetV2("cifar100", num_classes, in_chans)
