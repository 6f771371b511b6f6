"""The methods kdlab offers, by name: each is a recipe shape (loss terms, teachers, generations).

A method name in a recipe is checked against this table: the terms it names must be present, so a
recipe called `nst` really trains with the NST term. Methods add no code of their own to the loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdlab.errors import ConfigError


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    terms: tuple[str, ...] = ()
    teachers: str = "given"  # 'none' | 'given' | 'generations'
    paper: str = ""


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("vanilla", "cross-entropy only: the baseline", teachers="none"),
        Method("kd", "Hinton KD, T^2-scaled batch-mean KL", ("kd",), paper="Hinton et al. 2015"),
        Method("ensemble_kd", "KD from the averaged logits of several teachers", ("ensemble_kd",)),
        Method(
            "fitnet",
            "hint regressor + hint stage, then KD (single-stage as an option)",
            ("fitnet",),
            paper="Romero et al. 2015",
        ),
        Method("at", "attention transfer over the chosen stages", ("at",), paper="Zagoruyko & Komodakis 2017"),
        Method(
            "nst",
            "MMD^2 between neuron selectivity patterns (linear, poly, gaussian)",
            ("nst",),
            paper="Huang & Wang 2017",
        ),
        Method(
            "sp",
            "similarity-preserving: the batch Gram matrix of the last feature map",
            ("sp",),
            paper="Tung & Mori 2019",
        ),
        Method(
            "cc",
            "correlation congruence: the batch correlation of embedded features",
            ("cc",),
            paper="Peng et al. 2019",
        ),
        Method(
            "vid",
            "variational information distillation: a Gaussian likelihood per stage, learned variances",
            ("vid",),
            paper="Ahn et al. 2019",
        ),
        Method(
            "rkd",
            "relational KD: pairwise distances and triplet angles of the embeddings",
            ("rkd",),
            paper="Park et al. 2019",
        ),
        Method(
            "pkt",
            "probabilistic knowledge transfer: cosine-similarity distributions over the batch",
            ("pkt",),
            paper="Passalis & Tefas 2018",
        ),
        Method(
            "ab",
            "activation boundaries: an initialisation stage on pre-ReLU maps, then training",
            ("ab",),
            paper="Heo et al. 2019 (AAAI)",
        ),
        Method(
            "fsp",
            "flow of solution procedure: an initialisation stage on Gram matrices between stages",
            ("fsp",),
            paper="Yim et al. 2017",
        ),
        Method(
            "ofd",
            "overhaul of feature distillation: pre-ReLU partial L2 with the teacher's margin",
            ("ofd",),
            paper="Heo et al. 2019 (ICCV)",
        ),
        Method(
            "dist",
            "inter- and intra-class Pearson correlation of the predictions",
            ("dist",),
            paper="Huang et al. 2022",
        ),
        Method(
            "lp",
            "locality-preserving loss over k nearest neighbours in the teacher's feature space",
            ("lp",),
            paper="Chen et al. 2018",
        ),
        Method(
            "ft",
            "factor transfer: paraphraser on the teacher, translator on the student",
            ("ft",),
            paper="Kim, Park, Kwak 2018",
        ),
        Method(
            "pfeed",
            "parallel FEED: K teachers, K translators on the student's feature map",
            ("feed",),
            paper="Park & Kwak 2019",
        ),
        Method(
            "sfeed",
            "sequential FEED: each generation's student teaches the next at feature level",
            ("feed",),
            "generations",
            "Park & Kwak 2019",
        ),
        Method(
            "ban",
            "born-again generations with logit KD; BANE ensemble evaluation",
            ("kd",),
            "generations",
            "Furlanello et al. 2018",
        ),
        Method(
            "tfkd_self",
            "teacher-free self-distillation: train the student, then teach a fresh copy",
            ("kd",),
            "generations",
            "Yuan et al. 2020",
        ),
        Method(
            "tfkd_reg",
            "teacher-free regularisation with the manually designed distribution",
            ("tfkd_reg",),
            "none",
            "Yuan et al. 2020",
        ),
        Method("lsr", "label smoothing", ("lsr",), "none", "Szegedy et al. 2016"),
        Method(
            "crd",
            "contrastive representation distillation: NCE against a memory bank of the other network's embeddings",
            ("crd",),
            paper="Tian et al. 2020",
        ),
        Method(
            "reviewkd",
            "knowledge review: student stages fused deep to shallow (ABF), matched by the hierarchical context loss",
            ("reviewkd",),
            paper="Chen et al. 2021",
        ),
        Method(
            "dkd",
            "decoupled KD: target and non-target parts weighted apart, with a warm-up",
            ("dkd",),
            paper="Zhao et al. 2022",
        ),
        Method(
            "ctkd",
            "curriculum temperature: KD (or DKD) at a learned temperature behind a gradient-reversal layer",
            ("ctkd",),
            paper="Li et al. 2023 (AAAI)",
        ),
        Method(
            "nkd",
            "normalized KD: the teacher's target probability, and CE over the renormalised non-target classes",
            ("nkd",),
            paper="Yang et al. 2023 (ICCV)",
        ),
        Method(
            "ttm",
            "transformed teacher matching: the student at T=1 matches the power-transformed teacher (no T^2)",
            ("ttm",),
            paper="Zheng & Yang 2024 (ICLR)",
        ),
        Method(
            "wttm",
            "weighted TTM: each sample's TTM term weighted by the teacher's power sum (a Renyi-entropy weight)",
            ("wttm",),
            paper="Zheng & Yang 2024 (ICLR)",
        ),
        Method(
            "mgd",
            "masked generative distillation: a generator rebuilds the teacher's last map from the masked student's",
            ("mgd",),
            paper="Yang et al. 2022 (ECCV)",
        ),
        Method(
            "uskd",
            "teacher-free NKD: the student's own customised target and Zipf non-target labels, a weak head mid-network",
            ("uskd",),
            "none",
            "Yang et al. 2023 (ICCV)",
        ),
        Method(
            "sdd",
            "scale decoupled KD: KD on the logits of every SPP region through the classifier, complementary regions x2",
            ("sdd",),
            paper="Wei et al. 2024 (CVPR)",
        ),
        Method(
            "sdd_dkd",
            "scale decoupled DKD: DKD on the logits of every SPP region, complementary regions x2, with a warm-up",
            ("sdd_dkd",),
            paper="Wei et al. 2024 (CVPR)",
        ),
        Method(
            "cat_kd",
            "class attention transfer: MSE between pooled class activation maps of bias-free classifiers",
            ("cat_kd",),
            paper="Guo et al. 2023 (CVPR)",
        ),
    ]
}


def check_recipe(recipe) -> None:
    """The recipe has what its method needs (terms present; teachers or generations as the method says)."""
    method = METHODS[recipe.method]
    missing = [t for t in method.terms if t not in recipe.loss.terms]
    if missing:
        raise ConfigError(f"method {method.name!r} needs loss term(s) {', '.join(missing)} in loss.terms")
    if method.teachers == "generations" and recipe.generations < 1:
        raise ConfigError(f"method {method.name!r} trains generations: set generations >= 1")
    if method.teachers == "given" and not recipe.teachers:
        raise ConfigError(f"method {method.name!r} needs at least one entry in 'teachers'")
    check_fast_path(recipe)
    check_optimizer(recipe)


def check_optimizer(recipe) -> None:
    """DOT's two backward passes per forward are not what DDP's gradient hooks expect (mdistiller issue #52: the
    official DOT ran under DataParallel), so it is refused under torchrun rather than run wrong."""
    from kdlab import distributed

    if recipe.train.optimizer == "dot" and distributed.world_size() > 1:
        raise ConfigError(
            "train.optimizer: dot takes two backward passes per step, which DDP under torchrun does not support; "
            "run it in one process, or use optimizer: sgd"
        )


def check_fast_path(recipe) -> None:
    """Terms that read the training progress or the samples' indices run in the eager step only: the graph
    step replays one captured function whose inputs are the batch and the teachers' logits."""
    from kdlab.losses import TERMS

    if recipe.train.fast.graph_step:
        for name in recipe.loss.terms:
            term = TERMS.get(name)
            if term is None:
                continue
            if term.needs_progress or term.needs_indices:
                what = "the training progress" if term.needs_progress else "each sample's index"
                raise ConfigError(
                    f"train.fast.graph_step: loss term {name!r} reads {what}, which the graph step does not "
                    "pass; set train.fast.graph_step=false for this recipe"
                )
            if term.draws_random:
                raise ConfigError(
                    f"train.fast.graph_step: loss term {name!r} draws new random numbers every step, which a "
                    "captured graph would replay unchanged; set train.fast.graph_step=false for this recipe"
                )
