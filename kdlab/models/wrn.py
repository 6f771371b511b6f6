"""Wide ResNets WRN-d-k (pre-activation blocks), as in RepDistiller.

Stem 3x3 conv of 16 channels, three groups of ``(d - 4) / 6`` blocks of 16k/32k/64k
channels (strides 1, 2, 2), then BN-ReLU, global pooling and the classifier.  A block is
BN-ReLU-conv3x3-BN-ReLU-conv3x3; when its width or stride changes, the shortcut is a 1x1
convolution applied to the block's BN-ReLU'd input, otherwise the raw input is added.

Stages: the three groups' outputs, raw residual sums (``group1``..``group3``), which is what
RepDistiller's WRN returns as ``feat[1:-1]`` (and the official AT code's group outputs ``g0``..``g2``),
so AT/NST/FitNet on a WRN tap what the reference taps.  A pre-activation network has no ReLU
of its own at a group's end: the BN-ReLU that opens the next group (or the final BN-ReLU) acts
on it.  ``stage i:pre`` is that BN's output, the tensor RepDistiller returns for ``preact=True``;
unlike the post-activation nets, ``stage i`` is not the ReLU of ``stage i:pre`` here.
"""

from __future__ import annotations

from torch import Tensor, nn

from .common import head, init_weights, set_taps, stage
from .registry import register


class WideBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.shortcut = (
            None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        identity = x if self.shortcut is None else self.shortcut(act)
        return identity + out


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int = 100, in_chans: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError("a wide ResNet has depth 6n+4")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        in_planes = widths[0]
        for g, (planes, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            blocks = [WideBlock(in_planes if j == 0 else planes, planes, stride if j == 0 else 1) for j in range(n)]
            self.add_module(f"group{g}", nn.Sequential(*blocks))
            in_planes = planes
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU()
        for key, module in head(in_planes, num_classes).items():
            self.add_module(key, module)
        set_taps(
            self,
            [
                stage("stage1", "group1", "group2.0.bn1", widths[1], 1),
                stage("stage2", "group2", "group3.0.bn1", widths[2], 2),
                stage("stage3", "group3", "bn", widths[3], 4),
            ],
        )
        init_weights(self, linear="zero_bias")

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.group3(self.group2(self.group1(x)))
        x = self.relu(self.bn(x))
        return self.fc(self.flatten(self.avgpool(x)))


def _register(depth: int, widen: int) -> None:
    name = f"wrn_{depth}_{widen}"

    def build(num_classes: int = 100, in_chans: int = 3) -> WideResNet:
        return WideResNet(depth, widen, num_classes, in_chans)

    build.__name__ = name
    build.__doc__ = f"Wide ResNet WRN-{depth}-{widen}."
    register(name)(build)


for _d, _k in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register(_d, _k)
