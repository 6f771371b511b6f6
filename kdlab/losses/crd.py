"""Contrastive representation distillation (Tian, Krishnan, Isola, "Contrastive Representation
Distillation", ICLR 2020); reference code: RepDistiller's `crd/` (ContrastMemory, ContrastLoss, Embed).

The student's and the teacher's embeddings are projected (a linear layer each, then L2-normalised) to a
common space. Each sample is scored against its own entry (the positive) and K negatives of other
classes in a memory bank holding one projected embedding per training sample: the student's
embedding against the teacher's bank, the teacher's against the student's. A noise-contrastive
estimation loss separates the positive from the negatives; after the step the banks move towards the
batch's embeddings with momentum. The term therefore needs each sample's index in the training set
(`needs_indices`) and holds the banks as buffers, saved in checkpoints and restored on resume.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from kdlab import distributed
from kdlab.errors import ConfigError, LayerError
from kdlab.losses.base import Outputs, OwnRandomStream, Term, TermOptions, register

EPS = 1e-7  # RepDistiller's ContrastLoss epsilon


def nce_loss(scores: Tensor, n_data: int) -> Tensor:
    r"""RepDistiller's ContrastLoss on (N, 1+K) scores, column 0 the positive, the others noise samples.

    .. math::
        L = -\frac{1}{N}\sum_n \Big[\log\frac{s_{n0}}{s_{n0} + K P_n}
            + \sum_{k\ge1}\log\frac{K P_n}{s_{nk} + K P_n}\Big],
        \quad P_n = 1 / n_{data}

    (with RepDistiller's 1e-7 in both denominators).
    """
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise LayerError(f"crd: expected scores of shape (N, 1 + K), got {tuple(scores.shape)}")
    k = scores.shape[1] - 1
    noise = k / n_data
    log_pos = torch.log(scores[:, 0] / (scores[:, 0] + noise + EPS))
    log_neg = torch.log(noise / (scores[:, 1:] + noise + EPS))
    return -(log_pos.sum() + log_neg.sum()) / scores.shape[0]


def contrast_scores(v: Tensor, bank: Tensor, sample_idx: Tensor, T: float) -> Tensor:
    """exp(<bank[sample_idx[n, j]], v[n]> / T): (N, 1+K) unnormalised scores of each sample's embedding."""
    weight = bank[sample_idx.reshape(-1)].view(*sample_idx.shape, bank.shape[1])  # (N, 1+K, D)
    return torch.exp(torch.bmm(weight, v.unsqueeze(2)).squeeze(2) / T)


def sample_contrast(
    indices: Tensor, labels: Tensor, k: int, mode: str = "exact", generator: torch.Generator | None = None
) -> Tensor:
    """(N, 1+K) bank rows to score: the positive (the sample itself, or in 'relax' mode a random sample of its
    class), then K samples of other classes drawn without replacement (random keys, the K smallest)."""
    y = labels[indices]
    keys = torch.rand(len(indices), len(labels), device=indices.device, generator=generator)
    keys.masked_fill_(labels[None, :] == y[:, None], 2.0)  # same class: never among the K smallest
    negatives = keys.topk(k, dim=1, largest=False).indices
    if mode == "exact":
        positive = indices
    else:
        positive = torch.rand(len(indices), len(labels), device=indices.device, generator=generator)
        positive = positive.masked_fill_(labels[None, :] != y[:, None], 2.0).argmin(1)
    return torch.cat([positive[:, None], negatives], dim=1)


class CRDOptions(TermOptions):
    weight: float = Field(
        default=0.8, ge=0, description="beta; RepDistiller's CRD weight (with CE 1, or CE 1 + KD 1 for CRD+KD)"
    )
    feat_dim: int = Field(default=128, ge=1, description="dimension of the projected embeddings")
    nce_k: int = Field(default=16384, ge=1, description="negatives per sample")
    nce_t: float = Field(default=0.07, gt=0, description="temperature of the scores")
    nce_m: float = Field(default=0.5, ge=0, lt=1, description="momentum of the memory-bank update")
    mode: Literal["exact", "relax"] = Field(
        default="exact",
        description="exact: the positive is the sample itself; relax: "
        "a random sample of the same class (RepDistiller's two modes)",
    )
    student_layers: list[str] | None = None
    teacher_layers: list[str] | None = None


@register
class CRD(OwnRandomStream, Term):
    """CRD. RepDistiller's CIFAR-100 recipe: `loss: {ce: 1.0, terms: {crd: {weight: 0.8}}}` (+ `kd: {weight: 1, T: 4}`
    for CRD+KD). Negatives are drawn without replacement from the other classes, as RepDistiller's data set
    does; the banks start uniform in +-1/sqrt(feat_dim/3) and the normalisers Z are fixed by the first batch."""

    name = "crd"
    Options = CRDOptions
    reads_teacher_features = True
    needs_indices = True
    default_student_layers = "embedding"
    default_teacher_layers = "embedding"

    def __init__(self, opts, student, teachers):
        super().__init__(opts, student, teachers)
        if len(teachers) != 1:
            raise ConfigError(f"loss.terms.crd: CRD distils one teacher, got {len(teachers)}")
        if len(self.student_layers) != 1:
            raise ConfigError(f"loss.terms.crd: one student layer and one teacher layer, got {self.student_layers}")
        self.embed_s: nn.Module | None = None
        self.embed_t: nn.Module | None = None

    def build(self, probe: Outputs) -> None:
        s = probe.feats[self.student_layers[0]].flatten(1)
        t = probe.teacher_feats[0][self.teacher_layers[0][0]].flatten(1)
        self.embed_s = nn.Linear(s.shape[1], self.opts.feat_dim)
        self.embed_t = nn.Linear(t.shape[1], self.opts.feat_dim)

    def attach_training_set(self, labels: Tensor) -> None:
        """One bank row per training sample, and the class layout that negative sampling draws from."""
        n = len(labels)
        pool = n - int(torch.bincount(labels).max())
        if self.opts.nce_k > pool:
            raise ConfigError(
                f"loss.terms.crd.nce_k={self.opts.nce_k}: the largest class leaves only {pool} negatives "
                f"among the {n} training samples; lower nce_k"
            )
        stdv = 1.0 / math.sqrt(self.opts.feat_dim / 3)
        device = next(self.parameters()).device if any(True for _ in self.parameters()) else labels.device
        for name in ("memory_s", "memory_t"):
            self.register_buffer(name, torch.rand(n, self.opts.feat_dim, device=device).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z_s", torch.full((), -1.0, device=device))  # < 0: not yet fixed by the first batch
        self.register_buffer("z_t", torch.full((), -1.0, device=device))
        self.register_buffer("labels", labels.to(device=device, dtype=torch.int64), persistent=False)
        self.start_stream(device)  # the negatives' own stream, seeded at attach time, advanced alike on every rank

    @property
    def n_data(self) -> int:
        return self.memory_s.shape[0]

    def sample(self, indices: Tensor) -> Tensor:
        """(N, 1+K): each sample's positive, then K negatives of other classes drawn without replacement; under
        torchrun drawn for the global batch on every rank, each rank keeping its own rows."""
        everyone = distributed.gather_batch(indices)
        rows = sample_contrast(everyone, self.labels, self.opts.nce_k, self.opts.mode, self.sampler)
        start = distributed.rank() * len(indices) if distributed.world_size() > 1 else 0
        return rows[start : start + len(indices)]

    def forward(self, out: Outputs) -> Tensor:
        if out.indices is None:
            raise LayerError(
                "crd: needs each sample's index in the training set, which kdlab's trainer passes; "
                "call the Distiller with indices=<(N,) int64>"
            )
        if not hasattr(self, "memory_s"):
            raise LayerError(
                "crd: no memory bank yet: call Distiller.attach_training_set(train_labels) before training"
            )
        f_s = nn.functional.normalize(self.embed_s(out.feats[self.student_layers[0]].flatten(1).float()), dim=1)
        f_t = nn.functional.normalize(
            self.embed_t(out.teacher_feats[0][self.teacher_layers[0][0]].flatten(1).float()), dim=1
        )
        with torch.no_grad():
            sample_idx = self.sample(out.indices)
        out_s = contrast_scores(f_s, self.memory_t, sample_idx, self.opts.nce_t)  # student vs the teacher's bank
        out_t = contrast_scores(f_t, self.memory_s, sample_idx, self.opts.nce_t)  # teacher vs the student's bank
        with torch.no_grad():  # Z from the first batch (over every rank), then fixed: no host sync either way
            for z, scores in ((self.z_s, out_s), (self.z_t, out_t)):
                first = distributed.sum_over_ranks(scores.mean()) / distributed.world_size() * self.n_data
                z.copy_(torch.where(z < 0, first, z))
        loss = nce_loss(out_s / self.z_s, self.n_data) + nce_loss(out_t / self.z_t, self.n_data)
        if self.training:
            self.update_banks(out.indices, f_s.detach(), f_t.detach())
        return loss

    @torch.no_grad()
    def update_banks(self, indices: Tensor, f_s: Tensor, f_t: Tensor) -> None:
        """bank[i] <- normalise(m * bank[i] + (1 - m) * f_i), with every rank's samples, so all ranks hold one bank."""
        indices, f_s, f_t = (
            distributed.gather_batch(indices),
            distributed.gather_batch(f_s),
            distributed.gather_batch(f_t),
        )
        m = self.opts.nce_m
        for bank, f in ((self.memory_s, f_s), (self.memory_t, f_t)):
            bank.index_copy_(0, indices, nn.functional.normalize(bank[indices] * m + f * (1 - m), dim=1))
