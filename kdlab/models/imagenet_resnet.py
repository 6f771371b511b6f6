"""ImageNet ResNets (He et al. 2016): ``resnet18_imagenet``, ``resnet34_imagenet``, ``resnet50_imagenet``.

The layout of the torchvision models: a 7x7 stride-2 stem of 64 channels and a 3x3 stride-2 max
pool, then four stages of basic blocks (2-2-2-2 or 3-4-6-3) or bottleneck blocks (3-4-6-3, x4
expansion, the stride on the 3x3 conv as torchvision's "ResNet v1.5") of 64/128/256/512 planes, the
first keeping the resolution and each later one halving it, with 1x1-conv + BN projection shortcuts;
11,689,512, 21,797,672 and 25,557,032 parameters for 1000 classes.  The module names are
torchvision's (``conv1``, ``bn1``, ``layer{i}.{j}.conv{k}``, ``layer{i}.{j}.downsample.{0,1}``, ``fc``),
so a torchvision ResNet state dict loads without renaming; the parameter-free ReLUs and taps add no keys.
The stem divides the input by 4, so the stage reductions are 4, 8, 16 and 32 (a 224x224 image ends as 7x7,
a 32x32 one as 1x1).
"""

from __future__ import annotations

from torch import Tensor, nn

from .common import head, init_weights, set_taps, stage
from .registry import register
from .resnet import BasicBlock, Bottleneck


class ImageNetResNet(nn.Module):
    def __init__(
        self,
        depths: list[int],
        num_classes: int = 1000,
        in_chans: int = 3,
        block: type[BasicBlock] | type[Bottleneck] = BasicBlock,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_planes, reduction, info = 64, 4, []
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), depths), start=1):
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
        set_taps(self, info)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


@register("resnet18_imagenet")
def resnet18_imagenet(num_classes: int = 1000, in_chans: int = 3) -> ImageNetResNet:
    """ImageNet ResNet-18 (basic blocks 2-2-2-2)."""
    return ImageNetResNet([2, 2, 2, 2], num_classes, in_chans)


@register("resnet34_imagenet")
def resnet34_imagenet(num_classes: int = 1000, in_chans: int = 3) -> ImageNetResNet:
    """ImageNet ResNet-34 (basic blocks 3-4-6-3)."""
    return ImageNetResNet([3, 4, 6, 3], num_classes, in_chans)


@register("resnet50_imagenet")
def resnet50_imagenet(num_classes: int = 1000, in_chans: int = 3) -> ImageNetResNet:
    """ImageNet ResNet-50 (bottleneck blocks 3-4-6-3, stride on the 3x3 conv)."""
    return ImageNetResNet([3, 4, 6, 3], num_classes, in_chans, block=Bottleneck)
