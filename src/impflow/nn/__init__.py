"""Networks used inside transforms."""

from .conditioners import MLP, ConvNet, conditioner, unflatten_params
from .lipschitz import ACTIVATIONS, LipschitzMLP, LipSwish, Sine, SpectralLinear, lipschitz_bound, sync_spectral
from .lipschitz_conv import LipschitzConvNet, SpectralConv2d
from .made import MADE, MaskedLinear

__all__ = [
    "SpectralLinear", "LipSwish", "Sine", "LipschitzMLP", "lipschitz_bound", "sync_spectral", "ACTIVATIONS",
    "SpectralConv2d", "LipschitzConvNet",
    "MLP", "ConvNet", "conditioner", "unflatten_params", "MADE", "MaskedLinear",
]  # fmt: skip
