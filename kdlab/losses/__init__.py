"""Loss terms by name. `functional`, `relational` and `feature_functional` hold the pure maths; each other module is one method."""

from kdlab.losses.base import TERMS, Outputs, Term, TermOptions, register
from kdlab.losses import ab, at, cc, crd, dist, dkd, feed, fitnet, fsp, kd, lp, lsr, nst, ofd, pkt, reviewkd, rkd, sp, vid  # noqa: F401  (registration)

__all__ = ["TERMS", "Outputs", "Term", "TermOptions", "register"]
