"""Post-activation ResNets for 32x32 inputs.

* ``resnet8`` ... ``resnet110``, ``resnet8x4``, ``resnet32x4``: the CIFAR ResNets of
  RepDistiller (3x3 stem, three stages, widths 16/16/32/64 or 32/64/128/256 for the x4
  variants, ``(depth - 2) / 6`` basic blocks per stage, 1x1-conv + BN projection shortcuts).
* ``resnet18`` and ``resnet50``: the four-stage CIFAR ResNets (3x3 stride-1 stem of 64
  channels, stages of 64/128/256/512 planes) of kuangliu/pytorch-cifar, used by
  RepDistiller (resnetv2) and by the teacher-free KD paper.

Stages: ``layer1``..``layer3`` (``layer4`` for the four-stage nets), RepDistiller's ``feat[1:-1]``;
the stem (conv-BN-ReLU) is not a stage.

Initialisation: RepDistiller's (Kaiming-normal fan_out convolutions, PyTorch's default classifier)
for the CIFAR ResNets.  ``resnet18`` / ``resnet50`` default to PyTorch's default init, as the
teacher-free KD code (kuangliu's nets, no init code), their only users among kdlab's recipes;
``init="kaiming"`` gives RepDistiller's resnetv2 init.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from kdlab.errors import ConfigError

from .common import head, init_weights, set_taps, stage
from .registry import register


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    """3x3 conv-BN-ReLU, 3x3 conv-BN, add the shortcut, ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _shortcut(in_planes, planes, stride)
        self.preact = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.preact(out + identity))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand (x4), add the shortcut, ReLU."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.downsample = _shortcut(in_planes, out_planes, stride)
        self.preact = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.preact(out + identity))


class ResNet(nn.Module):
    """3x3 stem (stride 1), then stages of residual blocks; the first stage keeps the
    resolution and each later one halves it."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        stem_width: int,
        widths: list[int],
        depths: list[int],
        num_classes: int = 100,
        in_chans: int = 3,
        init: Literal["kaiming", "torch"] = "kaiming",
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, stem_width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU()
        in_planes = stem_width
        info = []
        reduction = 1
        for i, (planes, n) in enumerate(zip(widths, depths), start=1):
            stride = 1 if i == 1 else 2
            reduction *= stride
            blocks = []
            for j in range(n):
                blocks.append(block(in_planes, planes, stride if j == 0 else 1))
                in_planes = planes * block.expansion
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            info.append(stage(f"stage{i}", f"layer{i}", f"layer{i}.{n - 1}.preact", in_planes, reduction))
        for key, module in head(in_planes, num_classes).items():
            self.add_module(key, module)
        self.num_stages = len(widths)
        set_taps(self, info)
        if init == "kaiming":
            init_weights(self)
        elif init != "torch":  # "torch": the modules' own default init, left as constructed
            raise ConfigError(f"model option init must be 'kaiming' or 'torch', got {init!r}")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(self.flatten(self.avgpool(x)))


def _cifar_resnet(depth: int, filters: list[int], num_classes: int, in_chans: int) -> ResNet:
    if (depth - 2) % 6:
        raise ValueError("a basic-block CIFAR ResNet has depth 6n+2")
    n = (depth - 2) // 6
    return ResNet(BasicBlock, filters[0], filters[1:], [n, n, n], num_classes, in_chans)


_SMALL = [16, 16, 32, 64]
_X4 = [32, 64, 128, 256]


def _register_cifar(name: str, depth: int, filters: list[int]) -> None:
    def build(num_classes: int = 100, in_chans: int = 3) -> ResNet:
        return _cifar_resnet(depth, filters, num_classes, in_chans)

    build.__name__ = name
    build.__doc__ = f"RepDistiller CIFAR {name}: depth {depth}, filters {filters}."
    register(name)(build)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register_cifar(f"resnet{_depth}", _depth, _SMALL)
_register_cifar("resnet8x4", 8, _X4)
_register_cifar("resnet32x4", 32, _X4)


@register("resnet18")
def resnet18(num_classes: int = 100, in_chans: int = 3, init: Literal["torch", "kaiming"] = "torch") -> ResNet:
    """CIFAR ResNet-18 (basic blocks 2-2-2-2, 64-512 planes); init: torch (Tf-KD) or kaiming (RepDistiller)."""
    return ResNet(BasicBlock, 64, [64, 128, 256, 512], [2, 2, 2, 2], num_classes, in_chans, init)


@register("resnet50")
def resnet50(num_classes: int = 100, in_chans: int = 3, init: Literal["torch", "kaiming"] = "torch") -> ResNet:
    """CIFAR ResNet-50 (bottlenecks 3-4-6-3, 256-2048 output channels); init: torch (Tf-KD) or kaiming
    (RepDistiller)."""
    return ResNet(Bottleneck, 64, [64, 128, 256, 512], [3, 4, 6, 3], num_classes, in_chans, init)
