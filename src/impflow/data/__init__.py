"""Datasets: generated 2-D toy densities (:mod:`impflow.data.toy2d`)."""

from . import toy2d

__all__ = ["toy2d"]
