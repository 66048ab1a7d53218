"""The transform contract: data ``x`` to latent ``z`` with the log-determinant.

Every transform maps the *normalizing* direction, ``z = f(x)``::

    z, ladj = t(x)          # ladj = log|det ∂z/∂x|, shape (batch,)
    x = t.inverse(z)
    x, ladj_inv = t.inverse_and_log_det(z)   # ladj_inv = log|det ∂x/∂z|
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import ClassVar

import torch
from torch import Tensor, nn

__all__ = ["Transform", "Compose", "Inverse", "NonFiniteError", "check_input", "layers", "recording"]


def as_int(value: object) -> int | None:
    """``value`` as an int when it is an integer (Python, numpy or 0-d torch), else None; a bool is
    not a size or a count."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


class NonFiniteError(ValueError):
    """An input with NaN or Inf entries (raised by :func:`check_input`; inside a model it means an
    earlier layer produced them)."""


def check_input(x: Tensor, event_shape: Sequence[int] | None = None, name: str = "x") -> None:
    """Raise a clear error for inputs a flow cannot use.

    Checks: a tensor, a floating dtype, at least one batch dimension, the trailing
    ``event_shape`` (when given), and finite values.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} has dtype {x.dtype}; flows need a floating dtype "
            f"(convert with {name}.float() or {name}.double())"
        )
    if event_shape is not None:
        event_shape = tuple(event_shape)
        k = len(event_shape)
        if x.dim() != k + 1 or tuple(x.shape[1:]) != event_shape:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)}; expected (batch, {', '.join(map(str, event_shape))})"
            )
    if not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).reshape(x.shape[0], -1).any(dim=1).nonzero().flatten()
        raise NonFiniteError(
            f"{name} contains NaN or Inf in {bad.numel()} of {x.shape[0]} rows "
            f"(first bad rows: {bad[:5].tolist()})"
        )


class Transform(nn.Module):
    """A bijection z = f(x) with a tractable log|det ∂z/∂x|.

    Subclasses implement :meth:`forward` and :meth:`inverse`; those whose inverse
    can produce its own log-determinant more cheaply than a second forward pass
    override :meth:`inverse_and_log_det`. ``container``: the transform only chains others
    (:class:`Compose`, :class:`~impflow.transforms.reshape.MultiScale`); :func:`layers` opens it.
    """

    container: ClassVar[bool] = False

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        """x (batch, *event) -> (z (batch, *event), log|det ∂z/∂x| (batch,))."""
        raise NotImplementedError

    def inverse(self, z: Tensor) -> Tensor:  # pragma: no cover - abstract
        """z (batch, *event) -> x = f⁻¹(z)."""
        raise NotImplementedError

    def inverse_and_log_det(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z -> (x = f⁻¹(z), log|det ∂x/∂z|). Default: inverse, then -ladj of forward(x)."""
        x = self.inverse(z)
        _, ladj = self.forward(x)
        return x, -ladj


def layers(module: nn.Module) -> Iterator[Transform]:
    """The transforms ``module`` (a flow, a transform) chains: containers and plain modules are
    opened, every other transform is yielded whole (an ImplicitBlock with its two residual maps,
    an ActNorm, a Squeeze, …), in registration order."""
    if isinstance(module, Transform) and not module.container:
        yield module
        return
    for child in module.children():
        yield from layers(child)


Call = tuple[nn.Module, Tensor, tuple[Tensor, Tensor]]


@contextmanager
def recording(modules: Iterable[nn.Module]) -> Iterator[list[Call]]:
    """Inside the context every forward call of one of ``modules`` appends (module, its first
    input, its output: (z, ladj) for a transform) to the yielded list, in the order the calls
    ran; the hooks are removed on exit, also after an error."""
    calls: list[Call] = []
    hooks = [m.register_forward_hook(lambda mod, inputs, out: calls.append((mod, inputs[0], out)))
             for m in modules]
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


class Compose(Transform):
    """f = f_n ∘ … ∘ f_1: log-dets summed, inverses applied in reverse order."""

    container = True

    def __init__(self, *transforms: Transform | Iterable[Transform]) -> None:
        super().__init__()
        if len(transforms) == 1 and not isinstance(transforms[0], Transform):
            transforms = tuple(transforms[0])
        for t in transforms:
            if not isinstance(t, Transform):
                raise TypeError(f"Compose takes Transforms, got {type(t).__name__}")
        self.transforms = nn.ModuleList(transforms)

    def __len__(self) -> int:
        return len(self.transforms)

    def __getitem__(self, i: int) -> Transform:
        return self.transforms[i]

    def __iter__(self):
        return iter(self.transforms)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        ladj = x.new_zeros(x.shape[0])
        for t in self.transforms:
            x, l = t(x)
            ladj = ladj + l
        return x, ladj

    def inverse(self, z: Tensor) -> Tensor:
        for t in reversed(self.transforms):
            z = t.inverse(z)
        return z

    def inverse_and_log_det(self, z: Tensor) -> tuple[Tensor, Tensor]:
        ladj = z.new_zeros(z.shape[0])
        for t in reversed(self.transforms):
            z, l = t.inverse_and_log_det(z)
            ladj = ladj + l
        return z, ladj


class Inverse(Transform):
    """The inverse transform: forward is ``t.inverse`` and inverse is ``t.forward``."""

    def __init__(self, transform: Transform) -> None:
        super().__init__()
        self.transform = transform

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.transform.inverse_and_log_det(x)

    def inverse(self, z: Tensor) -> Tensor:
        return self.transform(z)[0]

    def inverse_and_log_det(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.transform(z)
