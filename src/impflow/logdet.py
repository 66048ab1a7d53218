"""log det(I + J_g(x)) for residual maps x ↦ x + g(x) with Lip(g) < 1, three ways.

* ``"exact"``: the full Jacobian by batched (vmap'ed) vector-Jacobian products, then slogdet.
* ``"unbiased"``: the power series log det(I + J) = Σ_{k≥1} (−1)^{k+1} tr(J^k)/k, each trace by a
  Hutchinson probe vᵀJ^k v (v ~ N(0, I)), truncated at n_exact + N terms with N random
  (geometric or Poisson, "Russian roulette") and term k reweighted by 1/P(n_exact + N ≥ k):
  an unbiased estimate whose gradient is backpropagated through the series.
* ``"neumann"``: the same value estimate computed without a graph, plus the memory-saving
  gradient ∂/∂θ log det(I+J) = Σ_{k≥0} (−1)^k tr(J^k ∂J/∂θ) estimated by the same probes and
  roulette weights during the forward pass, so memory does not grow with the number of terms.
  The returned value is the (stochastic) estimate; only its gradient uses the Neumann form.

:func:`exact_logdet` forces the exact mode everywhere inside it (evaluation, tests).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["LogDetConfig", "exact_logdet", "exact_forced", "residual_logdet", "jacobian"]

_FORCE_EXACT = 0


@contextmanager
def exact_logdet() -> Iterator[None]:
    """Within this context every residual/implicit block computes exact log-determinants."""
    global _FORCE_EXACT
    _FORCE_EXACT += 1
    try:
        yield
    finally:
        _FORCE_EXACT -= 1


def exact_forced() -> bool:
    """True inside :func:`exact_logdet`."""
    return _FORCE_EXACT > 0


@dataclass
class LogDetConfig:
    """How a block computes log det(I + J_g).

    Attributes:
        mode: ``"exact"``, ``"unbiased"`` or ``"neumann"``.
        n_exact_terms: series terms always computed.
        roulette: distribution of the extra terms N: ``"geometric"`` (P(N ≥ m) = (1−p)^m) or
            ``"poisson"`` (mean ``lam``).
        p: geometric parameter.
        lam: Poisson mean.
    """

    mode: Literal["exact", "unbiased", "neumann"] = "exact"
    n_exact_terms: int = 2
    roulette: Literal["geometric", "poisson"] = "geometric"
    p: float = 0.5
    lam: float = 2.0

    def __post_init__(self) -> None:
        if self.mode not in ("exact", "unbiased", "neumann"):
            raise ValueError(f"unknown log-det mode {self.mode!r}; use 'exact', 'unbiased' or 'neumann'")
        if self.roulette not in ("geometric", "poisson"):
            raise ValueError(f"unknown roulette {self.roulette!r}; use 'geometric' or 'poisson'")
        if self.n_exact_terms < 1:
            raise ValueError("n_exact_terms must be at least 1")
        if not 0 < self.p < 1 or self.lam <= 0:
            raise ValueError("need 0 < p < 1 and lam > 0")

    def draw_terms(self) -> int:
        """n_exact + N, N drawn from the roulette distribution (torch's global RNG)."""
        if self.roulette == "geometric":
            u = float(torch.rand(()))
            extra = int(math.floor(math.log1p(-u) / math.log1p(-self.p)))
        else:
            extra = int(torch.poisson(torch.tensor(self.lam)))
        return self.n_exact_terms + extra

    def survival(self, k: int) -> float:
        """P(n_exact + N ≥ k)."""
        m = k - self.n_exact_terms
        if m <= 0:
            return 1.0
        if self.roulette == "geometric":
            return (1 - self.p) ** m
        cdf = sum(math.exp(-self.lam) * self.lam**j / math.factorial(j) for j in range(m))
        return max(1.0 - cdf, 1e-300)


def jacobian(gx: Tensor, x: Tensor, create_graph: bool) -> Tensor:
    """Per-sample Jacobian J[b] = ∂g(x_b)/∂x_b, shape (batch, n, n), by batched vjps.

    ``gx`` must have been computed from ``x`` row by row (no coupling across the batch).
    """
    B = x.shape[0]
    n = x[0].numel()
    eye = torch.eye(n, dtype=gx.dtype, device=gx.device)
    basis = eye.unsqueeze(1).expand(n, B, n).reshape(n, *gx.shape)
    try:
        (rows,) = torch.autograd.grad(
            gx, x, basis, retain_graph=True, create_graph=create_graph, is_grads_batched=True
        )
    except RuntimeError:  # an op without a batching rule: one vjp per output coordinate
        rows = torch.stack(
            [torch.autograd.grad(gx, x, b, retain_graph=True, create_graph=create_graph)[0] for b in basis]
        )
    return rows.reshape(n, B, n).transpose(0, 1)


def _vjp(gx: Tensor, x: Tensor, w: Tensor, create_graph: bool) -> Tensor:
    return torch.autograd.grad(gx, x, w, retain_graph=True, create_graph=create_graph)[0]


def _series(gx: Tensor, x: Tensor, config: LogDetConfig, create_graph: bool, neumann: bool = False) -> Tensor:
    """Russian-roulette Hutchinson estimate of Σ_k (−1)^{k+1} tr(J^k)/k.

    ``create_graph``: the estimate is differentiable through the series. ``neumann``: the series
    runs without a graph and the gradient comes from the Neumann series of tr((I+J)⁻¹ ∂J),
    accumulated over the same probes and roulette weights (accᵀ J v, one graph-carrying vjp).
    """
    n_terms = config.draw_terms()
    v = torch.randn_like(x)
    w = v
    est = x.new_zeros(x.shape[0])
    acc = torch.zeros_like(v) if neumann else None
    for k in range(1, n_terms + 1):
        if acc is not None:
            acc = acc + ((-1) ** (k - 1) / config.survival(k)) * w  # term k−1 of the gradient series
        w = _vjp(gx, x, w, create_graph and not neumann)
        est = est + ((-1) ** (k + 1) / (k * config.survival(k))) * (w * v).flatten(1).sum(1)
    if acc is None:
        return est
    surrogate = (_vjp(gx, x, acc.detach(), True) * v).flatten(1).sum(1)  # accᵀ J v
    return est.detach() + surrogate - surrogate.detach()


def residual_logdet(
    g: Callable[[Tensor], Tensor], x: Tensor, config: LogDetConfig
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Evaluate g(x) and log det(I + J_g(x)).

    Args:
        g: a row-wise map (batch, *event) -> (batch, *event).
        x: input (batch, *event); gradients flow to it and to g's parameters when grad mode is on.
        config: the estimator.

    Returns:
        (g(x), log det (batch,), J_g(x) (batch, n, n) in exact mode, else None). With grad mode
        off everything is detached.
    """
    track = torch.is_grad_enabled()
    mode = "exact" if exact_forced() else config.mode
    with torch.enable_grad():
        xg = x if (track and x.requires_grad) else x.detach().requires_grad_(True)
        gx = g(xg)
        J = None
        if mode == "exact":
            J = jacobian(gx, xg, create_graph=track)
            n = J.shape[-1]
            ld = torch.linalg.slogdet(torch.eye(n, dtype=J.dtype, device=J.device) + J)[1]
        elif mode == "unbiased":
            ld = _series(gx, xg, config, create_graph=track)
        else:
            ld = _series(gx, xg, config, create_graph=track, neumann=track)
    if not track:
        return gx.detach(), ld.detach(), None if J is None else J.detach()
    return gx, ld, J
