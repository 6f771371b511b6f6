"""MobileNetV1 (Howard et al. 2017), the ImageNet student of the CRD, ReviewKD and DKD tables.

The net of mdistiller's ``mdistiller/models/imagenet/mobilenetv1.py`` (from the OFD / torchdistill
lineage): ``model`` is an ``nn.Sequential`` of a 3x3 stride-2 conv-BN-ReLU stem of 32 channels and 13
depthwise-separable blocks (3x3 depthwise conv-BN-ReLU, 1x1 pointwise conv-BN-ReLU, bias-free) of
64, 128, 128, 256, 256, 512 (x6), 1024, 1024 channels, strides 1-2-1-2-1-2-1-1-1-1-1-2-1, then global
average pooling and ``fc`` 1024 -> classes: 4,231,976 parameters for 1000 classes.  The module names
are mdistiller's (``model.{i}.{k}``, ``fc``), so its checkpoints load without renaming.

Stages: mdistiller's feature list ``feat1..feat4`` (``get_stage_channels`` 128/256/512/1024), the outputs
of ``model.3``, ``model.5``, ``model.11`` and ``model.13``, the last block before each halving of the
resolution (and the deepest); their pre-activation is the block's last BN (``model.{i}.4``), which is
what mdistiller's ``self.model[i][:-1]`` returns.  The pooling is adaptive (mdistiller's is
``AvgPool2d(7)``, the same at 224 px) so that small inputs work.
"""

from __future__ import annotations

from torch import Tensor, nn

from .common import head, set_taps, stage
from .registry import register

# (out channels, stride) of the depthwise-separable blocks model.1 .. model.13
_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]
_STAGE_BLOCKS = (3, 5, 11, 13)


def _conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU())


def _conv_dw(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.ReLU(),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(),
    )


class MobileNetV1(nn.Module):
    def __init__(self, num_classes: int = 1000, in_chans: int = 3):
        super().__init__()
        layers = [_conv_bn(in_chans, 32, 2)]
        channels, reduction, info = 32, 2, []
        for i, (oup, stride) in enumerate(_BLOCKS, start=1):
            layers.append(_conv_dw(channels, oup, stride))
            channels, reduction = oup, reduction * stride
            if i in _STAGE_BLOCKS:
                info.append(stage(f"stage{len(info) + 1}", f"model.{i}", f"model.{i}.4", oup, reduction))
        self.model = nn.Sequential(*layers)
        for key, module in head(channels, num_classes).items():
            self.add_module(key, module)
        set_taps(self, info)  # PyTorch's default init: mdistiller's net has no init code

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flatten(self.avgpool(self.model(x))))


@register("mobilenetv1")
def mobilenetv1(num_classes: int = 1000, in_chans: int = 3) -> MobileNetV1:
    """MobileNetV1 of mdistiller's ImageNet tables (width 1.0)."""
    return MobileNetV1(num_classes, in_chans)
