"""Conditioner networks: the small nets that output the parameters of coupling, autoregressive,
Dynamic Linear and Split layers.

Every net here has its last layer initialised to zero by default (``zero_init=True``), so a
freshly built layer starts as the identity (or as the standard-normal factor for
:class:`~impflow.transforms.reshape.Split`); ``zero_init=False`` keeps PyTorch's default
(random) initialisation of that layer too.
An optional ``context`` vector (e.g. a one-hot class) is concatenated to the input: as extra
features for :class:`MLP`, broadcast over space as extra channels for :class:`ConvNet`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["MLP", "ConvNet", "conditioner", "unflatten_params"]


def _zero_(layer: nn.Module) -> nn.Module:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class MLP(nn.Module):
    """h = W_L σ(… σ(W_1 [x, context] + b_1) …) + b_L with W_L, b_L = 0 at initialisation
    (``zero_init``; else PyTorch's default for every layer).

    Shapes: x (B, in_features), context (B, context_features) -> (B, out_features).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: int | Sequence[int] = (64, 64),
        context_features: int = 0,
        activation: type[nn.Module] = nn.ReLU,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        hidden = [hidden] if isinstance(hidden, int) else list(hidden)
        sizes = [in_features + context_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), activation()]
        last = nn.Linear(sizes[-1], out_features)
        layers.append(_zero_(last) if zero_init else last)
        self.net = nn.Sequential(*layers)
        self.context_features = context_features

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if self.context_features:
            if context is None:
                raise ValueError("this conditioner was built with context_features; pass context=")
            x = torch.cat([x, context], dim=1)
        return self.net(x)


class ConvNet(nn.Module):
    """The Glow / RealNVP conditioner: conv3×3 → σ → conv1×1 → σ → conv3×3 (zero-initialised
    unless ``zero_init=False``).

    Shapes: x (B, in_channels, H, W), context (B, context_features) -> (B, out_channels, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden: int = 64,
        context_features: int = 0,
        activation: type[nn.Module] = nn.ReLU,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        last = nn.Conv2d(hidden, out_channels, 3, padding=1)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels + context_features, hidden, 3, padding=1),
            activation(),
            nn.Conv2d(hidden, hidden, 1),
            activation(),
            _zero_(last) if zero_init else last,
        )
        self.context_features = context_features

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if self.context_features:
            if context is None:
                raise ValueError("this conditioner was built with context_features; pass context=")
            c = context[:, :, None, None].expand(-1, -1, *x.shape[2:])
            x = torch.cat([x, c], dim=1)
        return self.net(x)


def conditioner(
    in_features: int,
    out_features: int,
    *,
    image: bool,
    hidden: int = 64,
    context_features: int = 0,
    zero_init: bool = True,
) -> nn.Module:
    """The default conditioner: an :class:`MLP` with two hidden layers of width ``hidden`` for
    vectors, a :class:`ConvNet` of width ``hidden`` for images (features are then channels);
    ``zero_init``: the last layer starts at zero."""
    if image:
        return ConvNet(in_features, out_features, hidden, context_features, zero_init=zero_init)
    return MLP(in_features, out_features, (hidden, hidden), context_features, zero_init=zero_init)


def unflatten_params(h: Tensor, num_params: int) -> Tensor:
    """(B, F·P, *spatial) -> (B, F, *spatial, P): unit f·P + p holds parameter p of feature f."""
    b, fp = h.shape[:2]
    if fp % num_params:
        raise ValueError(f"{fp} outputs are not a multiple of {num_params} parameters per feature")
    return h.reshape(b, fp // num_params, num_params, *h.shape[2:]).movedim(2, -1)
