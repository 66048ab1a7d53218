"""Linear flows z = W x + b, with W structured so that W⁻¹ and log|det W| are cheap.

Vector layers take (batch, features); :class:`InvertibleConv1x1` applies a linear map
across the channels of every pixel of (batch, channels, H, W) images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import Transform

__all__ = [
    "LinearTransform",
    "Diagonal",
    "Triangular",
    "Orthogonal",
    "FullLinear",
    "LULinear",
    "Permutation",
    "InvertibleConv1x1",
]


def _solve_triangular(T: Tensor, z: Tensor, *, lower: bool, unit: bool = False) -> Tensor:
    """x with T x = z for each row (last axis) of z: solves X Tᵀ = Z in O(d²) per row."""
    return torch.linalg.solve_triangular(T.mT, z, upper=lower, left=False, unitriangular=unit)


def _random_orthogonal(d: int) -> Tensor:
    """A random d×d orthogonal matrix (QR of a Gaussian matrix, signs fixed to make it Haar)."""
    q, r = torch.linalg.qr(torch.randn(d, d))
    return q * torch.sign(torch.diagonal(r))


class LinearTransform(Transform):
    """z = W x (+ b) on (batch, features) for a structured invertible W.

    Subclasses implement ``_matvec`` (x ↦ W x), ``_solve`` (z ↦ W⁻¹ z), both over the
    last axis with any leading axes, and ``logabsdet`` (log|det W|, a scalar); this
    class adds the optional bias, shape checks and the per-sample log-determinants.
    """

    def __init__(self, features: int, bias: bool = False) -> None:
        super().__init__()
        self.features = features
        self.bias = nn.Parameter(torch.zeros(features)) if bias else None

    def _matvec(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _solve(self, z: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def logabsdet(self) -> Tensor | float:  # pragma: no cover - abstract
        """log|det W| (independent of the input)."""
        raise NotImplementedError

    def _check(self, x: Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.features:
            raise ValueError(
                f"{type(self).__name__}({self.features}) got input of shape {tuple(x.shape)}; "
                f"expected (batch, {self.features})"
            )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x)
        z = self._matvec(x)
        if self.bias is not None:
            z = z + self.bias
        return z, x.new_zeros(x.shape[0]) + self.logabsdet()

    def inverse(self, z: Tensor) -> Tensor:
        self._check(z)
        if self.bias is not None:
            z = z - self.bias
        return self._solve(z)

    def inverse_and_log_det(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.inverse(z), z.new_zeros(z.shape[0]) - self.logabsdet()


class Diagonal(LinearTransform):
    """z = x ⊙ exp(s) (+ b); log|det| = Σ s. O(d) in every direction."""

    def __init__(self, features: int, bias: bool = False) -> None:
        super().__init__(features, bias)
        self.log_scale = nn.Parameter(torch.zeros(features))

    def _matvec(self, x: Tensor) -> Tensor:
        return x * torch.exp(self.log_scale)

    def _solve(self, z: Tensor) -> Tensor:
        return z * torch.exp(-self.log_scale)

    def logabsdet(self) -> Tensor:
        return self.log_scale.sum()


class Triangular(LinearTransform):
    """z = T x + b with T triangular, diagonal exp(s) > 0; log|det| = Σ s, inverse O(d²).

    Args:
        features: d.
        lower: lower (True) or upper (False) triangular T.
        bias: learn b.
    """

    def __init__(self, features: int, lower: bool = True, bias: bool = True) -> None:
        super().__init__(features, bias)
        self.lower = lower
        self.off_diagonal = nn.Parameter(torch.zeros(features, features))
        self.log_diagonal = nn.Parameter(torch.zeros(features))

    def matrix(self) -> Tensor:
        """T = (strict triangle of ``off_diagonal``) + diag(exp(s))."""
        part = torch.tril(self.off_diagonal, -1) if self.lower else torch.triu(self.off_diagonal, 1)
        return part + torch.diag(torch.exp(self.log_diagonal))

    def _matvec(self, x: Tensor) -> Tensor:
        return x @ self.matrix().mT

    def _solve(self, z: Tensor) -> Tensor:
        return _solve_triangular(self.matrix(), z, lower=self.lower)

    def logabsdet(self) -> Tensor:
        return self.log_diagonal.sum()


class Orthogonal(LinearTransform):
    """z = Q x with Q = H_1 ⋯ H_n a product of Householder reflections H = I − 2 v vᵀ / ‖v‖².

    log|det Q| = 0; Q⁻¹ = Qᵀ = H_n ⋯ H_1. Costs O(n d) per sample; n = d reflections
    (the default) reach every orthogonal matrix of determinant (−1)^d.

    Args:
        features: d.
        n_reflections: n (default d).
    """

    def __init__(self, features: int, n_reflections: int | None = None) -> None:
        super().__init__(features)
        n = features if n_reflections is None else n_reflections
        self.vectors = nn.Parameter(torch.randn(n, features))

    def _reflect(self, x: Tensor, order: Sequence[int]) -> Tensor:
        for i in order:
            v = self.vectors[i]
            x = x - (2 * (x @ v) / v.dot(v)).unsqueeze(-1) * v
        return x

    def _matvec(self, x: Tensor) -> Tensor:
        return self._reflect(x, reversed(range(len(self.vectors))))

    def _solve(self, z: Tensor) -> Tensor:
        return self._reflect(z, range(len(self.vectors)))

    def logabsdet(self) -> float:
        return 0.0


class FullLinear(LinearTransform):
    """z = W x + b with an unconstrained W; log|det W| by slogdet and inverse by solve, O(d³).

    Args:
        features: d.
        bias: learn b.
        weight: initial W (default: a random orthogonal matrix, so log|det W| = 0 at init).
    """

    def __init__(self, features: int, bias: bool = True, weight: Tensor | None = None) -> None:
        super().__init__(features, bias)
        self.weight = nn.Parameter(_random_orthogonal(features) if weight is None else weight.clone())

    def _matvec(self, x: Tensor) -> Tensor:
        return x @ self.weight.mT

    def _solve(self, z: Tensor) -> Tensor:
        return torch.linalg.solve(self.weight.mT, z, left=False)

    def logabsdet(self) -> Tensor:
        return torch.linalg.slogdet(self.weight)[1]


class LULinear(LinearTransform):
    """z = W x + b with W = P L (U + diag(s)) (Glow's LU parameterisation).

    P is a fixed permutation, L unit lower triangular, U strictly upper triangular and
    s = sign · exp(log|s|) with a fixed sign, so |s| takes any positive value.
    log|det W| = Σ log|s| in O(d); the inverse is two triangular solves, O(d²).

    Args:
        features: d.
        bias: learn b.
        weight: factorise this invertible W for the initial value (its LU pivots fix P and
            the signs of s); default: W = I (P = I, L = I, U = 0, s = 1).
    """

    def __init__(self, features: int, bias: bool = True, weight: Tensor | None = None) -> None:
        super().__init__(features, bias)
        if weight is None:
            P, L, U = torch.eye(features), torch.eye(features), torch.eye(features)
        else:
            if tuple(weight.shape) != (features, features):
                raise ValueError(f"LULinear({features}) needs a ({features}, {features}) weight, got {tuple(weight.shape)}")
            P, L, U = torch.linalg.lu(weight.detach())
        s = torch.diagonal(U)
        if not bool((s != 0).all()):
            raise ValueError("LULinear needs an invertible initial weight")
        self.register_buffer("perm", P.argmax(dim=1))  # (P y)_i = y_perm[i]
        self.register_buffer("sign_s", torch.sign(s))
        self.lower = nn.Parameter(torch.tril(L, -1))
        self.upper = nn.Parameter(torch.triu(U, 1))
        self.log_abs_s = nn.Parameter(torch.log(s.abs()))

    def _factors(self) -> tuple[Tensor, Tensor]:
        """(L, U + diag(s))."""
        eye = torch.eye(self.features, dtype=self.lower.dtype, device=self.lower.device)
        L = torch.tril(self.lower, -1) + eye
        V = torch.triu(self.upper, 1) + torch.diag(self.sign_s * torch.exp(self.log_abs_s))
        return L, V

    def _matvec(self, x: Tensor) -> Tensor:
        L, V = self._factors()
        return (x @ V.mT @ L.mT)[..., self.perm]

    def _solve(self, z: Tensor) -> Tensor:
        L, V = self._factors()
        y = z[..., torch.argsort(self.perm)]  # Pᵀ z
        y = _solve_triangular(L, y, lower=True, unit=True)
        return _solve_triangular(V, y, lower=False)

    def logabsdet(self) -> Tensor:
        return self.log_abs_s.sum()


class Permutation(LinearTransform):
    """z = x[perm], a fixed reordering of the features; log|det| = 0.

    Args:
        features: d.
        kind: ``"random"`` (drawn with ``seed``), ``"reverse"``, or an explicit
            permutation of range(d) (z_i = x_{perm[i]}).
        seed: seed of the random permutation (default: the global generator).
    """

    def __init__(
        self, features: int, kind: str | Sequence[int] | Tensor = "random", seed: int | None = None
    ) -> None:
        super().__init__(features)
        if isinstance(kind, str):
            if kind == "random":
                gen = None if seed is None else torch.Generator().manual_seed(seed)
                perm = torch.randperm(features, generator=gen)
            elif kind == "reverse":
                perm = torch.arange(features - 1, -1, -1)
            else:
                raise ValueError(f"kind must be 'random', 'reverse' or a permutation, got {kind!r}")
        else:
            perm = torch.as_tensor(kind, dtype=torch.long)
            if perm.shape != (features,) or not torch.equal(perm.sort().values, torch.arange(features)):
                raise ValueError(f"not a permutation of range({features}): {perm.tolist()}")
        self.register_buffer("perm", perm)
        self.register_buffer("inverse_perm", torch.argsort(perm))

    def _matvec(self, x: Tensor) -> Tensor:
        return x[..., self.perm]

    def _solve(self, z: Tensor) -> Tensor:
        return z[..., self.inverse_perm]

    def logabsdet(self) -> float:
        return 0.0


class InvertibleConv1x1(Transform):
    """Glow's invertible 1×1 convolution: z[:, :, h, w] = W x[:, :, h, w] at every pixel.

    log|det ∂z/∂x| = H · W · log|det W|. W starts as a random rotation; it is a free
    matrix (a :class:`FullLinear`, O(C³) log-det) or, with ``lu=True``, LU-parameterised
    (a :class:`LULinear`, O(C) log-det). Inputs (batch, channels, H, W).
    """

    def __init__(self, channels: int, lu: bool = False) -> None:
        super().__init__()
        self.channels = channels
        linear = LULinear if lu else FullLinear
        self.linear = linear(channels, bias=False, weight=_random_orthogonal(channels))

    def _check(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"InvertibleConv1x1({self.channels}) got input of shape {tuple(x.shape)}; "
                f"expected (batch, {self.channels}, H, W)"
            )

    def _ladj(self, x: Tensor) -> Tensor:
        return x.new_zeros(x.shape[0]) + x.shape[2] * x.shape[3] * self.linear.logabsdet()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x)
        return self.linear._matvec(x.movedim(1, -1)).movedim(-1, 1), self._ladj(x)

    def inverse(self, z: Tensor) -> Tensor:
        self._check(z)
        return self.linear._solve(z.movedim(1, -1)).movedim(-1, 1)

    def inverse_and_log_det(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.inverse(z), -self._ladj(z)
