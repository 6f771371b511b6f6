"""Trainable side modules of the feature methods: FitNet's regressor, FT's paraphraser and translator.

They live with the student during training (optimizer, checkpoint) and are dropped on export.
"""

from __future__ import annotations

from torch import nn

from kdlab.errors import LayerError


def conv_regressor(
    s_shape: tuple[int, ...], t_shape: tuple[int, ...], relu: bool = True, what: str = "fitnet"
) -> nn.Module:
    """Maps the student's guided map (C_s, H_s, W_s) onto the teacher's hint (C_t, H_t, W_t).

    The kernel choice follows RepDistiller's ConvReg: a stride-2 conv for a 2x larger student map, a
    stride-2 transposed conv for a 2x smaller one, otherwise a conv of kernel 1+H_s-H_t; then BN and,
    unless ``relu=False`` (AB's connector, which regresses pre-ReLU maps), a ReLU.
    """
    cs, hs, ws = s_shape
    ct, ht, wt = t_shape
    if hs == 2 * ht and ws == 2 * wt:
        conv = nn.Conv2d(cs, ct, 3, stride=2, padding=1)
    elif 2 * hs == ht and 2 * ws == wt:
        conv = nn.ConvTranspose2d(cs, ct, 4, stride=2, padding=1)
    elif hs >= ht and ws >= wt:
        conv = nn.Conv2d(cs, ct, (1 + hs - ht, 1 + ws - wt))
    else:
        raise LayerError(
            f"{what}: cannot regress student map {s_shape} onto teacher map {t_shape}; "
            "tap a student layer at least as large as the teacher's (student_layers / teacher_layers options)"
        )
    return nn.Sequential(conv, nn.BatchNorm2d(ct), nn.ReLU()) if relu else nn.Sequential(conv, nn.BatchNorm2d(ct))


def _conv_stack(channels: list[int], transpose: bool, bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        conv = nn.ConvTranspose2d if transpose else nn.Conv2d
        layers.append(conv(c_in, c_out, 3, stride=1, padding=1))
        if bn:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


def factor_channels(channels: int, rate: float) -> int:
    return max(1, int(round(channels * rate)))


class Paraphraser(nn.Module):
    """FT's convolutional autoencoder (3 convs, 3 transposed convs, LeakyReLU 0.1, spatial size kept).

    The official decoder ends in a LeakyReLU even though it reconstructs post-ReLU maps; kept as is.
    """

    def __init__(self, channels: int, rate: float = 0.5):
        super().__init__()
        k = factor_channels(channels, rate)
        self.encoder = _conv_stack([channels, channels, k, k], transpose=False, bn=False)
        self.decoder = _conv_stack([k, k, channels, channels], transpose=True, bn=False)

    def forward(self, x):
        return self.decoder(self.encoder(x))


def translator(in_channels: int, out_channels: int, bn: bool = False) -> nn.Sequential:
    """FT's student-side encoder: conv(C_s->C_s), conv(C_s->C_out), conv(C_out->C_out), LeakyReLU each."""
    return _conv_stack([in_channels, in_channels, out_channels, out_channels], transpose=False, bn=bn)


def vid_regressor(in_channels: int, mid_channels: int, out_channels: int) -> nn.Sequential:
    """VID's mean regressor: three 1x1 convs without bias, ReLU between them (RepDistiller's VIDLoss)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, mid_channels, 1, bias=False),
        nn.ReLU(),
        nn.Conv2d(mid_channels, mid_channels, 1, bias=False),
        nn.ReLU(),
        nn.Conv2d(mid_channels, out_channels, 1, bias=False),
    )


def conv_bn_connector(in_channels: int, out_channels: int, kernel_size: int = 1) -> nn.Sequential:
    """OFD's connector: a conv (no bias, He-normal over fan-out) then BN, mapping the student's pre-ReLU
    map onto the teacher's channels (official code and mdistiller's ConnectorConvBN)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=(kernel_size - 1) // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # normal(0, sqrt(2 / (k*k*C_out)))
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels))
