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
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["gaussian_nll", "ppca_nll"]

_LN2 = math.log(2.0)
_DEFAULT_RIDGE = 1e-8


class _Fit(NamedTuple):
    mean: Tensor  # (D,)
    eigvals: Tensor  # (D,) descending, clamped at 0
    eigvecs: Tensor  # (D, D), columns matching eigvals
    floor: float


def _as_matrix(x: Tensor, name: str) -> Tensor:
    """(N, *event) -> (N, D) float64."""
    if x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected (N, D) or (N, *event) with N >= 1")
    return x.detach().reshape(x.shape[0], -1).to(torch.float64)


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


def gaussian_nll(train: Tensor, test: Tensor | None = None, ridge: float = _DEFAULT_RIDGE) -> dict[str, float]:
    """The optimum of any affine flow on ``train``, and the fitted Gaussian's held-out NLL.

    Args:
        train: (N, D) or (N, *event) data, flattened per example.
        test: optional held-out data of the same per-example size.
        ridge: relative eigenvalue floor (see the module docstring).

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
        "n_train": train.shape[0],
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
