"""VGG with batch norm for CIFAR, as in RepDistiller (fully connected layers removed).

Five blocks of 3x3 conv(bias)-BN-ReLU layers; 2x2 max pooling after blocks 0-2 (the
pooling after block 3 only fires for 64x64 inputs in RepDistiller and is left out here),
global average pooling after block 4, then one linear layer 512 -> classes.

Stages: blocks 1-4, each ending in a ``preact`` tap and a ``relu``. Block 0 is the stem, not
a stage: RepDistiller's VGG returns ``[f0, f1, f2, f3, f4, pooled]`` with ``f0`` the block-0
output, and its AT/NST losses take ``feat[1:-1]`` (blocks 1-4) and FitNet's default hint layer
is ``feat[2]`` (block 2, 256x8x8), so ``stage1``..``stage4`` are blocks 1-4, the default ``all``
taps are exactly ``feat[1:-1]`` and the default ``middle`` (``stage2``) is the hint layer, as for
every other zoo model. Block 0 stays reachable by its module name ``block0``.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from .common import head, init_weights, set_taps, stage
from .registry import register

_CFG = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _block(in_ch: int, widths: list[int]) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    last = len(widths)
    for k, width in enumerate(widths, start=1):
        layers[f"conv{k}"] = nn.Conv2d(in_ch, width, 3, padding=1, bias=True)
        layers[f"bn{k}"] = nn.BatchNorm2d(width)
        if k == last:
            layers["preact"] = nn.Identity()
            layers["relu"] = nn.ReLU()
        else:
            layers[f"relu{k}"] = nn.ReLU()
        in_ch = width
    return nn.Sequential(layers)


class VGG(nn.Module):
    def __init__(self, cfg: list[list[int]], num_classes: int = 100, in_chans: int = 3):
        super().__init__()
        in_ch = in_chans
        info = []
        reduction = 1
        for i, widths in enumerate(cfg):
            self.add_module(f"block{i}", _block(in_ch, widths))
            if i > 0:  # block 0 is the stem (RepDistiller's f0, never tapped by its losses)
                info.append(stage(f"stage{i}", f"block{i}", f"block{i}.preact", widths[-1], reduction))
            if i < 3:
                self.add_module(f"pool{i}", nn.MaxPool2d(kernel_size=2, stride=2))
                reduction *= 2
            in_ch = widths[-1]
        for key, module in head(in_ch, num_classes).items():
            self.add_module(key, module)
        set_taps(self, info)
        init_weights(self, linear="normal001")

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.block4(self.block3(x))
        return self.fc(self.flatten(self.avgpool(x)))


def _register(name: str) -> None:
    def build(num_classes: int = 100, in_chans: int = 3) -> VGG:
        return VGG(_CFG[name], num_classes, in_chans)

    build.__name__ = name
    build.__doc__ = f"{name} with batch norm (blocks {_CFG[name]})."
    register(name)(build)


for _name in _CFG:
    _register(_name)
