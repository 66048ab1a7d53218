"""log det(I + J_g(x)) for residual maps x ↦ x + g(x) with Lip(g) < 1, three ways.

* ``"exact"``: the full Jacobian by vector-Jacobian products (batched on vectors, one per
  coordinate on images: :func:`jacobian`), then slogdet.
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
import warnings
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
        roulette: distribution of the extra terms N: ``"geometric"`` (P(N ≥ m) = q^m with
            continuation probability q, at least 1 − p) or ``"poisson"`` (mean ``lam``).
        p: geometric parameter; q = 1 − p unless the variance rule raises it.
        lam: Poisson mean. The Poisson roulette has *infinite* variance for every J with
            nonzero spectral radius ρ: P(N ≥ m) ≈ e^{−λ} λ^m / m! falls faster than any ρ^{2m},
            so the second moment Σ_k ρ^{2k} / P(n_exact + N ≥ k) diverges whatever λ is (a
            warning says so when a stochastic mode uses it); it is offered for comparison
            with ResFlow's experiments, the geometric roulette with the variance rule for use.
        variance_margin: the variance rule of the geometric roulette. Term k of the series is
            of size ≈ ρ^k (ρ how much J contracts per application, at the data) and is reweighted
            by 1/q^(k − n_exact), so the estimator's second moment grows like Σ_k (ρ²/q)^k: it is
            *infinite* once ρ² ≥ q (with p = 0.5, once ρ ≥ 0.71), and a rare long series then
            returns an estimate, and a gradient, hundreds of times too large. The rule keeps
            ρ̂²/q ≤ ``variance_margin`` by raising q to ρ̂²/variance_margin (the block's measured
            contraction ρ̂, see :func:`residual_logdet`); None keeps q = 1 − p.
        max_continue: cap on q (on average at most q/(1 − q) extra terms).
        contraction_memory: per training call, the block's ρ̂ decays by this factor unless the
            latest series measured more (ρ̂ ← max(measured, memory·ρ̂)).
    """

    mode: Literal["exact", "unbiased", "neumann"] = "exact"
    n_exact_terms: int = 2
    roulette: Literal["geometric", "poisson"] = "geometric"
    p: float = 0.5
    lam: float = 2.0
    variance_margin: float | None = 0.8
    max_continue: float = 0.95
    contraction_memory: float = 0.999

    def __post_init__(self) -> None:
        if self.mode not in ("exact", "unbiased", "neumann"):
            raise ValueError(f"unknown log-det mode {self.mode!r}; use 'exact', 'unbiased' or 'neumann'")
        if self.roulette not in ("geometric", "poisson"):
            raise ValueError(f"unknown roulette {self.roulette!r}; use 'geometric' or 'poisson'")
        if self.n_exact_terms < 1:
            raise ValueError("n_exact_terms must be at least 1")
        if not 0 < self.p < 1 or self.lam <= 0:
            raise ValueError("need 0 < p < 1 and lam > 0")
        if self.variance_margin is not None and not 0 < self.variance_margin <= 1:
            raise ValueError(f"variance_margin must be in (0, 1] or None, got {self.variance_margin}")
        if not 1 - self.p <= self.max_continue < 1:
            raise ValueError(f"need 1 - p <= max_continue < 1, got max_continue={self.max_continue}, p={self.p}")
        if not 0 <= self.contraction_memory <= 1:
            raise ValueError(f"contraction_memory must be in [0, 1], got {self.contraction_memory}")
        if self.roulette == "poisson" and self.mode != "exact":
            warnings.warn(
                "the Poisson roulette's log-det estimate has infinite variance for any Jacobian with "
                "nonzero spectral radius (P(N >= m) falls factorially); use roulette='geometric', "
                "whose variance rule keeps it finite",
                RuntimeWarning,
                stacklevel=3,
            )

    def continuation(self, contraction: float = 0.0) -> float:
        """The geometric roulette's q = P(N ≥ m + 1 | N ≥ m) for a block whose J contracts by
        ``contraction`` per application: max(1 − p, min(contraction²/variance_margin, max_continue))."""
        q = 1 - self.p
        if self.variance_margin is not None:
            q = max(q, min(contraction**2 / self.variance_margin, self.max_continue))
        return q

    def draw_terms(self, q: float | None = None) -> int:
        """n_exact + N, N drawn from the roulette distribution (torch's global RNG; one uniform for
        the geometric roulette, whatever q); ``q`` the geometric continuation (default 1 − p)."""
        if self.roulette == "geometric":
            q = 1 - self.p if q is None else q
            u = float(torch.rand(()))
            extra = int(math.floor(math.log1p(-u) / math.log(q)))
        else:
            extra = int(torch.poisson(torch.tensor(self.lam)))
        return self.n_exact_terms + extra

    def survival(self, k: int, q: float | None = None) -> float:
        """P(n_exact + N ≥ k)."""
        m = k - self.n_exact_terms
        if m <= 0:
            return 1.0
        if self.roulette == "geometric":
            return (1 - self.p if q is None else q) ** m
        # P(N ≥ m) = γ(m, λ)/Γ(m), the regularised lower incomplete gamma: exact in the far tail,
        # where 1 − CDF cancels to rounding noise (relative error 2e-3 at λ = 2, m = 20; 0 at m = 30)
        m_, lam = torch.tensor([float(m), self.lam], dtype=torch.float64)
        return max(float(torch.special.gammainc(m_, lam)), 1e-300)


CPU_CHUNK_ELEMENTS = 2**16
"""On CPU a batched vector Jacobian takes its n directions in chunks of k with k·batch·n ≤ this
many elements: bigger temporaries are allocated afresh and page-faulted on every call
(``benchmarks/exact_jacobian.py``). On CUDA the caching allocator has no such cost."""


def _chunk(x: Tensor) -> int:
    """How many of the n = x[0].numel() directions one batched call takes."""
    n = x[0].numel()
    return n if x.device.type != "cpu" else max(1, min(n, CPU_CHUNK_ELEMENTS // x.numel()))


def jacobian(gx: Tensor, x: Tensor, create_graph: bool) -> Tensor:
    """Per-sample Jacobian J[b] = ∂g(x_b)/∂x_b, shape (batch, n, n), by vjps.

    Vectors: the n vjps batched (``is_grads_batched``, in chunks on CPU). Images (event dims > 1):
    one vjp per output coordinate, as for an op without a batching rule — torch 2.13 has none for
    conv2d's backward, and batching the vjps is then slower, several times so when differentiated
    (``benchmarks/exact_jacobian.py``). ``gx`` must have been computed from ``x`` row by row (no
    coupling across the batch).
    """
    B = x.shape[0]
    n = x[0].numel()
    eye = torch.eye(n, dtype=gx.dtype, device=gx.device)
    basis = eye.unsqueeze(1).expand(n, B, n).reshape(n, *gx.shape)

    def one_by_one() -> Tensor:
        return torch.stack(
            [torch.autograd.grad(gx, x, b, retain_graph=True, create_graph=create_graph)[0] for b in basis]
        )

    if x.dim() > 2:
        rows = one_by_one()
    else:
        try:
            rows = torch.cat([
                torch.autograd.grad(gx, x, b, retain_graph=True, create_graph=create_graph, is_grads_batched=True)[0]
                for b in basis.split(_chunk(x))
            ])
        except RuntimeError:  # an op without a batching rule
            rows = one_by_one()
    return rows.reshape(n, B, n).transpose(0, 1)


def _vjp(gx: Tensor, x: Tensor, w: Tensor, create_graph: bool) -> Tensor:
    return torch.autograd.grad(gx, x, w, retain_graph=True, create_graph=create_graph)[0]


def _row_norms(w: Tensor) -> Tensor:
    return w.flatten(1).norm(dim=1)


def _series(
    gx: Tensor,
    x: Tensor,
    config: LogDetConfig,
    create_graph: bool,
    neumann: bool = False,
    contraction: Tensor | None = None,
    update: bool = False,
) -> Tensor:
    """Russian-roulette Hutchinson estimate of Σ_k (−1)^{k+1} tr(J^k)/k.

    ``create_graph``: the estimate is differentiable through the series. ``neumann``: the series
    runs without a graph and the gradient comes from the Neumann series of tr((I+J)⁻¹ ∂J),
    accumulated over the same probes and roulette weights (accᵀ J v, one graph-carrying vjp).
    ``contraction``: the block's ρ̂ (a 0-d buffer), which sets the roulette's continuation
    probability before N is drawn; with ``update`` it then takes the contraction this series
    measured, the largest ‖(Jᵀ)^K v‖ / ‖(Jᵀ)^{K−1} v‖ over the batch (K the last term).
    """
    q = config.continuation(float(contraction)) if contraction is not None else None
    n_terms = config.draw_terms(q)
    v = torch.randn_like(x)
    w = w_prev = v
    est = x.new_zeros(x.shape[0])
    acc = torch.zeros_like(v) if neumann else None
    for k in range(1, n_terms + 1):
        weight = 1 / config.survival(k, q)
        if acc is not None:
            acc = acc + ((-1) ** (k - 1) * weight) * w  # term k−1 of the gradient series
        w_prev, w = w, _vjp(gx, x, w, create_graph and not neumann)
        est = est + ((-1) ** (k + 1) * weight / k) * (w * v).flatten(1).sum(1)
    if update and contraction is not None and n_terms >= 2:
        with torch.no_grad():
            ratio = _row_norms(w) / _row_norms(w_prev).clamp_min(torch.finfo(w.dtype).tiny)
            ratio = ratio[torch.isfinite(ratio)]  # a non-finite row must not poison the estimate
            seen = float(ratio.max()) if ratio.numel() else 0.0
            contraction.fill_(max(seen, config.contraction_memory * float(contraction)))
    if acc is None:
        return est
    surrogate = (_vjp(gx, x, acc.detach(), True) * v).flatten(1).sum(1)  # accᵀ J v
    return est.detach() + surrogate - surrogate.detach()


def residual_logdet(
    g: Callable[[Tensor], Tensor],
    x: Tensor,
    config: LogDetConfig,
    contraction: Tensor | None = None,
    update: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Evaluate g(x) and log det(I + J_g(x)).

    Args:
        g: a row-wise map (batch, *event) -> (batch, *event).
        x: input (batch, *event); gradients flow to it and to g's parameters when grad mode is on.
        config: the estimator.
        contraction: the caller's measured contraction ρ̂ of J_g (a 0-d tensor) for the
            stochastic estimators' variance rule (:class:`LogDetConfig`); ``update``: replace it
            by what this call measures (training), else only read it.

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
        else:
            neumann = mode == "neumann" and track
            ld = _series(gx, xg, config, create_graph=track, neumann=neumann, contraction=contraction, update=update)
    if not track:
        return gx.detach(), ld.detach(), None if J is None else J.detach()
    return gx, ld, J
