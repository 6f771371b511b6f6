"""Building blocks shared by the zoo modules.

House rules for every zoo model (forward hooks rely on them):

* no in-place operation anywhere, so a tensor captured by a hook is never changed later;
* a block whose output goes through a final ReLU computes ``preact`` (an ``nn.Identity``)
  on the tensor the ReLU sees and then a separate ``relu`` module;
* the head is ``avgpool`` (adaptive, so any input >= 8x8 works) -> ``flatten`` -> ``fc``.
"""

from __future__ import annotations

from torch import Tensor, nn


def stage(name: str, module: str, preact: str | None, channels: int, reduction: int) -> dict:
    """One ``feature_info`` entry (``reduction`` is for a 32x32 input)."""
    return {
        "name": name,
        "module": module,
        "preact_module": preact,
        "channels": int(channels),
        "reduction": int(reduction),
    }


def set_taps(
    model: nn.Module,
    feature_info: list[dict],
    embedding: str = "flatten",
    classifier: str = "fc",
    pool: str = "avgpool",
) -> None:
    model.feature_info = feature_info
    model.embedding_module = embedding
    model.classifier_module = classifier
    model.pool_module = pool


class ChannelShuffle(nn.Module):
    """Interleave ``groups`` channel groups: (N, g*k, H, W) -> groups of g consecutive channels."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        g = self.groups
        return x.reshape(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


def init_weights(model: nn.Module, linear: str = "default") -> None:
    """Kaiming-normal (fan_out) convolutions with zero bias, BN weight 1 / bias 0.

    ``linear`` picks the classifier init of the reference repository:
    ``default`` (PyTorch's), ``zero_bias``, ``normal001`` (N(0, 0.01), zero bias) or
    ``kaiming`` (kaiming-normal fan_in, zero bias).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear == "default":
                continue
            if linear == "normal001":
                nn.init.normal_(m.weight, 0.0, 0.01)
            elif linear == "kaiming":
                nn.init.kaiming_normal_(m.weight)
            elif linear != "zero_bias":
                raise ValueError(f"unknown linear init {linear!r}")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def head(channels: int, num_classes: int) -> dict[str, nn.Module]:
    """The standard classifier head modules, in order."""
    return {
        "avgpool": nn.AdaptiveAvgPool2d(1),
        "flatten": nn.Flatten(1),
        "fc": nn.Linear(channels, num_classes),
    }
