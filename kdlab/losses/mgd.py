"""Masked generative distillation (MGD: Yang, Li, Shao, Shi, Yuan, Yuan, "Masked Generative Distillation",
ECCV 2022, arXiv 2205.01529), in its classification form.

The student does not imitate the teacher's feature map directly: a random part of its own (aligned) map is
masked and a small generator must rebuild the teacher's whole map from what is left. As coded in the official
repository `yzd-v/MGD` (`cls/mmcls/distillation/losses/mgd.py`, ``MGDLoss``; wiring in
`cls/mmcls/distillation/distillers/classification_distiller.py`, which feeds it the last backbone stage of both
networks, the teacher without grad, beside the student's plain cross-entropy and no logit KD):

- the mask is per sample and per **channel** (``rand(N, C, 1, 1) < lambda`` zeroes a channel); the paper's
  spatial mask is the detection and segmentation code's, not the classification code's;
- ``align`` is a 1x1 convolution with bias, present only when the channel counts differ;
- the generator is conv3x3 -> ReLU -> conv3x3 (C_t -> C_t, bias, PyTorch's default initialisation);
- the error is a squared error **summed** over every element and divided by the batch size (not a mean), times
  ``alpha_mgd`` (7e-5 for ImageNet ResNet-34 -> ResNet-18, `cls/configs/distillers/res34_distill_res18_img.py`).

The mask here comes from the term's own CPU random stream (seeded from the run's, saved in checkpoints): a resumed
run draws the masks the uninterrupted one did, a CUDA run the masks a CPU run does, and under torchrun the masks
are drawn for the global batch so that each rank masks its samples as one process would.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from kdlab import distributed
from kdlab.errors import ConfigError
from kdlab.losses.base import Outputs, OwnRandomStream, Term, TermOptions, register
from kdlab.losses.checks import as_float


def channel_mask(n: int, c: int, ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """(n, c, 1, 1) float32 of 0 and 1 on the CPU: each sample's channel is 0 with probability ``ratio``."""
    u = torch.rand(n, c, generator=generator)
    return (u >= ratio).to(torch.float32)[:, :, None, None]


def generation_error(generated: Tensor, teacher_map: Tensor) -> Tensor:
    r"""``sum((G - F_t)^2) / N``: MGD's squared error, summed over channels and positions, averaged over samples."""
    if generated.shape != teacher_map.shape:
        raise ConfigError(
            f"mgd: the generated map {tuple(generated.shape)} and the teacher's {tuple(teacher_map.shape)} differ"
        )
    generated, teacher_map = as_float(generated, teacher_map)
    return (generated - teacher_map).pow(2).sum() / generated.shape[0]


def generator_block(channels: int) -> nn.Sequential:
    """conv3x3 -> ReLU -> conv3x3 on the teacher's channel count, as the official ``generation`` block."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, channels, kernel_size=3, padding=1),
    )


class MGDOptions(TermOptions):
    weight: float = Field(
        default=7e-5,
        ge=0,
        description="alpha_mgd: multiplies the summed squared error / N (it grows with C*H*W: retune per pair)",
    )
    mask_ratio: float = Field(
        default=0.15, ge=0, lt=1, description="lambda_mgd: the probability that a channel of a sample is masked"
    )
    student_layers: list[str] | None = None
    teacher_layers: list[str] | None = None


@register
class MGD(OwnRandomStream, Term):
    """``alpha * sum((G(align(F_s) * M) - F_t)^2) / N`` on the last stage of one teacher."""

    name = "mgd"
    Options = MGDOptions
    reads_teacher_features = True
    default_student_layers = "last"
    default_teacher_layers = "last"
    draws_random = True

    def __init__(self, opts, student, teachers):
        super().__init__(opts, student, teachers)
        if len(teachers) != 1:
            raise ConfigError(f"loss.terms.mgd: MGD distils one teacher, got {len(teachers)}")
        if len(self.student_layers) != 1:
            raise ConfigError(f"loss.terms.mgd: one student layer and one teacher layer, got {self.student_layers}")
        self.align: nn.Module | None = None
        self.generation: nn.Module | None = None

    def build(self, probe: Outputs) -> None:
        (s, t), *_ = self.layer_pairs(probe)
        if s.dim() != 4 or t.dim() != 4:
            raise ConfigError(f"mgd: needs (N, C, H, W) feature maps, got {tuple(s.shape)} and {tuple(t.shape)}")
        if s.shape[-2:] != t.shape[-2:]:
            raise ConfigError(
                f"mgd: spatial sizes differ, student {tuple(s.shape[1:])} vs teacher {tuple(t.shape[1:])} "
                f"(layers {self.student_layers[0]} / {self.teacher_layers[0][0]}); tap layers of the same size"
            )
        c_s, c_t = s.shape[1], t.shape[1]
        self.align = nn.Conv2d(c_s, c_t, kernel_size=1) if c_s != c_t else nn.Identity()
        self.generation = generator_block(c_t)
        self.start_stream()  # on the CPU: a CUDA run draws the masks a CPU run does

    def forward(self, out: Outputs) -> Tensor:
        (s, t), *_ = self.layer_pairs(out)
        aligned = self.align(s)
        n, c = aligned.shape[:2]
        world = distributed.world_size()
        mask = channel_mask(n * world, c, self.opts.mask_ratio, self.sampler)
        if world > 1:  # every rank draws the global batch's masks and keeps its own rows
            mask = mask[distributed.rank() * n : (distributed.rank() + 1) * n]
        mask = mask.to(device=aligned.device, dtype=aligned.dtype, non_blocking=True)
        return generation_error(self.generation(aligned * mask), t.detach())
