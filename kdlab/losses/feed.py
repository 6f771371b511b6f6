"""Factor Transfer (Kim, Park, Kwak, NeurIPS 2018) and FEED (Park & Kwak 2019).

One translator per teacher on the student's last feature map, each matched (L2-normalised, L1) to
its teacher's map (FEED) or to the teacher's paraphrased factor (FT, and FEED with `paraphraser`).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from kdlab.losses import functional as F
from kdlab.losses.base import Outputs, PreStage, Term, TermOptions, pool_to_match, register
from kdlab.losses.heads import Paraphraser, factor_channels, translator


class FeedOptions(TermOptions):
    weight: float = Field(default=500.0, ge=0, description="beta, for the L1 mean over N*C*H*W (official FT reduction)")
    paraphraser: bool = Field(
        default=False, description="match each teacher's paraphrased factor (FT) instead of its raw map"
    )
    rate: float = Field(
        default=0.5, gt=0, le=4, description="paraphrase rate k: factor channels = k * teacher channels"
    )
    paraphraser_epochs: int = Field(default=6, ge=1)
    paraphraser_lr: float = Field(default=0.1, gt=0)
    recon: Literal["l1", "l2"] = Field(
        default="l1", description="paraphraser reconstruction loss: l1 (official code) or l2 (paper)"
    )
    distance: Literal["factor", "attention"] = Field(
        default="factor",
        description="factor: L1 between normalised flattened maps (official); "
        "attention: RepDistiller's AT-like variant (L1 between normalised channel-mean squared maps)",
    )
    translator_bn: bool = Field(default=False, description="BN in the translator (RepDistiller) or not (official)")
    student_layers: list[str] | None = None
    teacher_layers: list[str] | None = None
    pool: bool = Field(
        default=False,
        description="when the spatial sizes differ, average-pool the larger of the translator "
        "output and the teacher's factor (or map) to the smaller one, after the translator and the "
        "paraphraser's encoder, as RepDistiller's FactorTransfer does; the paraphraser trains on the "
        "unpooled teacher map",
    )


@register
class FEED(Term):
    """pFEED: `sum_t weight * factor(Tr_t(F_s), target_t)` over the teachers; sFEED uses it per generation."""

    name = "feed"
    Options = FeedOptions
    reads_teacher_features = True
    default_student_layers = "last"
    default_teacher_layers = "last"

    def build(self, probe: Outputs) -> None:
        s_spec = self.student_layers[0]
        cs = probe.feats[s_spec].shape[1]
        self.paraphrasers = nn.ModuleList()
        self.translators = nn.ModuleList()
        for i, t_layers in enumerate(self.teacher_layers):
            ct = probe.teacher_feats[i][t_layers[0]].shape[1]
            out_ch = factor_channels(ct, self.opts.rate) if self.opts.paraphraser else ct
            self.translators.append(translator(cs, out_ch, bn=self.opts.translator_bn))
            if self.opts.paraphraser:
                para = Paraphraser(ct, self.opts.rate)
                para.requires_grad_(False)  # trained in its own stage, then frozen
                self.paraphrasers.append(para)

    def target(self, i: int, ft: torch.Tensor) -> torch.Tensor:
        if not self.opts.paraphraser:
            return ft
        with torch.no_grad():
            return self.paraphrasers[i].encoder(ft)

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.opts.distance == "factor":
            return F.factor(a, b)
        return (F.attention_map(a) - F.attention_map(b)).abs().mean()

    def forward(self, out: Outputs) -> torch.Tensor:
        total = out.logits.new_zeros((), dtype=torch.float32)
        fs_all = out.feats[self.student_layers[0]]
        for i, t_layers in enumerate(self.teacher_layers):
            # pool the factors, not the maps: the translator and the paraphraser (trained on the teacher's
            # unpooled map) see full-size inputs, as in RepDistiller's FactorTransfer.factor_loss
            fs, ft = pool_to_match(
                self.translators[i](fs_all),
                self.target(i, out.teacher_feats[i][t_layers[0]]),
                self.opts.pool,
                f"{self.name} teacher {i}",
            )
            total = total + self.distance(fs, ft)
        return total

    def pre_stages(self, student, forward) -> list[PreStage]:
        if not self.opts.paraphraser:
            return []
        stages = []
        for i, para in enumerate(self.paraphrasers):
            layer = self.teacher_layers[i][0]

            def recon(x, y, i=i, para=para, layer=layer):
                with torch.no_grad():
                    ft = forward(x, y, student=False).teacher_feats[i][layer].float()
                return F.recon_error(para(ft), ft, kind=self.opts.recon)

            stages.append(
                PreStage(
                    f"{self.name}_paraphraser{i}",
                    {"paraphraser": para},
                    para.parameters,
                    recon,
                    self.opts.paraphraser_epochs,
                    self.opts.paraphraser_lr,
                    f"loss.terms.{self.name}.paraphraser_lr",
                    trainable_only_here=True,
                )
            )
        return stages


class FTOptions(FeedOptions):
    paraphraser: bool = True


@register
class FT(FEED):
    """Factor transfer: FEED's loss with each teacher's map replaced by its paraphraser's factor."""

    name = "ft"
    Options = FTOptions
