"""Classifiers whose residual blocks are Lipschitz-constrained ResFlow or ImpFlow blocks.

logits = head(B_n ∘ … ∘ B_1(stem(x))), where the stem (a conv for images, a linear layer for
vectors) is unconstrained, each B_i is either a ResFlow block x ↦ x + g(x) or an ImpFlow block
x ↦ z solving (Id + g_z)(z) = (Id + g_x)(x) (gradients by the implicit function theorem), every
g with Lip(g) ≤ coeff, and the head is average pooling (images) and a linear layer. No
log-determinants are computed. At equal parameters an ImpFlow classifier has half as many blocks
(each holds two networks), which is how the paper compares them.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..nn.lipschitz import LipschitzMLP
from ..nn.lipschitz_conv import LipschitzConvNet
from ..solvers import SolverConfig
from ..transforms.implicit import ImplicitBlock
from ..transforms.residual import ResidualBlock

__all__ = ["LipschitzClassifier", "classifier"]


class LipschitzClassifier(nn.Module):
    """logits = head(B_n ∘ … ∘ B_1(stem(x))).

    Shapes: x (B, *in_shape) -> logits (B, num_classes).
    """

    def __init__(
        self, stem: nn.Module, blocks: Sequence[ResidualBlock | ImplicitBlock], head: nn.Module
    ) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    def features(self, x: Tensor) -> Tensor:
        """The output of the last block, (B, width, H, W) or (B, width)."""
        h = self.stem(x)
        for block in self.blocks:
            h = block.map(h)  # the block's forward map, no log-det
        return h

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def classifier(
    in_shape: int | Sequence[int],
    num_classes: int,
    block: str = "resflow",
    coeff: float = 0.9,
    width: int = 32,
    blocks: int | None = None,
    hidden: int | None = None,
    kernels: Sequence[int] = (3, 1, 3),
    pool: int = 2,
    activation: str = "lipswish",
    solver: SolverConfig | None = None,
    n_power_iterations: int = 5,
) -> LipschitzClassifier:
    """A ResNet-style classifier with ResFlow or ImpFlow residual blocks.

    Args:
        in_shape: (C, H, W) for images (conv stem, :class:`LipschitzConvNet` blocks, average
            pooling) or d / (d,) for vectors (linear stem, :class:`LipschitzMLP` blocks).
        num_classes: number of logits.
        block: ``"resflow"`` or ``"impflow"``.
        coeff: Lipschitz bound of every g (each of its layers is normalised to it).
        width: channels (images) or features (vectors) the blocks act on.
        blocks: number of blocks; None gives 4 ResFlow or 2 ImpFlow blocks (equal parameters).
        hidden: width inside each g (default ``width``): convs with ``kernels`` for images, an
            MLP with two hidden layers for vectors.
        pool: images are average-pooled to pool × pool before the linear layer: 1 is ResNet's
            global pooling; 2 keeps the coarse layout that small images (8×8 digits) need when
            there are no downsampling stages.
        solver: root-solver settings of the ImpFlow blocks.
    """
    if block not in ("resflow", "impflow"):
        raise ValueError(f"block must be 'resflow' or 'impflow', got {block!r}")
    blocks = blocks if blocks is not None else (4 if block == "resflow" else 2)
    if blocks < 1 or num_classes < 2:
        raise ValueError(f"need blocks ≥ 1 and num_classes ≥ 2, got {blocks}, {num_classes}")
    in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
    hidden = hidden if hidden is not None else width
    solver = solver if solver is not None else SolverConfig()
    common = dict(coeff=coeff, activation=activation, n_power_iterations=n_power_iterations)

    if len(in_shape) == 3:
        c, h, w = in_shape
        stem: nn.Module = nn.Conv2d(c, width, 3, padding=1)
        head: nn.Module = nn.Sequential(
            nn.AdaptiveAvgPool2d(pool), nn.Flatten(), nn.Linear(width * pool**2, num_classes)
        )

        def net() -> nn.Module:
            return LipschitzConvNet(width, hidden, (width, h, w), kernels, **common)

    elif len(in_shape) == 1:
        stem = nn.Linear(in_shape[0], width)
        head = nn.Linear(width, num_classes)

        def net() -> nn.Module:
            return LipschitzMLP(width, (hidden, hidden), **common)

    else:
        raise ValueError(f"in_shape must be (C, H, W) or (d,), got {in_shape}")

    if block == "resflow":
        layers = [ResidualBlock(net(), solver=solver) for _ in range(blocks)]
    else:
        layers = [ImplicitBlock(net(), net(), solver=solver) for _ in range(blocks)]
    return LipschitzClassifier(stem, layers, head)
