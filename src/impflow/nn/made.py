"""MADE: Masked Autoencoder for Distribution Estimation (Germain et al. 2015).

Each input i gets a degree d(i) (its position in the autoregressive order, 1…D), each hidden
unit a degree in 1…D−1, and every output a degree equal to that of the input it
parameterises. A weight from unit a to unit b is kept iff d(b) ≥ d(a) between hidden layers
(and from inputs), and iff d(b) > d(a) into the outputs, so output i depends only on the
inputs that come before i in the order: the Jacobian ∂(params_i)/∂x is strictly triangular in
the order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .conditioners import unflatten_params

__all__ = ["MaskedLinear", "MADE"]


class MaskedLinear(nn.Linear):
    """y = (W ⊙ M) x + b with a fixed binary mask M of shape (out_features, in_features)."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """An autoregressive network x (B, D) -> params (B, D, P): params[:, i] depends only on the
    inputs that precede i in ``order``.

    Args:
        features: D.
        params_per_dim: P, the number of parameters output for each dimension.
        hidden: widths of the hidden layers.
        order: a permutation of 0…D−1 giving the autoregressive order (input ``order[0]`` is
            first); default the natural order.
        activation: the hidden nonlinearity.

    The last layer is zero-initialised, so all parameters start at zero.
    """

    def __init__(
        self,
        features: int,
        params_per_dim: int = 2,
        hidden: int | Sequence[int] = (64, 64),
        order: Sequence[int] | Tensor | None = None,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        hidden = [hidden] if isinstance(hidden, int) else list(hidden)
        order = torch.arange(features) if order is None else torch.as_tensor(order)
        if sorted(order.tolist()) != list(range(features)):
            raise ValueError(f"order must be a permutation of 0..{features - 1}")
        self.features, self.params_per_dim = features, params_per_dim
        self.register_buffer("order", order.clone())
        degree_in = torch.empty(features, dtype=torch.long)
        degree_in[order] = torch.arange(1, features + 1)
        # hidden degrees cycle through 1..D-1 (all 0 when D = 1: such outputs are constants)
        low = min(1, features - 1)
        degrees = [degree_in] + [torch.arange(h) % max(features - 1, 1) + low for h in hidden]
        layers: list[nn.Module] = []
        for d_in, d_out in zip(degrees[:-1], degrees[1:]):
            layers += [MaskedLinear(d_out[:, None] >= d_in[None, :]), activation()]
        degree_out = degree_in.repeat_interleave(params_per_dim)
        last = MaskedLinear(degree_out[:, None] > degrees[-1][None, :])
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)

    def forward(self, x: Tensor) -> Tensor:
        return unflatten_params(self.net(x), self.params_per_dim)
