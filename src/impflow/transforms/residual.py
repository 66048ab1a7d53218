"""ResidualBlock (i-ResNet / Residual Flow): z = x + g(x), Lip(g) < 1."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..logdet import LogDetConfig, residual_logdet
from ..solvers import SolveInfo, SolverConfig, solve_residual
from .base import Transform, check_input

__all__ = ["ResidualBlock"]


def _event_shape(g: nn.Module) -> tuple[int, ...] | None:
    if hasattr(g, "event_shape"):
        return tuple(g.event_shape)
    if hasattr(g, "dim"):
        return (int(g.dim),)
    return None


class ResidualBlock(Transform):
    """z = x + g(x) with Lip(g) < 1 (g e.g. a :class:`~impflow.nn.LipschitzMLP`).

    log|det ∂z/∂x| = log det(I + J_g(x)) by the estimator ``logdet`` ("exact", "unbiased"
    or "neumann", or a :class:`~impflow.logdet.LogDetConfig`); :func:`impflow.exact_logdet`
    overrides it. The inverse solves x + g(x) = z with the shared solver; the statistics of
    the last inverse are in :attr:`last_solve`.

    Shapes: x, z (batch, *event) with event = g's (``g.dim`` or ``g.event_shape``).
    """

    def __init__(
        self,
        g: nn.Module | Callable[[Tensor], Tensor],
        logdet: str | LogDetConfig = "exact",
        solver: SolverConfig | None = None,
        event_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.g = g
        self.logdet = logdet if isinstance(logdet, LogDetConfig) else LogDetConfig(mode=logdet)
        self.solver = solver if solver is not None else SolverConfig()
        self.event_shape = tuple(event_shape) if event_shape is not None else _event_shape(g)
        self.last_solve: SolveInfo | None = None
        # ρ̂, the largest contraction of J_g the stochastic log-det series measured in training:
        # it keeps the Russian roulette's variance finite (LogDetConfig.variance_margin)
        self.register_buffer("contraction", torch.zeros(()))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # checkpoints from before the contraction buffer: start it at 0, as a new block does
        state_dict.setdefault(prefix + "contraction", torch.zeros_like(self.contraction))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _logdet(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        return residual_logdet(self.g, x, self.logdet, self.contraction, update=self.training)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_input(x, self.event_shape)
        gx, ladj, _ = self._logdet(x)
        return x + gx, ladj

    def map(self, x: Tensor) -> Tensor:
        """x + g(x) without the log-determinant."""
        return x + self.g(x)

    def inverse(self, z: Tensor) -> Tensor:
        check_input(z, self.event_shape, name="z")
        x, self.last_solve = solve_residual(self.g, z, self.solver)
        return x

    def inverse_and_log_det(self, z: Tensor) -> tuple[Tensor, Tensor]:
        x = self.inverse(z)
        _, ladj, J = self._logdet(x)
        if J is not None:
            self.last_solve.jacobian = J.detach()
        return x, -ladj
