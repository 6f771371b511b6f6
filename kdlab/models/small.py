"""Small, fast CNNs for the embedded 1x8x8 digits data (10 classes).

A 3x3 conv-BN-ReLU stem and three stages of one 3x3 conv-BN-ReLU block each, with strides
1, 2, 2 (8x8 -> 8, 4, 2), global pooling and a linear classifier.

* ``smallcnn`` (student): widths 16/16/32/64, about 26k parameters for 1x8x8 -> 10.
* ``smallcnn_wide`` (teacher): widths 32/32/64/128, about 103k parameters.
* ``smallcnn_narrow`` (the demo's student): widths 8/8/16/16, 4,370 parameters: small enough that on
  the digits data a student alone stays clearly below its teacher, so a method's gain can show.
"""

from __future__ import annotations

from torch import Tensor, nn

from .common import head, init_weights, set_taps, stage
from .registry import register


class ConvBNReLU(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.preact = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.preact(self.bn(self.conv(x))))


class SmallCNN(nn.Module):
    def __init__(self, widths: tuple[int, int, int, int], num_classes: int = 10, in_chans: int = 1):
        super().__init__()
        self.stem = ConvBNReLU(in_chans, widths[0])
        info = []
        in_ch = widths[0]
        reduction = 1
        for i, (width, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            self.add_module(f"stage{i}", ConvBNReLU(in_ch, width, stride))
            reduction *= stride
            info.append(stage(f"stage{i}", f"stage{i}", f"stage{i}.preact", width, reduction))
            in_ch = width
        for key, module in head(in_ch, num_classes).items():
            self.add_module(key, module)
        set_taps(self, info)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(self.flatten(self.avgpool(x)))


@register("smallcnn")
def smallcnn(num_classes: int = 100, in_chans: int = 3) -> SmallCNN:
    """Student for the digits data (pass num_classes=10, in_chans=1)."""
    return SmallCNN((16, 16, 32, 64), num_classes, in_chans)


@register("smallcnn_wide")
def smallcnn_wide(num_classes: int = 100, in_chans: int = 3) -> SmallCNN:
    """Teacher for the digits data (pass num_classes=10, in_chans=1)."""
    return SmallCNN((32, 32, 64, 128), num_classes, in_chans)


@register("smallcnn_narrow")
def smallcnn_narrow(num_classes: int = 100, in_chans: int = 3) -> SmallCNN:
    """The demo's student for the digits data (pass num_classes=10, in_chans=1)."""
    return SmallCNN((8, 8, 16, 16), num_classes, in_chans)
