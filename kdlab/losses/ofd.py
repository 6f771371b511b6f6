"""A comprehensive overhaul of feature distillation (Heo, Kim, Yun, Park, Kwak, Choi, ICCV 2019).

Student pre-ReLU maps, through a 1x1 conv + BN connector, are pulled towards the teacher's pre-ReLU
maps with a partial L2 that ignores the teacher's negative values below a per-channel margin. The
margin is the expected negative response of the teacher's channel, read from the BatchNorm that
produces the pre-ReLU map.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as nnf
from pydantic import Field
from torch import nn

from kdlab import taps
from kdlab.errors import LayerError
from kdlab.losses import feature_functional as FF
from kdlab.losses.base import Outputs, Term, TermOptions, register
from kdlab.losses.heads import conv_bn_connector

_BN = nn.modules.batchnorm._BatchNorm


def bn_before(model: nn.Module, spec: str, role: str = "teacher") -> nn.Module:
    """The BatchNorm whose output (alone, or plus a shortcut) is the pre-ReLU map tapped at ``spec``.

    The tapped module is that BN itself (pre-activation WRN), or a module (the zoo's ``preact``
    identity) after which the BN is the closest earlier sibling with no convolution in between
    (skipping shortcut containers): ``bn2`` of a basic block, ``bn3`` of a bottleneck, the last BN of
    a VGG block. A BN already folded into its conv (an ``nn.Identity`` left in its place, or a conv
    met first) is refused rather than mistaken for another one.
    """
    base = taps.unwrap(model)
    name = taps.resolve(base, spec, role)
    modules = dict(base.named_modules())
    module = modules[name]
    if isinstance(module, _BN):
        return module
    parent_name, _, child = name.rpartition(".")
    parent = modules[parent_name] if parent_name else base
    siblings = list(parent.named_children())
    names = [n for n, _ in siblings]
    for _sib_name, sib in reversed(siblings[: names.index(child)]):
        if isinstance(sib, _BN):
            return sib
        if isinstance(sib, (nn.Conv2d, nn.Identity)):
            break
    raise LayerError(
        f"ofd: cannot find the BatchNorm before the ReLU of {role} layer {spec!r} ({name}), whose statistics give "
        "the margin; tap pre-ReLU layers that follow a BatchNorm (the zoo's 'stageN:pre'), on a teacher whose "
        "BatchNorm is not folded"
    )


class OFDOptions(TermOptions):
    weight: float = Field(
        default=0.001,
        ge=0,
        description="for the partial L2 summed over C, H, W and averaged over N "
        "(the official code's / batch / 1000; mdistiller's 0.001)",
    )
    kernel_size: int = Field(default=1, ge=1, description="kernel of the connector's conv (official: 1)")
    pool: bool = Field(
        default=True, description="average-pool the teacher map to the student's size when they differ (mdistiller)"
    )
    teacher_mode: Literal["eval", "train"] = Field(
        default="eval",
        description="the teacher's mode while the student trains: eval (running statistics, kdlab's default) or "
        "train (BatchNorm on batch statistics, running statistics updated: the official code's and mdistiller's "
        "distillers); train turns off BatchNorm folding and the teacher-logit cache",
    )
    student_layers: list[str] | None = None
    teacher_layers: list[str] | None = None


@register
class OFD(Term):
    """`sum_l 2^-(L-1-l) * OFD(connector_l(s_l), t_l, margin_l)`; defaults to every stage before its ReLU
    (`stageN:pre`)."""

    name = "ofd"
    Options = OFDOptions
    reads_teacher_features = True
    default_student_layers = "all:pre"
    default_teacher_layers = "all:pre"

    def __init__(self, opts, student, teachers):
        super().__init__(opts, student, teachers)
        self.teacher_train_mode = opts.teacher_mode == "train"
        # from the teacher as given, before any BatchNorm folding of the fast path
        self._margins = [
            FF.ofd_margin(bn.weight, bn.bias) for bn in (bn_before(teachers[0], t) for t in self.teacher_layers[0])
        ]

    def build(self, probe: Outputs) -> None:
        self.connectors = nn.ModuleList()
        for i, (s, t) in enumerate(zip(self.student_layers, self.teacher_layers[0])):
            cs, ct = probe.feats[s].shape[1], probe.teacher_feats[0][t].shape[1]
            if self._margins[i].shape[0] != ct:
                raise LayerError(
                    f"ofd: teacher layer {t!r} has {ct} channels but its BatchNorm {self._margins[i].shape[0]}"
                )
            self.connectors.append(conv_bn_connector(cs, ct, self.opts.kernel_size))
            self.register_buffer(f"margin{i}", self._margins[i].clone())

    def _teacher_map(self, fs: torch.Tensor, ft: torch.Tensor, i: int) -> torch.Tensor:
        if ft.shape[-2:] == fs.shape[-2:]:
            return ft
        if not self.opts.pool:
            raise LayerError(
                f"ofd {self.student_layers[i]}/{self.teacher_layers[0][i]}: spatial sizes differ, "
                f"student {tuple(fs.shape[1:])} vs teacher {tuple(ft.shape[1:])}; "
                "set the term's option pool: true to average-pool the teacher map to the student's"
            )
        return nnf.adaptive_avg_pool2d(ft, fs.shape[-2:])

    def forward(self, out: Outputs) -> torch.Tensor:
        total = out.logits.new_zeros((), dtype=torch.float32)
        n = len(self.student_layers)
        for i, (conn, (s, t)) in enumerate(zip(self.connectors, self.layer_pairs(out))):
            fs = conn(s)
            ft = self._teacher_map(fs, t, i)
            total = total + FF.ofd(fs, ft, getattr(self, f"margin{i}")) / 2.0 ** (n - 1 - i)
        return total
