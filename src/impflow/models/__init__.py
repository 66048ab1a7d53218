"""Model builders, each returning an :class:`impflow.Flow`."""

from .residual import impflow, resflow

__all__ = ["resflow", "impflow"]
