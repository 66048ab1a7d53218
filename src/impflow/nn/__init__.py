"""Networks used inside transforms."""

from .lipschitz import ACTIVATIONS, LipschitzMLP, LipSwish, Sine, SpectralLinear, lipschitz_bound

__all__ = ["SpectralLinear", "LipSwish", "Sine", "LipschitzMLP", "lipschitz_bound", "ACTIVATIONS"]
