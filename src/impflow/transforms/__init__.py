"""Bijections x -> z with log-determinants. See :mod:`impflow.transforms.base` for the contract."""

from .autoregressive import InverseAutoregressive, MaskedAutoregressive
from .base import Compose, Inverse, NonFiniteError, Transform, check_input, layers, recording
from .coupling import (
    AdditiveTransformer,
    AffineTransformer,
    Coupling,
    ElementwiseTransformer,
    PiecewiseLinearTransformer,
    SplineTransformer,
    alternating_mask,
    channel_mask,
    checkerboard_mask,
    half_mask,
    make_transformer,
    soft_clamp,
)
from .dlf import DynamicLinear
from .elementwise import (
    LeakyReLU,
    Logit,
    PiecewiseLinear,
    RationalQuadraticSpline,
    Sigmoid,
    piecewise_linear,
    rational_quadratic_spline,
)
from .implicit import ImplicitBlock
from .linear import (
    Diagonal,
    FullLinear,
    InvertibleConv1x1,
    LinearTransform,
    LULinear,
    Orthogonal,
    Permutation,
    Triangular,
)
from .normalization import ActNorm
from .reshape import MultiScale, Split, Squeeze
from .residual import ResidualBlock

__all__ = [
    # contract
    "Transform", "Compose", "Inverse", "NonFiniteError", "check_input", "layers", "recording",
    # residual / implicit
    "ResidualBlock", "ImplicitBlock",
    # linear
    "LinearTransform", "Diagonal", "Triangular", "Orthogonal", "FullLinear", "LULinear",
    "Permutation", "InvertibleConv1x1",
    # elementwise
    "LeakyReLU", "PiecewiseLinear", "RationalQuadraticSpline", "Sigmoid", "Logit",
    "piecewise_linear", "rational_quadratic_spline",
    # coupling
    "Coupling", "ElementwiseTransformer", "AffineTransformer", "AdditiveTransformer",
    "PiecewiseLinearTransformer", "SplineTransformer", "make_transformer", "soft_clamp",
    "half_mask", "alternating_mask", "checkerboard_mask", "channel_mask",
    # autoregressive
    "MaskedAutoregressive", "InverseAutoregressive",
    # multi-scale
    "ActNorm", "Squeeze", "Split", "MultiScale",
    # dynamic linear flow
    "DynamicLinear",
]  # fmt: skip
