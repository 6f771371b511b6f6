"""Loss terms by name. `functional`, `relational` and `feature_functional` hold the pure maths, `checks`
their shared input checks and precision rule, `class_maps` the classifier applied to a feature map (CAT-KD, SDD);
each other module is one method."""

# importing the method modules registers their terms
from kdlab.losses import (
    ab,
    at,
    cat_kd,
    cc,
    crd,
    ctkd,
    dist,
    dkd,
    feed,
    fitnet,
    fsp,
    kd,
    lp,
    lsr,
    mgd,
    nkd,
    nst,
    ofd,
    pkt,
    reviewkd,
    rkd,
    sdd,
    sp,
    ttm,
    uskd,
    vid,
)
from kdlab.losses.base import TERMS, Outputs, ParamGroup, Term, TermOptions, register

__all__ = ["TERMS", "Outputs", "ParamGroup", "Term", "TermOptions", "register"]
