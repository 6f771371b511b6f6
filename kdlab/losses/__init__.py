"""Loss terms by name. `functional` holds the pure maths; each other module is one method."""

from kdlab.losses.base import TERMS, Outputs, Term, TermOptions, register
from kdlab.losses import at, dkd, feed, fitnet, kd, lp, lsr, nst  # noqa: F401  (registration)

__all__ = ["TERMS", "Outputs", "Term", "TermOptions", "register"]
