"""Flow: a transform x -> z and a base density p_Z, giving log p(x) = log p_Z(f(x)) + log|det J_f(x)|."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, constraints

from .transforms.base import Transform, as_int, check_input

__all__ = ["Flow", "StandardNormal", "FlowDistribution"]


class StandardNormal(nn.Module):
    """N(0, I) over an event of shape ``shape``; follows the module's device and dtype."""

    def __init__(self, shape: int | Sequence[int]) -> None:
        super().__init__()
        self.shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.register_buffer("_ref", torch.zeros(()), persistent=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def log_prob(self, z: Tensor) -> Tensor:
        """z (batch, *shape) -> (batch,)."""
        sq = z.reshape(z.shape[0], -1).pow(2).sum(dim=1)
        return -0.5 * sq - 0.5 * self.numel * math.log(2 * math.pi)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn(
            (n, *self.shape), dtype=self._ref.dtype, device=self._ref.device, generator=generator
        )


def _count(n: int) -> int:
    """A number of samples, checked: an int ≥ 0."""
    count = as_int(n)
    if count is None:
        raise TypeError(
            f"n must be an int (the number of samples), got {n!r}; for a shape of samples use "
            "flow.distribution().sample(shape)"
        )
    if count < 0:
        raise ValueError(f"n must be non-negative, got {count}")
    return count


class Flow(nn.Module):
    """A normalizing flow ``p(x)``: ``transform`` maps data to latent, ``base`` scores the latent.

    Args:
        transform: the bijection x -> z.
        base: the latent density (a module with ``log_prob`` and ``sample``); a
            standard normal of shape ``event_shape`` by default.
        event_shape: the shape of one example, e.g. ``(2,)`` or ``(3, 32, 32)``.
    """

    def __init__(
        self,
        transform: Transform,
        base: nn.Module | None = None,
        *,
        event_shape: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if event_shape is None:
            if base is None or not hasattr(base, "shape"):
                raise ValueError("Flow needs event_shape= (or a base with a .shape attribute)")
            event_shape = base.shape
        self.transform = transform
        self.event_shape = (event_shape,) if isinstance(event_shape, int) else tuple(event_shape)
        self.base = base if base is not None else StandardNormal(self.event_shape)

    @property
    def _ref(self) -> Tensor:
        return self.base._ref if hasattr(self.base, "_ref") else next(self.parameters())

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) in nats, x (batch, *event_shape) -> (batch,)."""
        check_input(x, self.event_shape)
        self._check_dtype(x)
        z, ladj = self.transform(x)
        return self.base.log_prob(z) + ladj

    def forward(self, x: Tensor) -> Tensor:
        return self.log_prob(x)

    def _check_dtype(self, x: Tensor) -> None:
        """A TypeError naming both dtypes when x's differs from the flow's parameters': some layers
        would fail deep inside, others silently promote. A flow without parameters takes any."""
        ref = next((p for p in self.parameters() if p.is_floating_point()), None)
        if ref is not None and x.dtype != ref.dtype:
            cast = {torch.float32: "x.float()", torch.float64: "x.double()"}.get(ref.dtype, f"x.to({ref.dtype})")
            raise TypeError(
                f"x has dtype {x.dtype} but the flow's parameters are {ref.dtype}; "
                f"convert the data ({cast}) or the flow (flow.to({x.dtype}))"
            )

    def rsample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n samples x = f⁻¹(z), z ~ base: (n, *event_shape), differentiable in the parameters."""
        z = self.base.sample(_count(n), generator=generator)
        return z.new_empty((0, *self.event_shape)) if z.shape[0] == 0 else self.transform.inverse(z)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n samples x = f⁻¹(z), z ~ base: (n, *event_shape), without a graph."""
        return self.rsample(n, generator=generator)

    def sample_and_log_prob(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """(x, log p(x)) using the inverse's own log-determinant: log p(x) = log p_Z(z) - log|det ∂x/∂z|."""
        z = self.base.sample(_count(n), generator=generator)
        if z.shape[0] == 0:
            return z.new_empty((0, *self.event_shape)), z.new_zeros(0)
        x, ladj_inv = self.transform.inverse_and_log_det(z)
        return x, self.base.log_prob(z) - ladj_inv

    def distribution(self) -> "FlowDistribution":
        """A ``torch.distributions.Distribution`` view of this flow."""
        return FlowDistribution(self)


class FlowDistribution(Distribution):
    """``torch.distributions`` wrapper around a :class:`Flow`; ``rsample`` is differentiable in
    the flow's parameters (through root solves by the implicit function theorem)."""

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, flow: Flow) -> None:
        self.flow = flow
        super().__init__(
            batch_shape=torch.Size(), event_shape=torch.Size(flow.event_shape), validate_args=False
        )

    def log_prob(self, value: Tensor) -> Tensor:
        shape = value.shape[: value.dim() - len(self.event_shape)]
        flat = value.reshape(-1, *self.event_shape)
        return self.flow.log_prob(flat).reshape(shape)

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        n = math.prod(sample_shape)
        x = self.flow.rsample(n)
        return x.reshape(*sample_shape, *self.event_shape)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)
