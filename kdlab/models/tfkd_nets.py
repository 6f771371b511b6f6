"""The remaining CIFAR networks of the teacher-free KD paper (Yuan et al.).

* ``googlenet``: GoogLeNet of weiaicunzai/pytorch-cifar100: a 3x3 stem of 192 channels,
  inception modules 3a-3b, 3x3/2 max pool, 4a-4e, max pool, 5a-5b, global pooling, dropout
  0.4, linear.  Convolutions have bias; the "5x5" branch is two stacked 3x3 convolutions.
  Every branch ends in BN-ReLU; here the ReLU is applied once after the concatenation
  (the same function), so each module has a ``preact`` tap.  The reference builds one BN of
  that branch with ``eps`` equal to its channel count (a typo); the standard eps is used.
  Stages: after 3b (32x32), 4e (16x16) and 5b (8x8).
* ``densenet121``: DenseNet-BC of pytorch-cifar100: growth 32, blocks 6/12/24/16, 3x3 stem
  of 64 channels, compression 0.5, transitions BN-1x1 conv-2x2 average pool (no ReLU, as in
  the reference), final BN-ReLU.  Stages: the four dense blocks; a dense block's output is a
  concatenation of raw convolution outputs, so only the last stage (after the final BN-ReLU)
  has a pre-activation tap.
* ``resnext29_8x64d``: the CIFAR ResNeXt-29 (8x64d, widen factor 4) of prlz77/ResNeXt.pytorch
  used by the paper: a 3x3 stem of 64 channels, three stages of three bottlenecks with 256/512/1024
  outputs and grouped 3x3 convolutions of 512/1024/2048 channels in 8 groups.

Initialisation follows each reference: PyTorch's default for GoogLeNet and DenseNet (no init code in
pytorch-cifar100), and ResNeXt's own (Kaiming-normal fan_out convolutions, Kaiming-normal classifier,
zero biases).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from .common import head, init_weights, set_taps, stage
from .registry import register

# ----------------------------------------------------------------------------- GoogLeNet


def _cbr(in_ch: int, out_ch: int, kernel: int, relu: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=True), nn.BatchNorm2d(out_ch)]
    if relu:
        layers.append(nn.ReLU())
    return layers


class Inception(nn.Module):
    def __init__(self, in_ch: int, n1x1: int, n3x3_red: int, n3x3: int, n5x5_red: int, n5x5: int, pool_proj: int):
        super().__init__()
        self.branch1 = nn.Sequential(*_cbr(in_ch, n1x1, 1, relu=False))
        self.branch2 = nn.Sequential(*_cbr(in_ch, n3x3_red, 1), *_cbr(n3x3_red, n3x3, 3, relu=False))
        self.branch3 = nn.Sequential(
            *_cbr(in_ch, n5x5_red, 1), *_cbr(n5x5_red, n5x5, 3), *_cbr(n5x5, n5x5, 3, relu=False)
        )
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), *_cbr(in_ch, pool_proj, 1, relu=False))
        self.out_channels = n1x1 + n3x3 + n5x5 + pool_proj
        self.preact = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], dim=1)
        return self.relu(self.preact(out))


_INCEPTIONS = [
    ("a3", (192, 64, 96, 128, 16, 32, 32)),
    ("b3", (256, 128, 128, 192, 32, 96, 64)),
    ("pool3", None),
    ("a4", (480, 192, 96, 208, 16, 48, 64)),
    ("b4", (512, 160, 112, 224, 24, 64, 64)),
    ("c4", (512, 128, 128, 256, 24, 64, 64)),
    ("d4", (512, 112, 144, 288, 32, 64, 64)),
    ("e4", (528, 256, 160, 320, 32, 128, 128)),
    ("pool4", None),
    ("a5", (832, 256, 160, 320, 32, 128, 128)),
    ("b5", (832, 384, 192, 384, 48, 128, 128)),
]


class GoogLeNet(nn.Module):
    def __init__(self, num_classes: int = 100, in_chans: int = 3, dropout: float = 0.4):
        super().__init__()
        self.prelayer = nn.Sequential(*_cbr(in_chans, 192, 3))
        body: OrderedDict[str, nn.Module] = OrderedDict()
        for key, cfg in _INCEPTIONS:
            body[key] = nn.MaxPool2d(3, stride=2, padding=1) if cfg is None else Inception(*cfg)
        self.body = nn.Sequential(body)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(p=dropout)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(1024, num_classes)
        set_taps(
            self,
            [
                stage("stage1", "body.b3", "body.b3.preact", 480, 1),
                stage("stage2", "body.e4", "body.e4.preact", 832, 2),
                stage("stage3", "body.b5", "body.b5.preact", 1024, 4),
            ],
        )
        # no init_weights: pytorch-cifar100's GoogLeNet keeps PyTorch's default init

    def forward(self, x: Tensor) -> Tensor:
        x = self.body(self.prelayer(x))
        # dropout on the pooled (N, 1024, 1, 1) map, as the reference does; the flattened
        # tensor fed to the classifier is the embedding
        return self.fc(self.flatten(self.dropout(self.avgpool(x))))


@register("googlenet")
def googlenet(num_classes: int = 100, in_chans: int = 3, dropout: float = 0.4) -> GoogLeNet:
    """GoogLeNet of pytorch-cifar100 (teacher-free KD)."""
    return GoogLeNet(num_classes, in_chans, dropout)


# ----------------------------------------------------------------------------- DenseNet


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (4k) - BN-ReLU-3x3 conv (k); output = cat(input, new k maps)."""

    def __init__(self, in_ch: int, growth: int):
        super().__init__()
        inner = 4 * growth
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_ch, inner, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(inner, growth, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        new = self.conv2(self.relu2(self.bn2(self.conv1(self.relu1(self.bn1(x))))))
        return torch.cat([x, new], dim=1)


class DenseNet(nn.Module):
    def __init__(
        self, blocks: list[int], growth: int, compression: float = 0.5, num_classes: int = 100, in_chans: int = 3
    ):
        super().__init__()
        ch = 2 * growth
        self.conv1 = nn.Conv2d(in_chans, ch, 3, padding=1, bias=False)
        info = []
        reduction = 1
        last = len(blocks)
        for i, n in enumerate(blocks, start=1):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(ch, growth))
                ch += growth
            self.add_module(f"dense{i}", nn.Sequential(*layers))
            if i < last:
                info.append(stage(f"stage{i}", f"dense{i}", None, ch, reduction))
                out = int(compression * ch)
                self.add_module(
                    f"trans{i}",
                    nn.Sequential(
                        OrderedDict(
                            bn=nn.BatchNorm2d(ch),
                            conv=nn.Conv2d(ch, out, 1, bias=False),
                            pool=nn.AvgPool2d(2, stride=2),
                        )
                    ),
                )
                ch = out
                reduction *= 2
            else:
                info.append(stage(f"stage{i}", "relu", "bn", ch, reduction))
        self.num_blocks = last
        self.bn = nn.BatchNorm2d(ch)
        self.relu = nn.ReLU()
        for key, module in head(ch, num_classes).items():
            self.add_module(key, module)
        set_taps(self, info)
        # no init_weights: pytorch-cifar100's DenseNet keeps PyTorch's default init

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for i in range(1, self.num_blocks + 1):
            x = getattr(self, f"dense{i}")(x)
            if i < self.num_blocks:
                x = getattr(self, f"trans{i}")(x)
        x = self.relu(self.bn(x))
        return self.fc(self.flatten(self.avgpool(x)))


@register("densenet121")
def densenet121(num_classes: int = 100, in_chans: int = 3) -> DenseNet:
    """DenseNet-121 (BC, growth 32) of pytorch-cifar100 (teacher-free KD)."""
    return DenseNet([6, 12, 24, 16], 32, 0.5, num_classes, in_chans)


# ----------------------------------------------------------------------------- ResNeXt


class ResNeXtBlock(nn.Module):
    """1x1 reduce to D - grouped 3x3 (strided) - 1x1 expand, add the shortcut, ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, cardinality: int, widen: int):
        super().__init__()
        d = cardinality * out_ch // widen
        self.conv_reduce = nn.Conv2d(in_ch, d, 1, bias=False)
        self.bn_reduce = nn.BatchNorm2d(d)
        self.relu_reduce = nn.ReLU()
        self.conv_group = nn.Conv2d(d, d, 3, stride=stride, padding=1, groups=cardinality, bias=False)
        self.bn_group = nn.BatchNorm2d(d)
        self.relu_group = nn.ReLU()
        self.conv_expand = nn.Conv2d(d, out_ch, 1, bias=False)
        self.bn_expand = nn.BatchNorm2d(out_ch)
        self.shortcut = (
            None
            if in_ch == out_ch
            else nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))
        )
        self.preact = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu_reduce(self.bn_reduce(self.conv_reduce(x)))
        out = self.relu_group(self.bn_group(self.conv_group(out)))
        out = self.bn_expand(self.conv_expand(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(self.preact(identity + out))


class CifarResNeXt(nn.Module):
    def __init__(self, cardinality: int, depth: int, widen: int = 4, num_classes: int = 100, in_chans: int = 3):
        super().__init__()
        if (depth - 2) % 9:
            raise ValueError("a CIFAR ResNeXt has depth 9n+2")
        n = (depth - 2) // 9
        widths = [64, 64 * widen, 128 * widen, 256 * widen]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        info = []
        in_ch = widths[0]
        reduction = 1
        for i, (out_ch, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            blocks = [
                ResNeXtBlock(in_ch if j == 0 else out_ch, out_ch, stride if j == 0 else 1, cardinality, widen)
                for j in range(n)
            ]
            self.add_module(f"stage{i}", nn.Sequential(*blocks))
            reduction *= stride
            info.append(stage(f"stage{i}", f"stage{i}", f"stage{i}.{n - 1}.preact", out_ch, reduction))
            in_ch = out_ch
        for key, module in head(in_ch, num_classes).items():
            self.add_module(key, module)
        set_taps(self, info)
        init_weights(self, linear="kaiming")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


@register("resnext29_8x64d")
def resnext29_8x64d(num_classes: int = 100, in_chans: int = 3) -> CifarResNeXt:
    """CIFAR ResNeXt-29 8x64d (teacher-free KD)."""
    return CifarResNeXt(8, 29, 4, num_classes, in_chans)
