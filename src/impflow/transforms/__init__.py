"""Bijections x -> z with log-determinants. See :mod:`impflow.transforms.base` for the contract."""

from .base import Compose, Inverse, Transform, check_input
from .implicit import ImplicitBlock
from .normalization import ActNorm
from .residual import ResidualBlock

__all__ = ["Transform", "Compose", "Inverse", "check_input", "ResidualBlock", "ImplicitBlock", "ActNorm"]
