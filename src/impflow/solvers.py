"""Root finding for residual maps, and the implicit-function-theorem backward.

The one operation every residual/implicit block needs is

    solve (Id + g)(z) = y  for z,  per sample,

used by the ResFlow inverse and by both directions of the ImpFlow block. :func:`find_root`
solves a batch of independent systems F(x) = 0 (F maps row i of x to row i of the residual)
with Broyden's method or fixed-point iteration x ← x − F(x) (by default "auto" picks per solve,
see :func:`resolve_method`), stopping *per sample* when
‖F(x_i)‖₂ ≤ max(tol, 8·eps·(1 + ‖scale_i‖)) - the floor keeps a tolerance below the dtype's
resolution reachable. :func:`solve_residual` wraps it with a backward pass that never
differentiates through the iterations: with G(z) = z + g(z) and z* its root,

    ∂L/∂y = u,   u (I + J_g(z*)) = ∂L/∂z,      ∂L/∂θ = −u ∂g/∂θ (one vector-Jacobian product),

u found by a direct solve when the caller supplies J_g(z*) (exact log-det mode already has it)
and otherwise by the same root finder on u ↦ u + u J_g(z*) − ∂L/∂z.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
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
    "resolve_method",
    "AUTO_BROYDEN_MAX_DIM",
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


METHODS = ("auto", "broyden", "fixed_point")

AUTO_BROYDEN_MAX_DIM = 16
"""``method="auto"`` runs Broyden from the start for vector rows of at most this many entries."""

AUTO_PROBE_ITERS = 4
"""Otherwise "auto" starts with this many fixed-point iterations, which measure the contraction."""

AUTO_SWITCH_ITERS = {"vector": 20.0, "image": 5.0}
"""… and hands the unconverged rows to Broyden when fixed point is predicted to need more than
this many further iterations (median over those rows): few for image-shaped rows (a conv g costs
far more per entry than Broyden's vector updates), many for vectors."""


def resolve_method(method: str, x: Tensor, event_shape: Sequence[int] | None = None) -> str:
    """The method a solve of the rows x (batch, n) starts with: ``method`` unless it is "auto".

    "auto" (the default) resolves to ``"broyden"`` for vector rows (``event_shape`` None or
    1-D) with n ≤ :data:`AUTO_BROYDEN_MAX_DIM`, in any dtype, else to ``"fixed_point"``, which under
    "auto" hands over to Broyden when the observed contraction is slow (see :func:`find_root`;
    the stats then name ``"fixed_point+broyden"``). The rule comes from ``benchmarks/solver.py``
    (results/solver.md): Broyden's cost per iteration beyond its g evaluation (low-rank
    products and ~18 elementwise passes over the rows) is repaid only where it saves enough
    evaluations - on low-dimensional problems, where its Jacobian model is accurate after a few
    steps, and on slowly contracting ones, where "slow" starts much earlier for image-shaped
    rows (a conv g costs far more per entry) than for vectors (a cheap MLP g).
    """
    _check_method(method)
    if method != "auto":
        return method
    small = x.dim() == 2 and x.shape[1] <= AUTO_BROYDEN_MAX_DIM and not _is_image(event_shape)
    return "broyden" if small else "fixed_point"


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown solver method {method!r}; use 'auto', 'broyden' or 'fixed_point'")


def _is_image(event_shape: Sequence[int] | None) -> bool:
    return event_shape is not None and len(event_shape) >= 2


def _predicted_iterations(prev: Tensor, res: Tensor, thresh: Tensor) -> float:
    """Median over the unconverged (finite) rows of the fixed-point iterations still needed,
    log(thresh/‖F‖)/log(ρ), with ρ = ‖F_k‖/‖F_{k−1}‖ the last observed contraction (ρ ≥ 1: ∞)."""
    act = (res > thresh) & torch.isfinite(res) & torch.isfinite(prev) & (prev > 0)
    if not bool(act.any()):
        return 0.0
    rate = res[act] / prev[act]
    need = torch.log(thresh[act] / res[act]) / torch.log(rate.clamp(max=1.0))  # −/− ≥ 0; ρ = 1: ∞
    need = torch.where(rate < 1, need, torch.full_like(need, float("inf")))
    need = torch.nan_to_num(need, nan=float("inf"))  # thresh = 0 (fixed budgets): log 0 = −∞
    return float(need.median())


@dataclass
class SolverConfig:
    """Settings of a root solve.

    Attributes:
        method: ``"auto"`` (default: picks per solve, see :func:`resolve_method`), ``"broyden"``
            (quasi-Newton with Armijo line search) or ``"fixed_point"``.
        tol: absolute tolerance on each sample's ‖F‖₂; None picks :func:`default_tol`; 0 runs
            exactly ``max_iter`` iterations.
        max_iter: iteration cap of the main method.
        memory: Broyden rank; the low-rank inverse-Jacobian restarts from I when full.
        line_search: Armijo backtracking (α = 1, ½, ¼) on ½‖F‖², then a fixed-point step.
        fallback_iter: iterations of the other method for samples the main one leaves
            unconverged: fixed point after Broyden, Broyden after "auto"'s fixed point.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"`` when samples stay above tolerance.
        backward_tol: relative tolerance (‖residual‖ ≤ backward_tol·‖∂L/∂z‖) of the iterative
            backward solve; None picks :func:`default_tol`.
    """

    method: Literal["auto", "broyden", "fixed_point"] = "auto"
    tol: float | None = None
    max_iter: int = 100
    memory: int = 32
    line_search: bool = True
    fallback_iter: int = 200
    on_failure: Literal["warn", "raise", "ignore"] = "warn"
    backward_tol: float | None = None

    def __post_init__(self) -> None:
        _check_method(self.method)
        if self.on_failure not in ("warn", "raise", "ignore"):
            raise ValueError(f"on_failure must be 'warn', 'raise' or 'ignore', got {self.on_failure!r}")
        if self.max_iter < 1 or self.memory < 1:
            raise ValueError("max_iter and memory must be positive")

    def replace(self, **changes) -> "SolverConfig":
        return replace(self, **changes)


@dataclass
class SolverStats:
    """What one solve did. Iteration counts are per sample; ``calls`` counts batched F calls.

    ``method`` is what ran (``"auto"`` resolved): ``"broyden"``, ``"fixed_point"`` or
    ``"fixed_point+broyden"`` (auto's fixed point handed over to Broyden); ``fallback`` counts
    the rows the main method left to the fallback method.
    """

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


class _Rows:
    """The unconverged rows of a solve, held compactly.

    ``rows`` are their batch indices; ``x``, ``fx``, ``res``, ``thresh`` their iterate, residual,
    residual norm and tolerance. Converged rows are written back to the caller's full tensors
    and dropped (:meth:`retire`), so an iteration touches only the active rows and never gathers
    or scatters the whole batch; while every row is active F gets ``idx=None``.
    """

    def __init__(self, x: Tensor, fx: Tensor, res: Tensor, thresh: Tensor, iters: Tensor) -> None:
        self.out = (x, fx, res)
        self.iters = iters
        self.batch = x.shape[0]
        self.rows = (res > thresh).nonzero().flatten()
        if self.rows.numel() == self.batch:  # all active: work on copies, no gather
            self.x, self.fx, self.res, self.thresh = x.clone(), fx.clone(), res.clone(), thresh
        else:
            r = self.rows
            self.x, self.fx, self.res, self.thresh = x[r], fx[r], res[r], thresh[r]

    @property
    def count(self) -> int:
        return self.rows.numel()

    @property
    def idx(self) -> Tensor | None:
        """The index to pass to F: None while every row of the batch is active."""
        return None if self.count == self.batch else self.rows

    def step(self, x: Tensor, fx: Tensor, res: Tensor) -> Tensor | None:
        """Accept one iteration of every active row; returns the positions (in the compact
        arrays) of the rows that stay active, or None when all do."""
        self.x, self.fx, self.res = x, fx, res
        self.iters[self.rows] += 1
        done = res <= self.thresh
        if not bool(done.any()):
            return None
        self._write(done.nonzero().flatten())
        keep = (~done).nonzero().flatten()
        self.rows, self.thresh = self.rows[keep], self.thresh[keep]
        self.x, self.fx, self.res = x[keep], fx[keep], res[keep]
        return keep

    def _write(self, pos: Tensor) -> None:
        x, fx, res = self.out
        r = self.rows[pos]
        x[r], fx[r], res[r] = self.x[pos], self.fx[pos], self.res[pos]

    def finish(self) -> None:
        """Write the rows still active back to the caller's tensors."""
        if self.count:
            self._write(torch.arange(self.count, device=self.rows.device))


def _fixed_point(
    F: _Counter, x: Tensor, fx: Tensor, res: Tensor, thresh: Tensor, iters: Tensor, max_iter: int
) -> None:
    """x ← x − F(x) on the unconverged rows, in place."""
    a = _Rows(x, fx, res, thresh, iters)
    for _ in range(max_iter):
        if a.count == 0:
            break
        xn = a.x - a.fx
        fn = F(xn, a.idx)
        a.step(xn, fn, _norm(fn))
    a.finish()


def _low_rank(A: list[Tensor], C: list[Tensor], v: Tensor, add: Tensor) -> Tensor:
    """add + Σ_j a_j (c_j · v) per row, for lists of (b, n) vectors a_j, c_j; v, add (b, n).

    One dot product and one fused multiply-add per j, each a single pass over (b, n): on CPU
    this is about 3× faster than ``bmm`` on (b, k, n) stacks, whose b separate thin
    matrix-vector products are dominated by per-product overhead.
    """
    out = add
    for a, c in zip(A, C):
        out = torch.addcmul(out, a, _dot(c, v))
    return out


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot products (b, 1)."""
    return (a * b).sum(dim=1, keepdim=True)


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

    The inverse Jacobian of F is approximated per sample by H = I + Σ_j u_j v_jᵀ (F ≈ identity
    near the root since J_g is a contraction), updated with
    H⁺ = H + (s − H y) sᵀH / (sᵀ H y), s = Δx, y = ΔF. Division by a vanishing sᵀ H y skips
    that sample's update (u = v = 0, selected so that a NaN never leaks into other rows).

    Cost per iteration besides the batched F call: one low-rank product for w = H f(x_new),
    which gives both H y = w − H f(x) and, after the rank-one update, the next step
    −H⁺ f(x_new) = −(w + u (v·f(x_new))), and one for sᵀH; each reads the k stored vector
    pairs once. With ~18 elementwise passes over the active rows this is O(b·n·(k + 18)) memory
    traffic per iteration, which is what Broyden must save in evaluations of g to pay off. The
    vectors of converged rows are dropped when they converge (no per-iteration gathers).
    """
    m = max(1, min(config.memory, config.max_iter))
    a = _Rows(x, fx, res, thresh, iters)
    U: list[Tensor] = []  # u_j (b, n) of the updates since the last restart
    V: list[Tensor] = []
    hf = None  # H f(x) of the active rows (None: H = I, so H f(x) = f(x))
    tiny = torch.finfo(x.dtype).tiny ** 0.5
    for _ in range(config.max_iter):
        if a.count == 0:
            break
        if len(U) == m:  # memory full: restart from H = I
            U, V, hf = [], [], None
        xa, fa, ra = a.x, a.fx, a.res
        if hf is None:
            hf = fa
        elif not bool(torch.isfinite(hf.norm(dim=1)).all()):  # a non-finite step: contraction step instead
            hf = torch.where(torch.isfinite(hf).all(dim=1, keepdim=True), hf, fa)
        xn = xa - hf  # the step p = −H f(x)
        fn = F(xn, a.idx)
        rn = _norm(fn)
        if config.line_search:
            ra2 = ra.pow(2)
            alpha = 1.0
            for _ in range(2):
                bad = ~(rn.pow(2) <= (1 - 2e-4 * alpha) * ra2)
                if not bool(bad.any()):
                    break
                alpha /= 2
                b = bad.nonzero().flatten()
                xn[b] = xa[b] - alpha * hf[b]
                fn[b] = F(xn[b], a.rows[b])
                rn[b] = _norm(fn[b])
            bad = ~(rn.pow(2) <= (1 - 2e-4 * alpha) * ra2)
            if bool(bad.any()):  # no sufficient decrease along p: take a contraction step
                b = bad.nonzero().flatten()
                xn[b] = xa[b] - fa[b]
                fn[b] = F(xn[b], a.rows[b])
                rn[b] = _norm(fn[b])
        s = xn - xa
        w = _low_rank(U, V, fn, fn)  # H f(x_new)
        sH = _low_rank(V, U, s, s)  # Hᵀ s
        Hy = w - hf
        den = _dot(s, Hy)
        hy_norm = Hy.norm(dim=1, keepdim=True)
        ok = torch.isfinite(den) & torch.isfinite(hy_norm)
        ok = ok & (den.abs() > tiny * s.norm(dim=1, keepdim=True) * hy_norm)
        inv = torch.where(ok, 1 / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(den))
        u = (s - Hy) * inv
        v = sH
        if not bool(ok.all()):  # zero the skipped rows' vectors (a NaN times 0 is still NaN)
            u = torch.where(ok, u, torch.zeros_like(u))
            v = torch.where(ok, v, torch.zeros_like(v))
        U.append(u)
        V.append(v)
        hf = torch.addcmul(w, u, _dot(v, fn))  # H⁺ f(x_new): the next step is −hf
        keep = a.step(xn, fn, rn)
        if keep is not None:  # rows converged: keep the others' vectors
            U, V, hf = [t[keep] for t in U], [t[keep] for t in V], hf[keep]
    a.finish()


@torch.no_grad()
def find_root(
    F: Residual,
    x0: Tensor,
    config: SolverConfig | None = None,
    scale: Tensor | None = None,
    what: str = "solve",
    event_shape: Sequence[int] | None = None,
) -> tuple[Tensor, SolverStats]:
    """Solve F(x) = 0 for a batch of independent systems.

    Args:
        F: residual, ``F(x_sub, idx)`` for rows ``idx`` (None = all); x (b, n) -> (b, n).
        x0: initial guess (batch, n).
        config: solver settings.
        scale: (batch,) magnitudes that set each row's floor 8·eps·(1 + scale_i) on the tolerance.
        what: a name for messages.
        event_shape: the shape each row of x flattens (e.g. (C, H, W)); only ``method="auto"``
            uses it (image-shaped rows hand over to Broyden sooner). None: vectors.

    Returns:
        the solution (batch, n) and its :class:`SolverStats`. Rows above tolerance at the end
        warn or raise per ``config.on_failure``.

    ``method="auto"``: Broyden for vector rows of n ≤ :data:`AUTO_BROYDEN_MAX_DIM` entries;
    otherwise :data:`AUTO_PROBE_ITERS` fixed-point iterations, after which the
    unconverged rows continue with Broyden if fixed point is predicted (from each row's last
    contraction ratio) to need more than :data:`AUTO_SWITCH_ITERS` further iterations (median;
    5 for image-shaped rows, 20 for vectors), else with fixed point, with Broyden for the rows
    still unconverged after ``max_iter`` iterations. The stats
    name what ran: ``"broyden"``, ``"fixed_point"`` or ``"fixed_point+broyden"``.
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
    method = resolve_method(config.method, x0, event_shape)
    counter = _Counter(F, B)
    x = x0.clone()
    fx = counter(x, None)
    res = _norm(fx)
    iters = torch.zeros(B, dtype=torch.long, device=x0.device)

    def broyden_then_fixed_point(max_iter: int) -> int:
        """Broyden, then fixed point on the rows it leaves; returns how many it left."""
        _broyden(counter, x, fx, res, thresh, iters, config.replace(max_iter=max_iter))
        left = int((res > thresh).sum())
        if left and config.fallback_iter > 0:
            _fixed_point(counter, x, fx, res, thresh, iters, config.fallback_iter)
        return left

    fallback = 0
    if method == "broyden":
        fallback = broyden_then_fixed_point(config.max_iter)
    elif config.method == "fixed_point":  # asked for (auto may also resolve to "fixed_point": below)
        _fixed_point(counter, x, fx, res, thresh, iters, config.max_iter)
    else:  # auto: fixed point, handing slowly contracting solves over to Broyden
        probe = min(AUTO_PROBE_ITERS, config.max_iter)
        _fixed_point(counter, x, fx, res, thresh, iters, probe - 1)
        prev = res.clone()
        _fixed_point(counter, x, fx, res, thresh, iters, 1)
        rest = config.max_iter - probe
        if bool((res > thresh).any()):
            switch = AUTO_SWITCH_ITERS["image" if _is_image(event_shape) else "vector"]
            if rest > 0 and _predicted_iterations(prev, res, thresh) > switch:
                method = "fixed_point+broyden"
                fallback = broyden_then_fixed_point(rest)
            else:
                _fixed_point(counter, x, fx, res, thresh, iters, rest)
                fallback = int((res > thresh).sum())
                if fallback and config.fallback_iter > 0:  # the stragglers: Broyden
                    method = "fixed_point+broyden"
                    _broyden(counter, x, fx, res, thresh, iters, config.replace(max_iter=config.fallback_iter))
    converged = res <= thresh
    finite_res = torch.where(torch.isfinite(res), res, torch.zeros_like(res))
    stats = SolverStats(
        method=method,
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
            f"{what}: {method} left {stats.failed} of {B} samples unconverged after "
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
        z_flat, stats = find_root(
            residual, start, config, scale=y_flat.norm(dim=1), what="solve (Id + g)(z) = y", event_shape=shape[1:]
        )
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
        u, bstats = _find_root_relative(adjoint, v_flat.detach(), config, v_flat.norm(dim=1), btol, shape[1:])
        info.backward = bstats
        return u.view(shape)

    out.register_hook(implicit_backward)
    # Return an alias: a Jacobian taken with respect to the result (e.g. for its log-det) stops
    # at the alias and never triggers the implicit backward, which only the full backward pass reaches.
    return out.view_as(out), info


def _find_root_relative(
    F: Residual, x0: Tensor, config: SolverConfig, scale: Tensor, rtol: float, event_shape: Sequence[int]
) -> tuple[Tensor, SolverStats]:
    """find_root with a per-row tolerance rtol·scale_i (the backward system is linear in ∂L/∂z)."""
    s = torch.where(scale > 0, scale, torch.ones_like(scale))

    def scaled(x: Tensor, idx: Tensor | None) -> Tensor:
        si = s if idx is None else s[idx]
        return F(x * si.unsqueeze(1), idx) / si.unsqueeze(1)

    x, stats = find_root(
        scaled, x0 / s.unsqueeze(1), config.replace(tol=rtol), what="implicit backward", event_shape=event_shape
    )
    return x * s.unsqueeze(1), stats
