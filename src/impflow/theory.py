"""Closed-form likelihood optima of linear-Gaussian models (seed 003, DESIGN.md §4).

Any affine flow x ↦ A x + b with a standard-normal base is a Gaussian N(μ, Σ), so its best
training NLL is that of the maximum-likelihood Gaussian:

    NLL* = ½ Σ_i log(2πe λ_i)   nats per example,

λ_i the eigenvalues of the ML covariance Σ̂ = (1/N) Σ_n (x_n − x̄)(x_n − x̄)ᵀ of the data as
the model sees it (after the same preprocessing). Probabilistic PCA with q < D components
(Tipping & Bishop) keeps the top q eigenvalues and replaces the rest by their mean σ²,
giving a coarser baseline. Every nonlinear flow should beat both.

Rank-deficient data (a constant feature, an exact linear relation) make some λ_i = 0 and
NLL* = −∞: the data lie on a lower-dimensional set. To keep the numbers finite, model
eigenvalues are floored at ``ridge · mean(λ)`` (at ``ridge`` if every feature is constant),
i.e. the fitted covariance is V diag(max(λ_i, floor)) Vᵀ. The floored directions then
contribute an arbitrary (ridge-dependent) amount; ``n_floored`` reports how many there are.
All computation is in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .transforms.base import check_input

__all__ = [
    "gaussian_nll",
    "ppca_nll",
    "theorem3_bound",
    "best_slope_bounded_fit",
    "jacobian_spectral_norms",
    "block_jacobian",
    "estimate_lipschitz",
    "block_lipschitz_bounds",
]

_LN2 = math.log(2.0)
_DEFAULT_RIDGE = 1e-8


class _Fit(NamedTuple):
    mean: Tensor  # (D,)
    eigvals: Tensor  # (D,) descending, clamped at 0
    eigvecs: Tensor  # (D, D), columns matching eigvals
    floor: float


def _as_matrix(x: Tensor, name: str) -> Tensor:
    """(N, *event) tensor or array -> (N, D) float64; non-finite entries are an error."""
    x = torch.as_tensor(x)
    if x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected (N, D) or (N, *event) with N >= 1")
    x = x.detach().reshape(x.shape[0], -1).to(torch.float64)
    check_input(x, name=name)
    return x


def _fit(train: Tensor, ridge: float) -> _Fit:
    """ML mean and eigen-decomposition of the ML covariance of ``train``."""
    if ridge <= 0:
        raise ValueError(f"ridge must be positive, got {ridge}")
    x = _as_matrix(train, "train")
    mean = x.mean(dim=0)
    centred = x - mean
    cov = centred.T @ centred / x.shape[0]
    eigvals, eigvecs = torch.linalg.eigh(cov)
    eigvals, eigvecs = eigvals.flip(0).clamp_min(0.0), eigvecs.flip(1)
    scale = eigvals.mean().item()
    return _Fit(mean, eigvals, eigvecs, ridge * (scale if scale > 0 else 1.0))


def _nll_from_spectra(data_eig: Tensor, model_eig: Tensor, floor: float) -> float:
    """Mean NLL of N(x̄, V diag(m) Vᵀ) on data with covariance V diag(λ) Vᵀ:
    ½ Σ_i [log(2π m̃_i) + λ_i / m̃_i] with m̃ = max(m, floor); = ½ Σ log(2πe λ_i) when m = λ > floor."""
    m = model_eig.clamp_min(floor)
    return 0.5 * (torch.log(2 * math.pi * m) + data_eig / m).sum().item()


def gaussian_nll(
    train: Tensor, test: Tensor | None = None, ridge: float = _DEFAULT_RIDGE, test_ladj: Tensor | None = None
) -> dict[str, float]:
    """The optimum of any affine flow on ``train``, and the fitted Gaussian's held-out NLL.

    Args:
        train: (N, D) or (N, *event) data, flattened per example.
        test: optional held-out data of the same per-example size.
        ridge: relative eigenvalue floor (see the module docstring).
        test_ladj: optional (N_test,) log|det ∂y/∂x| of a fixed preprocessing x → y that made
            ``train`` and ``test``: the test NLLs are then of x, −log N(y; ·) − ladj.

    Returns a JSON-serialisable dict, NLLs in nats per example and ``*_bits`` = nats / ln 2:
        ``dim``, ``n_train``, ``n_floored``; ``nll`` (= ½ Σ log(2πe λ_i), the training NLL
        of the ML Gaussian), ``nll_bits``; with ``test``: ``n_test``, ``test_nll`` (mean of
        −log N(x; x̄, Σ̂) over test), ``test_nll_se`` (its standard error, std/√n; NaN for
        one example), ``test_nll_bits``, ``test_nll_se_bits``.
    """
    fit = _fit(train, ridge)
    nll = _nll_from_spectra(fit.eigvals, fit.eigvals, fit.floor)
    out: dict[str, float] = {
        "dim": fit.eigvals.numel(),
        "n_train": len(train),
        "n_floored": int((fit.eigvals < fit.floor).sum()),
        "nll": nll,
        "nll_bits": nll / _LN2,
    }
    if test is not None:
        x = _as_matrix(test, "test")
        if x.shape[1] != fit.mean.numel():
            raise ValueError(f"test has {x.shape[1]} features per example, train has {fit.mean.numel()}")
        var = fit.eigvals.clamp_min(fit.floor)
        y = (x - fit.mean) @ fit.eigvecs  # coordinates in the eigenbasis
        per_example = 0.5 * ((y.pow(2) / var).sum(dim=1) + torch.log(2 * math.pi * var).sum())
        if test_ladj is not None:
            ladj = torch.as_tensor(test_ladj)
            if tuple(ladj.shape) != (x.shape[0],):
                raise ValueError(f"test_ladj has shape {tuple(ladj.shape)}; expected ({x.shape[0]},), one per test example")
            ladj = ladj.to(per_example)
            check_input(ladj, name="test_ladj")
            per_example = per_example - ladj
        n = x.shape[0]
        se = per_example.std().item() / math.sqrt(n) if n > 1 else float("nan")
        mean_nll = per_example.mean().item()
        out |= {
            "n_test": n,
            "test_nll": mean_nll,
            "test_nll_se": se,
            "test_nll_bits": mean_nll / _LN2,
            "test_nll_se_bits": se / _LN2,
        }
    return out


def ppca_nll(train: Tensor, q: int, ridge: float = _DEFAULT_RIDGE) -> float:
    """Training NLL (nats per example) of the ML probabilistic PCA model with q < D components.

    C = W Wᵀ + σ² I at its optimum keeps the top q eigenvalues λ_1..λ_q of Σ̂ and sets
    σ² = mean(λ_{q+1..D}), so NLL = ½ [D log 2π + Σ_{i≤q} log λ_i + (D−q) log σ² + D].
    q = 0 is the isotropic Gaussian; q = D−1 equals :func:`gaussian_nll`.
    """
    fit = _fit(train, ridge)
    d = fit.eigvals.numel()
    if not 0 <= q < d:
        raise ValueError(f"q must satisfy 0 <= q < D = {d}, got {q}")
    sigma2 = fit.eigvals[q:].mean()
    model_eig = torch.cat([fit.eigvals[:q], sigma2.expand(d - q)])
    return _nll_from_spectra(fit.eigvals, model_eig, fit.floor)


# --------------------------------------------------------------------------- expressiveness (seed 001, §4)
#
# Theorem 3: an ℓ-block ResFlow is (1+c)^ℓ < 2^ℓ-Lipschitz, so on a ball B_r where the target
# expands by L (‖f(x) − f(y)‖ ≥ L‖x − y‖) its sup error is at least r/2·(L − 2^ℓ), while one
# ImpFlow block z = (Id + g_z)⁻¹ ∘ (Id + g_x)(x) can be up to (1 + c_x)/(1 − c_z)-Lipschitz.

def theorem3_bound(L: float, r: float, blocks: int) -> float | None:
    """Theorem 3's lower bound r/2·(L − 2^ℓ) on the sup error of an ℓ-block ResFlow.

    Valid on a ball of radius r on which the target expands by L; None when 2^ℓ ≥ L (the
    theorem says nothing there).
    """
    if L <= 0 or r <= 0 or blocks < 1:
        raise ValueError(f"need L > 0, r > 0, blocks ≥ 1; got L={L}, r={r}, blocks={blocks}")
    gap = L - 2.0**blocks
    return r / 2 * gap if gap > 0 else None


def _slope_bounds(x: np.ndarray, y: np.ndarray, max_slope: float, min_slope: float) -> np.ndarray:
    if x.ndim != 1 or x.shape != y.shape or x.size < 2:
        raise ValueError(f"x and y must be 1-D of equal length ≥ 2; got {x.shape} and {y.shape}")
    dx = np.diff(x)
    if not (dx > 0).all():
        raise ValueError("x must be strictly increasing")
    if not 0 <= min_slope <= max_slope:
        raise ValueError(f"need 0 ≤ min_slope ≤ max_slope, got {min_slope}, {max_slope}")
    return dx


def _best_sup_fit(x: np.ndarray, y: np.ndarray, max_slope: float, min_slope: float) -> tuple[float, np.ndarray]:
    """LP over (h_1..h_n, t): min t s.t. |h_i − y_i| ≤ t, min·Δx_i ≤ h_{i+1} − h_i ≤ max·Δx_i."""
    from scipy import sparse
    from scipy.optimize import linprog

    dx = _slope_bounds(x, y, max_slope, min_slope)
    n = x.size
    eye, ones = sparse.eye(n, format="csr"), sparse.csr_matrix(np.ones((n, 1)))
    diff = sparse.diags([-np.ones(n - 1), np.ones(n - 1)], [0, 1], shape=(n - 1, n), format="csr")
    no_t = sparse.csr_matrix((n - 1, 1))
    A = sparse.vstack(
        [
            sparse.hstack([eye, -ones]),  # h − t ≤ y
            sparse.hstack([-eye, -ones]),  # −h − t ≤ −y
            sparse.hstack([diff, no_t]),  # Δh ≤ max·Δx
            sparse.hstack([-diff, no_t]),  # −Δh ≤ −min·Δx
        ],
        format="csr",
    )
    b = np.concatenate([y, -y, max_slope * dx, -min_slope * dx])
    cost = np.zeros(n + 1)
    cost[-1] = 1.0
    res = linprog(cost, A_ub=A, b_ub=b, bounds=[(None, None)] * (n + 1), method="highs")
    if res.status != 0:
        raise RuntimeError(f"linprog failed: {res.message}")
    return max(0.0, float(res.x[-1])), res.x[:n]


def _best_l2_fit(x: np.ndarray, y: np.ndarray, max_slope: float, min_slope: float) -> tuple[float, np.ndarray]:
    """Bounded least squares on h = h_1 + cumsum(s_i Δx_i), s_i ∈ [min, max]: min ‖h − y‖²."""
    from scipy.optimize import lsq_linear
    from scipy.sparse.linalg import LinearOperator

    dx = _slope_bounds(x, y, max_slope, min_slope)
    n = x.size

    def matvec(v: np.ndarray) -> np.ndarray:  # (h_1, s) -> h
        v = np.ravel(v)
        return v[0] + np.concatenate([[0.0], np.cumsum(v[1:] * dx)])

    def rmatvec(r: np.ndarray) -> np.ndarray:  # adjoint: (Σ r, Δx_i Σ_{j>i} r_j)
        tail = np.cumsum(np.ravel(r)[::-1])[::-1]
        return np.concatenate([[tail[0]], dx * tail[1:]])

    A = LinearOperator((n, n), matvec=matvec, rmatvec=rmatvec, dtype=np.float64)
    lo = np.concatenate([[-np.inf], np.full(n - 1, float(min_slope))])
    hi = np.concatenate([[np.inf], np.full(n - 1, float(max_slope))])
    res = lsq_linear(A, y, bounds=(lo, hi), method="trf", tol=1e-12, max_iter=5000)
    h = matvec(res.x)
    return float(np.sqrt(np.mean((h - y) ** 2))), h


def best_slope_bounded_fit(x, y, max_slope: float, min_slope: float = 0.0) -> dict:
    """The best fit of samples y_i = f(x_i) by any h with slopes in [min_slope, max_slope].

    * sup error: the linear programme min t s.t. |h(x_i) − y_i| ≤ t and
      min_slope·Δx_i ≤ h(x_{i+1}) − h(x_i) ≤ max_slope·Δx_i (``scipy.optimize.linprog``, HiGHS);
    * RMSE: the bounded least-squares problem min Σ (h(x_i) − y_i)² over the increments,
      h(x_i) = h_1 + Σ_{j<i} s_j Δx_j with s_j ∈ [min_slope, max_slope]
      (``scipy.optimize.lsq_linear`` on the O(n) cumulative-sum operator).

    Every C¹ function with h' ∈ [min_slope, max_slope] — e.g. an ℓ-block ResFlow in 1-D with
    max_slope = 2^ℓ — has grid errors at least these. x is strictly increasing.

    Returns ``dict(sup=..., rmse=..., h_sup=array, h_rmse=array)``, the h's being the optima
    on the grid.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    sup, h_sup = _best_sup_fit(x, y, max_slope, min_slope)
    rmse, h_rmse = _best_l2_fit(x, y, max_slope, min_slope)
    return {"sup": sup, "rmse": rmse, "h_sup": h_sup, "h_rmse": h_rmse}


def jacobian_spectral_norms(f: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """‖J_f(x_b)‖₂ for every row x_b of x (batch, d); f acts row-wise, (batch, d) -> (batch, d').

    The Jacobians come from d' vector-Jacobian products of the whole batch (row b of f
    depends on row b of x only), so f may contain root solves with implicit backward passes
    (ImpFlow blocks, ResFlow inverses). Returns (batch,).
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        out = f(x)
        if out.dim() != 2 or out.shape[0] != x.shape[0]:
            raise ValueError(f"f must map (batch, d) to (batch, d'); got {tuple(out.shape)}")
        rows = [
            torch.autograd.grad(out[:, i].sum(), x, retain_graph=i < out.shape[1] - 1)[0]
            for i in range(out.shape[1])
        ]
    return torch.linalg.matrix_norm(torch.stack(rows, dim=1).detach(), ord=2)


def block_jacobian(block: torch.nn.Module, x: Tensor, z: Tensor | None = None) -> Tensor:
    """The exact Jacobian (batch, n, n) of a residual or implicit block at x (batch, *event), from
    its networks' Jacobians (:func:`impflow.logdet.jacobian`, no implicit backward):

    * ResidualBlock x + g(x): I + J_g(x);
    * ImplicitBlock z = (Id + g_z)⁻¹ ∘ A ∘ (Id + g_x)(x): (I + J_{g_z}(z))⁻¹ J_A(y) (I + J_{g_x}(x)),
      y = x + g_x(x) (A = Id without ``mid``), by one linear solve. ``z``: the block's output at
      x where the caller has it (it saves the root solve); otherwise it is solved for.
    """
    from .logdet import jacobian
    from .transforms import ImplicitBlock, ResidualBlock

    def of(f: Callable[[Tensor], Tensor], v: Tensor) -> Tensor:
        v = v.detach().requires_grad_(True)
        with torch.enable_grad():
            return jacobian(f(v), v, create_graph=False)

    def residual(g: Callable[[Tensor], Tensor], v: Tensor) -> Tensor:
        J = of(g, v)
        return J + torch.eye(J.shape[-1], dtype=J.dtype, device=J.device)

    if isinstance(block, ResidualBlock):
        return residual(block.g, x)
    if not isinstance(block, ImplicitBlock):
        raise TypeError(f"block_jacobian takes a ResidualBlock or an ImplicitBlock, got {type(block).__name__}")
    with torch.no_grad():
        y = block.fx.map(x)
        if z is None:
            z = block.fz.inverse(y if block.mid is None else block.mid(y)[0])
    J = residual(block.g_x, x)
    if block.mid is not None:
        J = of(lambda v: block.mid(v)[0], y) @ J
    return torch.linalg.solve(residual(block.g_z, z), J)


def estimate_lipschitz(f: Callable[[Tensor], Tensor], x: Tensor) -> float:
    """max_b ‖J_f(x_b)‖₂: a lower estimate of Lip(f) (exact in the limit of dense x on a convex set)."""
    return float(jacobian_spectral_norms(f, x).max())


def block_lipschitz_bounds(block: torch.nn.Module) -> dict[str, float]:
    """Certified Lipschitz bounds of a block and of its inverse, c = ``lipschitz_bound(g)``.

    * ResidualBlock x + g(x): forward ≤ 1 + c, inverse ≤ 1/(1 − c);
    * ImplicitBlock (Id + g_z)⁻¹ ∘ A ∘ (Id + g_x): forward ≤ (1 + c_x)·Lip(A)/(1 − c_z),
      inverse ≤ (1 + c_z)·Lip(A⁻¹)/(1 − c_x) (A = Id without ``mid``);
    * ActNorm (x + b)·e^s: forward max e^s, inverse max e^{−s};
    * Compose: the products of its members' bounds.

    Returns ``dict(forward=..., inverse=...)`` (inf where c ≥ 1).
    """
    from .nn.lipschitz import lipschitz_bound
    from .transforms import ActNorm, Compose, ImplicitBlock, ResidualBlock

    def inv(c: float) -> float:
        return 1 / (1 - c) if c < 1 else math.inf

    if isinstance(block, ResidualBlock):
        c = lipschitz_bound(block.g)
        return {"forward": 1 + c, "inverse": inv(c)}
    if isinstance(block, ImplicitBlock):
        cx, cz = lipschitz_bound(block.g_x), lipschitz_bound(block.g_z)
        mid = block_lipschitz_bounds(block.mid) if block.mid is not None else {"forward": 1.0, "inverse": 1.0}
        return {"forward": (1 + cx) * mid["forward"] * inv(cz), "inverse": (1 + cz) * mid["inverse"] * inv(cx)}
    if isinstance(block, ActNorm):
        s = block.log_scale.detach()
        return {"forward": float(s.max().exp()), "inverse": float((-s).max().exp())}
    if isinstance(block, Compose):
        bounds = [block_lipschitz_bounds(t) for t in block]
        return {k: math.prod(b[k] for b in bounds) for k in ("forward", "inverse")}
    raise TypeError(f"no Lipschitz bound for {type(block).__name__}")


# --------------------------------------------------------------------------- diagnostics for image/tabular data

__all__ += ["ppca_curve", "squeeze_images", "linear_oracle_nll", "ORACLE_LABEL"]

ORACLE_LABEL = (
    "per-example linear ORACLE (uses each test image's own channel auto-correlation; not a model, "
    "not a bound any trained model must beat)"
)


def _ppca_default_qs(d: int) -> list[int]:
    if d <= 64:
        return list(range(d))
    return sorted({0, *np.unique(np.round(np.geomspace(1, d - 1, 40)).astype(int)).tolist()})


def ppca_curve(train: Tensor, qs=None, ridge: float = _DEFAULT_RIDGE) -> dict:
    """:func:`ppca_nll` for every q in ``qs`` from one eigen-decomposition, with the full Gaussian.

    Args:
        train: (N, D) or (N, *event) data as the model sees it.
        qs: component counts, each 0 ≤ q < D; default every q < D for D ≤ 64, else about 40
            values spread geometrically over [0, D).
        ridge: relative eigenvalue floor (module docstring).

    Returns ``dict(dim, n_train, q=[...], nll=[...], bits_per_dim=[...], gaussian_nll,
    gaussian_bits_per_dim)``, NLLs in nats per example (training NLL of the ML fits),
    bits/dim = nats / (D ln 2). The curve decreases in q towards ``gaussian_nll``.
    """
    fit = _fit(train, ridge)
    d = fit.eigvals.numel()
    qs = _ppca_default_qs(d) if qs is None else [int(q) for q in qs]
    bad = [q for q in qs if not 0 <= q < d]
    if bad:
        raise ValueError(f"q must satisfy 0 <= q < D = {d}, got {bad}")
    nll = []
    for q in qs:
        model_eig = torch.cat([fit.eigvals[:q], fit.eigvals[q:].mean().expand(d - q)])
        nll.append(_nll_from_spectra(fit.eigvals, model_eig, fit.floor))
    full = _nll_from_spectra(fit.eigvals, fit.eigvals, fit.floor)
    per_dim = d * _LN2
    return {
        "dim": d,
        "n_train": int(train.shape[0]),
        "q": qs,
        "nll": nll,
        "bits_per_dim": [v / per_dim for v in nll],
        "gaussian_nll": full,
        "gaussian_bits_per_dim": full / per_dim,
    }


def squeeze_images(images: Tensor, factor: int = 2) -> Tensor:
    """Space-to-depth: (N, C, H, W) -> (N, C·f², H/f, W/f), each output position holding the f×f
    patch of every channel (order: channel, then row and column within the patch)."""
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    if factor < 1 or h % factor or w % factor:
        raise ValueError(f"squeeze factor {factor} must be ≥ 1 and divide H = {h} and W = {w}")
    f = factor
    x = images.reshape(n, c, h // f, f, w // f, f).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, c * f * f, h // f, w // f)


def linear_oracle_nll(
    images: Tensor, squeeze: int = 2, levels: int | None = None, ridge: float = _DEFAULT_RIDGE
) -> dict:
    """The per-example linear ORACLE for images (seed 003): not a model, a reference point.

    Each image x (C, H, W) is squeezed (space-to-depth, :func:`squeeze_images`, factor
    ``squeeze``; 1 = none) to P = HW/s² positions of D' = C·s² channels, x_p ∈ R^{D'}. Its
    channel auto-correlation (uncentred) R = (1/P) Σ_p x_p x_pᵀ (D'×D') has eigenvalues λ_i,
    and the zero-mean Gaussian N(0, R), applied independently at every position, scores the
    image at

        NLL(x) = Σ_p −log N(x_p; 0, R) = (P/2) Σ_i log(2πe λ_i)   nats per image,

    (because (1/P) Σ_p x_pᵀ R⁻¹ x_p = tr(R⁻¹R) = D'), and bits/dim
    = (NLL − D ln K) / (D ln 2) with D = C·H·W and K = ``levels`` (images dequantised to
    [0, 1), the convention of :func:`impflow.data.images.bits_per_dim`), or NLL / (D ln 2)
    with ``levels=None`` (continuous values as given).

    It is an ORACLE: R is estimated from the very image it scores (D'(D'+1)/2 numbers per
    image are free), so it is neither a density model of the data set nor a bound a trained
    flow must beat - it shows how much a per-image linear (channel-mixing, position-shared)
    map could explain. Eigenvalues are floored at ``ridge``·mean(λ) (``ridge`` for an all-zero
    image); with a floor the NLL is (P/2) Σ_i [log(2π m_i) + λ_i/m_i], m_i = max(λ_i, floor).
    Computed in float64.

    Returns ``dict(nll=(N,) nats per image, bits_per_dim=(N,), mean_nll, mean_bits_per_dim,
    n_floored=(N,) floored eigenvalues per image, positions=P, channels=D', label)``.
    """
    if levels is not None and levels < 2:
        raise ValueError(f"levels must be at least 2, got {levels}")
    if ridge <= 0:
        raise ValueError(f"ridge must be positive, got {ridge}")
    x = squeeze_images(images.detach().to(torch.float64), squeeze)
    n, dc, hp, wp = x.shape
    p = hp * wp
    v = x.reshape(n, dc, p)
    R = v @ v.transpose(1, 2) / p  # (N, D', D')
    lam = torch.linalg.eigvalsh(R).clamp_min(0.0)
    scale = lam.mean(dim=1, keepdim=True)
    floor = ridge * torch.where(scale > 0, scale, torch.ones_like(scale))
    m = torch.maximum(lam, floor)
    nll = 0.5 * p * (torch.log(2 * math.pi * m) + lam / m).sum(dim=1)
    d = images[0].numel()
    shift = d * math.log(levels) if levels is not None else 0.0
    bpd = (nll - shift) / (d * _LN2)
    return {
        "nll": nll,
        "bits_per_dim": bpd,
        "mean_nll": nll.mean().item(),
        "mean_bits_per_dim": bpd.mean().item(),
        "n_floored": (lam < floor).sum(dim=1),
        "positions": p,
        "channels": dc,
        "label": ORACLE_LABEL,
    }
