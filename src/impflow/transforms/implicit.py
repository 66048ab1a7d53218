"""ImplicitBlock (ImpFlow): z defined by F(z, x) = g_x(x) − g_z(z) + x − z = 0."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from ..logdet import LogDetConfig
from ..solvers import SolveInfo, SolverConfig
from .base import Transform
from .residual import ResidualBlock

__all__ = ["ImplicitBlock"]


class ImplicitBlock(Transform):
    """The ImpFlow block z = (Id + g_z)⁻¹ ∘ (Id + g_x)(x), Lip(g_x) < 1, Lip(g_z) < 1.

    Built from two :class:`ResidualBlock` s sharing one solver:

    * forward  x → z: y = x + g_x(x), then solve z + g_z(z) = y;
    * inverse  z → x: y = z + g_z(z), then solve x + g_x(x) = y;
    * log|det ∂z/∂x| = log det(I + J_{g_x}(x)) − log det(I + J_{g_z}(z)).

    With ``mid`` = A (an invertible transform, e.g. :class:`ActNorm`) the block solves
    z + g_z(z) = A(x + g_x(x)), i.e. z = (Id + g_z)⁻¹ ∘ A ∘ (Id + g_x)(x), and adds log|det J_A|.
    One ActNorm there gives the block as many ActNorms as the two ResFlow blocks it replaces.

    Gradients of the solves use the implicit function theorem (never the iterations). With
    exact log-dets the backward linear system is solved directly with the Jacobian the
    log-det already computed.

    Shapes: x, z (batch, *event).
    """

    def __init__(
        self,
        g_x: nn.Module | Callable[[Tensor], Tensor],
        g_z: nn.Module | Callable[[Tensor], Tensor],
        logdet: str | LogDetConfig = "exact",
        solver: SolverConfig | None = None,
        event_shape: Sequence[int] | None = None,
        mid: Transform | None = None,
    ) -> None:
        super().__init__()
        solver = solver if solver is not None else SolverConfig()
        self.fx = ResidualBlock(g_x, logdet, solver, event_shape)
        self.mid = mid
        self.fz = ResidualBlock(g_z, logdet, solver, event_shape)

    @property
    def g_x(self) -> nn.Module:
        return self.fx.g

    @property
    def g_z(self) -> nn.Module:
        return self.fz.g

    @property
    def forward_solve(self) -> SolveInfo | None:
        """Statistics of the last forward (x → z) solve."""
        return self.fz.last_solve

    @property
    def inverse_solve(self) -> SolveInfo | None:
        """Statistics of the last inverse (z → x) solve."""
        return self.fx.last_solve

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y, ladj = self.fx(x)
        if self.mid is not None:
            y, ladj_mid = self.mid(y)
            ladj = ladj + ladj_mid
        z, ladj_z = self.fz.inverse_and_log_det(y)
        return z, ladj + ladj_z

    def map(self, x: Tensor) -> Tensor:
        """z = f(x) without the log-determinant (differentiable through the implicit backward)."""
        y = self.fx.map(x)
        return self.fz.inverse(y if self.mid is None else self.mid(y)[0])

    def inverse(self, z: Tensor) -> Tensor:
        y = self.fz.map(z)
        return self.fx.inverse(y if self.mid is None else self.mid.inverse(y))

    def inverse_and_log_det(self, z: Tensor) -> tuple[Tensor, Tensor]:
        y, ladj = self.fz(z)
        if self.mid is not None:
            y, ladj_mid = self.mid.inverse_and_log_det(y)
            ladj = ladj + ladj_mid
        x, ladj_x = self.fx.inverse_and_log_det(y)
        return x, ladj + ladj_x
