"""MobileNetV2 for 32x32 inputs.

* ``mobilenetv2_half``: RepDistiller's ``mobile_half`` (expansion 6, width 0.5): 3x3
  stride-2 stem, bias-free convolutions, ReLU, a 1x1 conv to 1280 channels.
* ``mobilenetv2``: the width-1.0 net of weiaicunzai/pytorch-cifar100 used by the
  teacher-free KD paper: 1x1 stem, convolutions with bias, ReLU6, strides 1-2-2-2-1-1-1,
  and a 1x1 conv to 1280 channels; its 1x1 "classifier conv" is an equivalent ``nn.Linear``.
  The reference pads its 1x1 stem conv by one pixel (32x32 -> 34x34); here the stem has no
  padding so stage maps are 32/16/8/4 (same parameters).

Both nets have seven groups ``blocks.0`` .. ``blocks.6`` of inverted residual blocks
(expansion t, width c, n blocks, first stride s).  The stage taps are ``blocks.1``,
``blocks.2``, ``blocks.4`` and ``blocks.6`` (RepDistiller's feature list).  A block
ends in a linear 1x1 projection (no activation), so the stages have no pre-activation tap.

Initialisation follows each reference: ``mobilenetv2_half`` RepDistiller's (Kaiming-normal fan_out
convolutions, N(0, 0.01) classifier), ``mobilenetv2`` PyTorch's default (pytorch-cifar100 has no
init code).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from .common import head, init_weights, set_taps, stage
from .registry import register

# t, c, n, s
_SETTINGS_REPDISTILLER = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]
_SETTINGS_CIFAR100 = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 1),
    (6, 320, 1, 1),
]
_TAPPED_GROUPS = (1, 2, 4, 6)


class InvertedResidual(nn.Module):
    """1x1 expand - BN - act, 3x3 depthwise (strided) - BN - act, 1x1 project - BN."""

    def __init__(self, inp: int, oup: int, stride: int, expand: int, act: type[nn.Module], bias: bool):
        super().__init__()
        hidden = inp * expand
        self.use_residual = stride == 1 and inp == oup
        self.body = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(inp, hidden, 1, bias=bias),
                bn1=nn.BatchNorm2d(hidden),
                act1=act(),
                conv2=nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=bias),
                bn2=nn.BatchNorm2d(hidden),
                act2=act(),
                conv3=nn.Conv2d(hidden, oup, 1, bias=bias),
                bn3=nn.BatchNorm2d(oup),
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    def __init__(
        self,
        settings: list[tuple[int, int, int, int]],
        width: float,
        stem_kernel: int,
        stem_stride: int,
        bias: bool,
        act: type[nn.Module],
        num_classes: int = 100,
        in_chans: int = 3,
        last_channel: int = 1280,
    ):
        super().__init__()
        in_ch = int(32 * width)
        self.stem = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(in_chans, in_ch, stem_kernel, stride=stem_stride, padding=stem_kernel // 2, bias=bias),
                bn=nn.BatchNorm2d(in_ch),
                act=act(),
            )
        )
        reduction = stem_stride
        info = []
        self.blocks = nn.ModuleList()
        for i, (t, c, n, s) in enumerate(settings):
            out_ch = int(c * width)
            units = []
            for j in range(n):
                units.append(InvertedResidual(in_ch, out_ch, s if j == 0 else 1, t, act, bias))
                in_ch = out_ch
            reduction *= s
            self.blocks.append(nn.Sequential(*units))
            if i in _TAPPED_GROUPS:
                info.append(stage(f"stage{len(info) + 1}", f"blocks.{i}", None, out_ch, reduction))
        self.conv_last = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(in_ch, last_channel, 1, bias=bias),
                bn=nn.BatchNorm2d(last_channel),
                act=act(),
            )
        )
        for key, module in head(last_channel, num_classes).items():
            self.add_module(key, module)
        set_taps(self, info)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for group in self.blocks:
            x = group(x)
        x = self.conv_last(x)
        return self.fc(self.flatten(self.avgpool(x)))


@register("mobilenetv2_half")
def mobilenetv2_half(num_classes: int = 100, in_chans: int = 3) -> MobileNetV2:
    """RepDistiller's mobile_half: expansion 6, width 0.5."""
    model = MobileNetV2(_SETTINGS_REPDISTILLER, 0.5, 3, 2, False, nn.ReLU, num_classes, in_chans)
    init_weights(model, linear="normal001")
    return model


@register("mobilenetv2")
def mobilenetv2(num_classes: int = 100, in_chans: int = 3) -> MobileNetV2:
    """Width-1.0 MobileNetV2 of pytorch-cifar100 (teacher-free KD); PyTorch's default init, as the reference."""
    return MobileNetV2(_SETTINGS_CIFAR100, 1.0, 1, 1, True, nn.ReLU6, num_classes, in_chans)
