"""Model builders, each returning an :class:`impflow.Flow`."""

from .classic import dlf, glow, linear, maf, nsf, realnvp
from .residual import impflow, resflow

__all__ = ["resflow", "impflow", "realnvp", "glow", "maf", "nsf", "dlf", "linear"]
