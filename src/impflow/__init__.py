"""impflow: Implicit Normalizing Flows, Residual Flows and the classic flow family."""

from .flow import Flow, FlowDistribution, StandardNormal
from .transforms import Compose, Inverse, Transform

__version__ = "0.1.0"

__all__ = ["Flow", "FlowDistribution", "StandardNormal", "Transform", "Compose", "Inverse"]
