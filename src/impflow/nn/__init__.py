"""Networks used inside transforms."""

from .conditioners import MLP, ConvNet, conditioner, unflatten_params
from .lipschitz import ACTIVATIONS, LipschitzMLP, LipSwish, Sine, SpectralLinear, lipschitz_bound
from .made import MADE, MaskedLinear

__all__ = [
    "SpectralLinear", "LipSwish", "Sine", "LipschitzMLP", "lipschitz_bound", "ACTIVATIONS",
    "MLP", "ConvNet", "conditioner", "unflatten_params", "MADE", "MaskedLinear",
]  # fmt: skip
