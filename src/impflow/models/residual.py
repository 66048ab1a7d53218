"""Builders for Residual Flows and Implicit Flows on vectors."""

from __future__ import annotations

from collections.abc import Sequence

from ..flow import Flow
from ..logdet import LogDetConfig
from ..nn.lipschitz import LipschitzMLP
from ..solvers import SolverConfig
from ..transforms.base import Compose, Transform
from ..transforms.implicit import ImplicitBlock
from ..transforms.normalization import ActNorm
from ..transforms.residual import ResidualBlock

__all__ = ["resflow", "impflow", "default_logdet"]

EXACT_MAX_DIM = 16
"""Up to this dimension the builders default to exact log-determinants."""


def default_logdet(dim: int) -> str:
    """"exact" for dim ≤ 16, else the unbiased Russian-roulette estimator."""
    return "exact" if dim <= EXACT_MAX_DIM else "unbiased"


def _stack(dim: int, blocks: list[Transform], actnorm: bool, actnorm_every: int = 1) -> Flow:
    """(ActNorm →) block, …, (ActNorm); with ``actnorm_every`` = k an ActNorm before every k-th block only."""
    if actnorm_every < 1:
        raise ValueError(f"actnorm_every must be at least 1, got {actnorm_every}")
    layers: list[Transform] = []
    for i, b in enumerate(blocks):
        if actnorm and i % actnorm_every == 0:
            layers.append(ActNorm(dim))
        layers.append(b)
    if actnorm:
        layers.append(ActNorm(dim))
    return Flow(Compose(layers), event_shape=dim)


def _check(dim: int, blocks: int) -> None:
    if dim < 1 or blocks < 1:
        raise ValueError(f"need dim ≥ 1 and blocks ≥ 1, got dim={dim}, blocks={blocks}")


def resflow(
    dim: int,
    blocks: int = 8,
    hidden: Sequence[int] = (128, 128),
    coeff: float = 0.97,
    activation: str = "lipswish",
    logdet: str | LogDetConfig | None = None,
    actnorm: bool = True,
    solver: SolverConfig | None = None,
    n_power_iterations: int = 5,
    actnorm_every: int = 1,
) -> Flow:
    """A Residual Flow: ``blocks`` × (ActNorm →) ResidualBlock(x + g(x)), each g a LipschitzMLP.

    ``actnorm_every`` = k puts the ActNorms before every k-th block only (and at the end): k = 2
    gives a 2k-block ResFlow the ActNorms, and exactly the parameters, of a k-block ImpFlow.
    """
    _check(dim, blocks)
    logdet = logdet if logdet is not None else default_logdet(dim)
    solver = solver if solver is not None else SolverConfig()
    mlp = dict(hidden=hidden, coeff=coeff, activation=activation, n_power_iterations=n_power_iterations)
    return _stack(
        dim, [ResidualBlock(LipschitzMLP(dim, **mlp), logdet, solver) for _ in range(blocks)], actnorm, actnorm_every
    )


def impflow(
    dim: int,
    blocks: int = 4,
    hidden: Sequence[int] = (128, 128),
    coeff: float = 0.97,
    activation: str = "lipswish",
    logdet: str | LogDetConfig | None = None,
    actnorm: bool = True,
    solver: SolverConfig | None = None,
    n_power_iterations: int = 5,
    inner_actnorm: bool = False,
) -> Flow:
    """An Implicit Flow: ``blocks`` × (ActNorm →) ImplicitBlock(g_x, g_z), each g a LipschitzMLP.

    A k-block ImpFlow has as many networks and parameters as a 2k-block ResFlow (ActNorms aside).
    ``inner_actnorm`` also puts an ActNorm inside every block, z = (Id + g_z)⁻¹ ∘ ActNorm ∘
    (Id + g_x)(x): with ``actnorm`` too it then has the ActNorms of the 2k-block ResFlow.
    """
    _check(dim, blocks)
    logdet = logdet if logdet is not None else default_logdet(dim)
    solver = solver if solver is not None else SolverConfig()
    mlp = dict(hidden=hidden, coeff=coeff, activation=activation, n_power_iterations=n_power_iterations)
    return _stack(
        dim,
        [
            ImplicitBlock(
                LipschitzMLP(dim, **mlp), LipschitzMLP(dim, **mlp), logdet, solver,
                mid=ActNorm(dim) if inner_actnorm else None,
            )
            for _ in range(blocks)
        ],
        actnorm,
    )
