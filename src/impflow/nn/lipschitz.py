"""Lipschitz-constrained networks: spectrally normalised linear layers and 1-Lipschitz activations.

A :class:`LipschitzMLP` g with every linear layer normalised to spectral norm ≤ ``coeff`` and
1-Lipschitz activations has Lip(g) ≤ coeff^(number of layers) ≤ coeff < 1, which is what makes
x ↦ x + g(x) invertible (Behrmann et al. 2019). The normalisation divides W by
max(1, σ̂/coeff), σ̂ the power-iteration estimate of ‖W‖₂; :func:`lipschitz_bound` computes a
*certified* bound from exact spectral norms so the constraint can be checked, not hoped for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SpectralLinear",
    "LipSwish",
    "Sine",
    "LipschitzMLP",
    "lipschitz_bound",
    "sync_spectral",
    "ACTIVATIONS",
]



def _unit(x: Tensor) -> Tensor:
    """x / ‖x‖ over all entries."""
    return x / x.norm().clamp_min(1e-12)

class SpectralLinear(nn.Module):
    """y = W̃ x + b with W̃ = W / max(1, σ̂/coeff), σ̂ ≈ ‖W‖₂ by power iteration.

    The singular-vector estimates ``u``, ``v`` are persistent buffers. They are refined by
    ``n_power_iterations`` warm-started steps whenever W has changed since the last refinement
    (an optimiser step or a checkpoint load bumps the parameter's version counter), so every
    call within one forward/backward pass - including every iteration of a root solver - sees
    the same W̃, and eval mode never uses estimates that are stale for the current W. At
    construction they are run to convergence.

    Shapes: x (..., in_features) -> (..., out_features).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        coeff: float = 0.97,
        n_power_iterations: int = 5,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if not 0 < coeff:
            raise ValueError(f"coeff must be positive, got {coeff}")
        self.in_features, self.out_features = in_features, out_features
        self.coeff = coeff
        self.n_power_iterations = n_power_iterations
        self.max_power_iterations = 100
        self.power_tol = 1e-4
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        # orthogonal: every singular value equal, so after normalisation all directions
        # (not only the top one) start at gain ``coeff``
        nn.init.orthogonal_(self.weight)
        if self.bias is not None:
            bound = 1 / math.sqrt(in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        u = _unit(torch.randn(out_features))
        v = _unit(torch.randn(in_features))
        self.register_buffer("u", u)
        self.register_buffer("v", v)
        self._seen_version = -1
        self.power_iteration(n=200)

    def _matvec(self, W: Tensor, v: Tensor) -> Tensor:
        """W v (the operator whose norm is controlled; convolutions override this)."""
        return W @ v

    def _rmatvec(self, W: Tensor, u: Tensor) -> Tensor:
        """Wᵀ u."""
        return W.t() @ u

    @torch.no_grad()
    def power_iteration(self, n: int | None = None) -> None:
        """Refine u, v: at least ``n`` steps (default ``n_power_iterations``), then on until σ̂
        changes by less than ``power_tol`` (relative), at most ``max_power_iterations`` steps.

        A fixed small step count lets σ̂ lag ‖W‖₂ by a few percent after large optimiser steps,
        and the layer's norm then exceeds ``coeff``; the convergence test closes that gap.
        """
        W = self.weight.detach()
        u, v = self.u, self.v
        n = self.n_power_iterations if n is None else n
        prev = None
        for k in range(max(n, self.max_power_iterations)):
            v = _unit(self._rmatvec(W, u))
            Wv = self._matvec(W, v)
            s = Wv.norm()
            u = Wv / s.clamp_min(1e-12)
            if k + 1 >= n and prev is not None and abs(float(s - prev)) <= self.power_tol * float(s):
                break
            prev = s
        self.u.copy_(u)
        self.v.copy_(v)
        self._seen_version = self.weight._version

    def dense_operator(self) -> Tensor:
        """The matrix of the raw (unnormalised) operator x ↦ W x."""
        return self.weight.detach()

    @torch.no_grad()
    def sync_exact(self) -> float:
        """Set u, v to the exact top singular pair of the operator (SVD) and return the lag
        σ/σ̂_before ≥ 1 of the running estimate. Power iteration warm-started after a large
        optimiser step can sit near a former top direction and underestimate σ by a few
        percent; syncing periodically makes ‖W̃‖₂ ≤ coeff hold exactly again."""
        if not self.current:
            self.power_iteration()
        before = float(self.sigma())
        A = self.dense_operator()
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        self.u.copy_(U[:, 0].reshape(self.u.shape))
        self.v.copy_(Vh[0].reshape(self.v.shape))
        self._seen_version = self.weight._version
        return float(S[0]) / max(before, 1e-30)

    @property
    def current(self) -> bool:
        """Whether ``u``, ``v`` were refined for the weight as it is now (no refinement pending)."""
        return self.weight._version == self._seen_version

    def mark_current(self) -> None:
        """Declare ``u``, ``v`` current for the present W (e.g. after loading a checkpoint whose
        vectors were refined for its weights), so the next call does not refine them again."""
        self._seen_version = self.weight._version

    def _apply(self, fn, recurse=True):
        # a dtype/device move re-runs the power iteration at the new precision on next use
        self._seen_version = -1
        return super()._apply(fn, recurse)

    def sigma(self) -> Tensor:
        """σ̂ = ⟨u, W v⟩, differentiable in W."""
        if not self.current:
            self.power_iteration()
        return torch.sum(self.u * self._matvec(self.weight, self.v))

    def normalized_weight(self) -> Tensor:
        """W̃ = W / max(1, σ̂/coeff)."""
        factor = torch.clamp(self.sigma() / self.coeff, min=1.0)
        return self.weight / factor

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.normalized_weight(), self.bias)

    @torch.no_grad()
    def operator_norm(self) -> float:
        """The exact ‖W̃‖₂ (an SVD, not the power-iteration estimate)."""
        return float(torch.linalg.matrix_norm(self.normalized_weight(), ord=2))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, coeff={self.coeff}"


def _softplus(x: Tensor) -> Tensor:
    """log(1 + eˣ), smooth everywhere. ``F.softplus`` switches to x above 20, a jump of ~2e-9
    right at LipSwish's initial β = 20, which finite-difference gradient checks see."""
    return torch.logaddexp(x, torch.zeros_like(x))


class LipSwish(nn.Module):
    """LipSwish(x) = x·sigmoid(βx)/1.1 with learnable β > 0 (softplus-parameterised); 1-Lipschitz.

    β starts at 20 by default: spectral normalisation leaves the rows of a wide first layer
    with norms ≈ coeff·√(dim/hidden) (0.12 for 2 → 128), so pre-activations vary little over
    the data, and with β ≈ 1 the network starts out almost affine. On 2-D checkerboard that
    kept ResFlows and ImpFlows at the Gaussian fit for ~800 Adam steps; with β = 20 they
    improve from the first steps (see the README's training notes).
    """

    def __init__(self, beta: float = 20.0) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        self.raw_beta = nn.Parameter(torch.tensor(math.log(math.expm1(beta))))

    def forward(self, x: Tensor) -> Tensor:
        beta = _softplus(self.raw_beta)
        return x * torch.sigmoid(beta * x) / 1.1


class Sine(nn.Module):
    """Sine(x) = sin(ωx)/ω with learnable frequency ω > 0 (softplus-parameterised); 1-Lipschitz
    (its derivative is cos(ωx)).

    ω starts at 5 by default, for the reason LipSwish's β starts at 20: under spectral
    normalisation the pre-activations of a wide first layer span only about ±0.5 over 2-D data,
    where plain sin(x) is almost linear and training crawls (the README's "Activations" note
    has the measurements).
    """

    def __init__(self, omega: float = 5.0) -> None:
        super().__init__()
        if omega <= 0:
            raise ValueError(f"omega must be positive, got {omega}")
        self.raw_omega = nn.Parameter(torch.tensor(math.log(math.expm1(omega))))

    def forward(self, x: Tensor) -> Tensor:
        omega = _softplus(self.raw_omega)
        return torch.sin(omega * x) / omega


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "lipswish": LipSwish,
    "sine": Sine,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
}


def check_lipschitz_args(activation: str, coeff: float) -> None:
    """Validate the settings every Lipschitz network g of an invertible block shares."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
    if not 0 < coeff < 1:
        raise ValueError(f"coeff must lie in (0, 1) for an invertible block, got {coeff}")


class LipschitzMLP(nn.Module):
    """g: R^dim -> R^dim, an MLP of :class:`SpectralLinear` layers and 1-Lipschitz activations.

    Lip(g) ≤ coeff^(len(hidden)+1) ≤ coeff.

    Args:
        dim: input and output size.
        hidden: hidden layer sizes, e.g. ``(128, 128)``.
        coeff: spectral-norm bound of every linear layer (< 1 for an invertible residual block).
        activation: one of ``"lipswish"``, ``"sine"``, ``"elu"``, ``"tanh"``.
        n_power_iterations: warm-started power-iteration steps after each weight update.
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (128, 128),
        coeff: float = 0.97,
        activation: str = "lipswish",
        n_power_iterations: int = 5,
    ) -> None:
        super().__init__()
        check_lipschitz_args(activation, coeff)
        self.dim = dim
        self.coeff = coeff
        sizes = [dim, *hidden, dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            if i > 0:
                layers.append(ACTIVATIONS[activation]())
            layers.append(SpectralLinear(a, b, coeff=coeff, n_power_iterations=n_power_iterations))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """x (batch, dim) -> g(x) (batch, dim)."""
        return self.net(x)


def sync_spectral(module: nn.Module, max_entries: int | None = None) -> float:
    """:meth:`SpectralLinear.sync_exact` on every spectrally normalised layer of ``module`` (with
    ``max_entries``: only those whose dense operator has at most that many entries; larger ones,
    e.g. convolutions on big images, keep their power-iteration estimates); returns the largest
    lag σ/σ̂ found (1.0 when every estimate was exact, or no such layer)."""
    lags = [
        m.sync_exact()
        for m in module.modules()
        if isinstance(m, SpectralLinear) and (max_entries is None or m.u.numel() * m.v.numel() <= max_entries)
    ]
    return max(lags, default=1.0)


@torch.no_grad()
def lipschitz_bound(module: nn.Module) -> float:
    """Certified upper bound on Lip(g) for a feed-forward stack of spectrally normalised layers.

    Product over the :class:`SpectralLinear` layers (convolutions included) of their *exact*
    operator norms (:meth:`SpectralLinear.operator_norm`), activations being 1-Lipschitz. Works
    for any module whose Lipschitz-relevant layers are SpectralLinear in sequence (LipschitzMLP,
    LipschitzConvNet). Raises TypeError for unconstrained Linear/Conv layers or when there is
    no normalised layer.
    """
    bound = 1.0
    found = False
    for m in module.modules():
        if isinstance(m, SpectralLinear):
            found = True
            bound *= m.operator_norm()
        elif isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            raise TypeError(f"{type(m).__name__} is not Lipschitz-constrained; no bound available")
    if not found:
        raise TypeError(f"{type(module).__name__} has no spectrally normalised layers")
    return bound
