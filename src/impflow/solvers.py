"""Root finding for residual maps, and the implicit-function-theorem backward.

The one operation every residual/implicit block needs is

    solve (Id + g)(z) = y  for z,  per sample,

used by the ResFlow inverse and by both directions of the ImpFlow block. :func:`find_root`
solves a batch of independent systems F(x) = 0 (F maps row i of x to row i of the residual)
with Broyden's method or fixed-point iteration x ← x − F(x), stopping *per sample* when
‖F(x_i)‖₂ ≤ max(tol, 8·eps·(1 + ‖scale_i‖)) - the floor keeps a tolerance below the dtype's
resolution reachable. :func:`solve_residual` wraps it with a backward pass that never
differentiates through the iterations: with G(z) = z + g(z) and z* its root,

    ∂L/∂y = u,   u (I + J_g(z*)) = ∂L/∂z,      ∂L/∂θ = −u ∂g/∂θ (one vector-Jacobian product),

u found by a direct solve when the caller supplies J_g(z*) (exact log-det mode already has it)
and otherwise by the same root finder on u ↦ u + u J_g(z*) − ∂L/∂z.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "SolverConfig",
    "SolverStats",
    "SolveInfo",
    "ConvergenceWarning",
    "ConvergenceError",
    "find_root",
    "solve_residual",
    "default_tol",
]

Residual = Callable[[Tensor, Tensor | None], Tensor]
"""F(x_sub, idx): the residual of the rows ``idx`` of the batch (all rows when idx is None)."""


class ConvergenceWarning(RuntimeWarning):
    """A root solve stopped at its iteration cap with some samples above tolerance."""


class ConvergenceError(RuntimeError):
    """Raised instead of :class:`ConvergenceWarning` when ``on_failure="raise"``."""


def default_tol(dtype: torch.dtype) -> float:
    """Default absolute tolerance on ‖F‖₂: 1e-6 in float32 (and lower precisions), 1e-12 in float64."""
    return 1e-12 if dtype == torch.float64 else 1e-6


@dataclass
class SolverConfig:
    """Settings of a root solve.

    Attributes:
        method: ``"broyden"`` (quasi-Newton with Armijo line search) or ``"fixed_point"``.
        tol: absolute tolerance on each sample's ‖F‖₂; None picks :func:`default_tol`; 0 runs
            exactly ``max_iter`` iterations.
        max_iter: iteration cap of the main method.
        memory: Broyden rank; the low-rank inverse-Jacobian restarts from I when full.
        line_search: Armijo backtracking (α = 1, ½, ¼) on ½‖F‖², then a fixed-point step.
        fallback_iter: fixed-point iterations for samples Broyden leaves unconverged.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"`` when samples stay above tolerance.
        backward_tol: relative tolerance (‖residual‖ ≤ backward_tol·‖∂L/∂z‖) of the iterative
            backward solve; None picks :func:`default_tol`.
    """

    method: Literal["broyden", "fixed_point"] = "broyden"
    tol: float | None = None
    max_iter: int = 100
    memory: int = 32
    line_search: bool = True
    fallback_iter: int = 200
    on_failure: Literal["warn", "raise", "ignore"] = "warn"
    backward_tol: float | None = None

    def __post_init__(self) -> None:
        if self.method not in ("broyden", "fixed_point"):
            raise ValueError(f"unknown solver method {self.method!r}; use 'broyden' or 'fixed_point'")
        if self.on_failure not in ("warn", "raise", "ignore"):
            raise ValueError(f"on_failure must be 'warn', 'raise' or 'ignore', got {self.on_failure!r}")
        if self.max_iter < 1 or self.memory < 1:
            raise ValueError("max_iter and memory must be positive")

    def replace(self, **changes) -> "SolverConfig":
        return replace(self, **changes)


@dataclass
class SolverStats:
    """What one solve did. Iteration counts are per sample; ``calls`` counts batched F calls."""

    method: str
    batch: int
    iterations: int
    mean_iterations: float
    evaluations: float
    calls: int
    max_residual: float
    mean_residual: float
    converged: int
    fallback: int

    @property
    def failed(self) -> int:
        return self.batch - self.converged

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class SolveInfo:
    """Statistics of a :func:`solve_residual` call; ``backward`` is filled in when gradients flow.

    Set ``jacobian`` to J_g(z*) (shape (batch, n, n)) before the backward pass to replace the
    iterative backward solve by a direct one.
    """

    forward: SolverStats
    backward: SolverStats | None = None
    jacobian: Tensor | None = field(default=None, repr=False)


class _Counter:
    """Counts batched calls and per-sample evaluations of a residual function."""

    def __init__(self, fn: Residual, batch: int) -> None:
        self.fn, self.batch = fn, batch
        self.calls = 0
        self.sample_evals = 0

    def __call__(self, x: Tensor, idx: Tensor | None) -> Tensor:
        self.calls += 1
        self.sample_evals += x.shape[0]
        return self.fn(x, idx)


def _norm(f: Tensor) -> Tensor:
    """Row norms, with non-finite rows mapped to +inf so they never count as converged."""
    r = f.norm(dim=1)
    return torch.where(torch.isfinite(r), r, torch.full_like(r, float("inf")))


def _active(res: Tensor, thresh: Tensor) -> tuple[Tensor, slice | Tensor, Tensor | None]:
    """Unconverged rows: (indices, a selector for them, the index to pass to F).

    While every row is active the selector is a plain slice (views, no gather/scatter) and F
    gets ``None``.
    """
    act = (res > thresh).nonzero().flatten()
    if act.numel() == res.numel():
        return act, slice(None), None
    return act, act, act


def _fixed_point(
    F: _Counter, x: Tensor, fx: Tensor, res: Tensor, thresh: Tensor, iters: Tensor, max_iter: int
) -> None:
    """x ← x − F(x) on the unconverged rows, in place."""
    for _ in range(max_iter):
        act, sel, idx = _active(res, thresh)
        if act.numel() == 0:
            return
        xn = x[sel] - fx[sel]
        fn = F(xn, idx)
        x[sel], fx[sel], res[sel] = xn, fn, _norm(fn)
        iters[sel] += 1


def _bmv(A: Tensor, v: Tensor) -> Tensor:
    """Batched matrix-vector product: A (b, n, m), v (b, m) -> (b, n)."""
    return torch.bmm(A, v.unsqueeze(-1)).squeeze(-1)


def _broyden(
    F: _Counter,
    x: Tensor,
    fx: Tensor,
    res: Tensor,
    thresh: Tensor,
    iters: Tensor,
    config: SolverConfig,
) -> None:
    """Good Broyden on the unconverged rows, in place.

    The inverse Jacobian of F is approximated per sample by H = I + U Vᵀ (F ≈ identity near
    the root since J_g is a contraction), updated with
    H⁺ = H + (s − H y) sᵀH / (sᵀ H y), s = Δx, y = ΔF. Division by a vanishing sᵀ H y skips
    that sample's update (selected by ``torch.where``, so a NaN never leaks into other rows).
    Only the columns of U, V filled since the last restart enter the products.
    """
    B, n = x.shape
    m = min(config.memory, config.max_iter)
    U = x.new_zeros(B, n, m)
    V = x.new_zeros(B, n, m)
    tiny = torch.finfo(x.dtype).tiny ** 0.5
    for k in range(config.max_iter):
        act, sel, idx = _active(res, thresh)
        if act.numel() == 0:
            return
        col = k % m  # columns [0, col) hold the updates since the last restart
        xa, fa = x[sel], fx[sel]
        Ua, Va = U[sel, :, :col], V[sel, :, :col]
        p = -(fa + _bmv(Ua, _bmv(Va.transpose(1, 2), fa))) if col else -fa
        p = torch.where(torch.isfinite(p).all(dim=1, keepdim=True), p, -fa)
        xn = xa + p
        fn = F(xn, idx)
        rn = _norm(fn)
        if config.line_search:
            ra2 = res[sel].pow(2)
            alpha = 1.0
            for _ in range(2):
                bad = ~(rn.pow(2) <= (1 - 2e-4 * alpha) * ra2)
                if not bool(bad.any()):
                    break
                alpha /= 2
                b = bad.nonzero().flatten()
                xn[b] = xa[b] + alpha * p[b]
                fn[b] = F(xn[b], act[b])
                rn[b] = _norm(fn[b])
            bad = ~(rn.pow(2) <= (1 - 2e-4 * alpha) * ra2)
            if bool(bad.any()):  # no sufficient decrease along p: take a contraction step
                b = bad.nonzero().flatten()
                xn[b] = xa[b] - fa[b]
                fn[b] = F(xn[b], act[b])
                rn[b] = _norm(fn[b])
        s = xn - xa
        y = fn - fa
        if col:
            Hy = y + _bmv(Ua, _bmv(Va.transpose(1, 2), y))
            sH = s + _bmv(Va, _bmv(Ua.transpose(1, 2), s))
        else:
            Hy, sH = y, s
        den = (s * Hy).sum(dim=1, keepdim=True)
        ok = den.abs() > tiny * s.norm(dim=1, keepdim=True) * Hy.norm(dim=1, keepdim=True)
        ok = ok & torch.isfinite(den) & torch.isfinite(Hy).all(dim=1, keepdim=True)
        ok = ok & torch.isfinite(sH).all(dim=1, keepdim=True)
        den_safe = torch.where(ok, den, torch.ones_like(den))
        U[sel, :, col] = torch.where(ok, (s - Hy) / den_safe, torch.zeros_like(s))
        V[sel, :, col] = torch.where(ok, sH, torch.zeros_like(s))
        x[sel], fx[sel], res[sel] = xn, fn, rn
        iters[sel] += 1


@torch.no_grad()
def find_root(
    F: Residual,
    x0: Tensor,
    config: SolverConfig | None = None,
    scale: Tensor | None = None,
    what: str = "solve",
) -> tuple[Tensor, SolverStats]:
    """Solve F(x) = 0 for a batch of independent systems.

    Args:
        F: residual, ``F(x_sub, idx)`` for rows ``idx`` (None = all); x (b, n) -> (b, n).
        x0: initial guess (batch, n).
        config: solver settings.
        scale: (batch,) magnitudes that set each row's floor 8·eps·(1 + scale_i) on the tolerance.
        what: a name for messages.

    Returns:
        the solution (batch, n) and its :class:`SolverStats`. Rows above tolerance at the end
        warn or raise per ``config.on_failure``.
    """
    config = config or SolverConfig()
    if x0.dim() != 2:
        raise ValueError(f"find_root expects (batch, n) rows, got shape {tuple(x0.shape)}")
    B = x0.shape[0]
    tol = config.tol if config.tol is not None else default_tol(x0.dtype)
    eps = torch.finfo(x0.dtype).eps
    scale = x0.new_zeros(B) if scale is None else scale.to(x0)
    # tol = 0 asks for exactly max_iter iterations (fixed budgets, benchmarks)
    thresh = torch.clamp(8 * eps * (1 + scale), min=tol) if tol > 0 else torch.zeros_like(scale)
    counter = _Counter(F, B)
    x = x0.clone()
    fx = counter(x, None)
    res = _norm(fx)
    iters = torch.zeros(B, dtype=torch.long, device=x0.device)
    if config.method == "broyden":
        _broyden(counter, x, fx, res, thresh, iters, config)
        left = res > thresh
        fallback = int(left.sum())
        if fallback and config.fallback_iter > 0:
            _fixed_point(counter, x, fx, res, thresh, iters, config.fallback_iter)
    else:
        fallback = 0
        _fixed_point(counter, x, fx, res, thresh, iters, config.max_iter)
    converged = res <= thresh
    finite_res = torch.where(torch.isfinite(res), res, torch.zeros_like(res))
    stats = SolverStats(
        method=config.method,
        batch=B,
        iterations=int(iters.max()) if B else 0,
        mean_iterations=float(iters.float().mean()) if B else 0.0,
        evaluations=counter.sample_evals / max(B, 1),
        calls=counter.calls,
        max_residual=float(res.max()) if B else 0.0,
        mean_residual=float(finite_res.mean()) if B else 0.0,
        converged=int(converged.sum()),
        fallback=fallback,
    )
    if stats.failed and config.on_failure != "ignore":
        worst = int(res.argmax())
        msg = (
            f"{what}: {config.method} left {stats.failed} of {B} samples unconverged after "
            f"{stats.iterations} iterations; worst ‖F‖ = {stats.max_residual:.3e} (sample {worst}, "
            f"tolerance {float(thresh[worst]):.1e}). Lip(g) may be too close to 1, or raise max_iter."
        )
        if config.on_failure == "raise":
            raise ConvergenceError(msg)
        warnings.warn(msg, ConvergenceWarning, stacklevel=3)
    return x, stats


def solve_residual(
    g: Callable[[Tensor], Tensor],
    y: Tensor,
    config: SolverConfig | None = None,
    z0: Tensor | None = None,
) -> tuple[Tensor, SolveInfo]:
    """Solve z + g(z) = y per sample, differentiably (implicit function theorem).

    Args:
        g: a function acting row-wise on the batch (row i of g(z) depends on row i of z only).
        y: right-hand side (batch, *event).
        config: solver settings.
        z0: initial guess; y by default.

    Returns:
        z with the shape of y - when grad mode is on, z = y − g(z*) carries the implicit
        gradient (its value is z* refined by one more contraction step) - and a
        :class:`SolveInfo`.
    """
    config = config or SolverConfig()
    shape = y.shape
    B = shape[0]
    y_flat = y.detach().reshape(B, -1)

    def residual(z: Tensor, idx: Tensor | None) -> Tensor:
        rhs = y_flat if idx is None else y_flat[idx]
        zz = z.view(z.shape[0], *shape[1:])
        return (zz + g(zz)).reshape(z.shape[0], -1) - rhs

    start = y_flat if z0 is None else z0.detach().reshape(B, -1)
    with torch.no_grad():
        z_flat, stats = find_root(residual, start, config, scale=y_flat.norm(dim=1), what="solve (Id + g)(z) = y")
    info = SolveInfo(forward=stats)
    z_star = z_flat.view(shape)
    if not torch.is_grad_enabled():
        return z_star, info

    gz = g(z_star.detach())  # graph to g's parameters only
    out = y - gz
    if not out.requires_grad:
        return out.detach(), info

    def implicit_backward(v: Tensor | None) -> Tensor | None:
        if v is None:
            return None
        v_flat = v.reshape(B, -1)
        if info.jacobian is not None:
            n = v_flat.shape[1]
            A = torch.eye(n, dtype=v.dtype, device=v.device) + info.jacobian.detach()
            u = torch.linalg.solve(A.transpose(1, 2), v_flat.unsqueeze(-1)).squeeze(-1)
            return u.view(shape)
        with torch.enable_grad():
            z_leaf = z_star.detach().requires_grad_(True)
            gz_leaf = g(z_leaf)

        def adjoint(u: Tensor, idx: Tensor | None) -> Tensor:
            if idx is None:
                full = u
            else:
                full = torch.zeros_like(v_flat)
                full[idx] = u
            (uJ,) = torch.autograd.grad(gz_leaf, z_leaf, full.view(shape), retain_graph=True)
            uJ = uJ.reshape(B, -1)
            rhs = v_flat
            if idx is not None:
                uJ, rhs = uJ[idx], v_flat[idx]
            return u + uJ - rhs

        btol = config.backward_tol if config.backward_tol is not None else default_tol(v.dtype)
        u, bstats = _find_root_relative(adjoint, v_flat.detach(), config, v_flat.norm(dim=1), btol)
        info.backward = bstats
        return u.view(shape)

    out.register_hook(implicit_backward)
    # Return an alias: a Jacobian taken with respect to the result (e.g. for its log-det) stops
    # at the alias and never triggers the implicit backward, which only the full backward pass reaches.
    return out.view_as(out), info


def _find_root_relative(
    F: Residual, x0: Tensor, config: SolverConfig, scale: Tensor, rtol: float
) -> tuple[Tensor, SolverStats]:
    """find_root with a per-row tolerance rtol·scale_i (the backward system is linear in ∂L/∂z)."""
    s = torch.where(scale > 0, scale, torch.ones_like(scale))

    def scaled(x: Tensor, idx: Tensor | None) -> Tensor:
        si = s if idx is None else s[idx]
        return F(x * si.unsqueeze(1), idx) / si.unsqueeze(1)

    x, stats = find_root(scaled, x0 / s.unsqueeze(1), config.replace(tol=rtol), what="implicit backward")
    return x * s.unsqueeze(1), stats
