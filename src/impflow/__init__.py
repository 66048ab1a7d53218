"""impflow: Implicit Normalizing Flows, Residual Flows and the classic flow family."""

from . import models, nn, solvers, transforms
from .flow import Flow, FlowDistribution, StandardNormal
from .logdet import LogDetConfig, exact_logdet
from .nn import LipschitzMLP, lipschitz_bound
from .solvers import ConvergenceError, ConvergenceWarning, SolverConfig
from .transforms import ActNorm, Compose, ImplicitBlock, Inverse, ResidualBlock, Transform
from .train import load

__version__ = "0.1.0"

__all__ = [
    "Flow",
    "FlowDistribution",
    "StandardNormal",
    "Transform",
    "Compose",
    "Inverse",
    "ResidualBlock",
    "ImplicitBlock",
    "ActNorm",
    "LipschitzMLP",
    "lipschitz_bound",
    "LogDetConfig",
    "exact_logdet",
    "SolverConfig",
    "ConvergenceWarning",
    "ConvergenceError",
    "models",
    "nn",
    "solvers",
    "transforms",
    "load",
]
