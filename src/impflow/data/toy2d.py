"""The 2-D toy densities of the FFJORD / Residual Flows / ImpFlow experiments, generated on the fly.

Every sampler draws i.i.d. points from an explicit CPU ``torch.Generator`` (never the global
RNG), in float64, and casts to the requested dtype. Where the reference generators used a
fixed number of points per component (rings, circles, 2spirals, pinwheel) the component is
drawn at random here instead, so every sample is i.i.d. from the mixture.

Datasets with an exact density (:data:`EXACT_DENSITY`; :func:`log_prob` and :func:`entropy`):

- ``checkerboard``: uniform on the 8 black cells of a 4×4 board of 2×2 squares on [-4, 4)²;
  p = 1/32, entropy ln 32.
- ``8gaussians``: equal mixture of N(c_k, s²I), c_k = (4/1.414)(cos kπ/4, sin kπ/4),
  s = 0.5/1.414 (the reference divides by 1.414, not √2); entropy by numerical integration.
- ``rings`` / ``circles``: a uniformly chosen circle of radius r_k, a uniform angle, plus
  N(0, s²I) noise. The angle integrates out in closed form,
  p(x) = Σ_k w_k exp(-(|x|² + r_k²)/2s²) I₀(|x| r_k/s²) / (2πs²); entropy by radial
  quadrature. rings: r = 3·(1, .75, .5, .25), s = 0.08; circles: r = (3, 1.5), s = 0.24.
- ``line`` / ``cos``: x₁ ~ U[-2.5, 2.5), x₂ = h(x₁) + N(0, CURVE_NOISE²) with h(t) = t or
  2.5·sin t (the reference calls the latter "cos"). The reference puts the points exactly
  on the curve, which has no density in 2-D; the noise is our addition. The shear has unit
  Jacobian, so the entropy is ln 5 + ½ ln(2πe·CURVE_NOISE²) for both.

No exact density (``entropy`` returns None, ``log_prob`` raises): ``2spirals`` (uniform
jitter plus Gaussian noise around a spiral), ``pinwheel`` (a nonlinear warp of a Gaussian),
``moons`` (Gaussian noise around half circles), ``swissroll`` (Gaussian noise around an
Archimedean spiral) — each density is an integral along a curve with no closed form.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["NAMES", "EXACT_DENSITY", "CURVE_NOISE", "sample", "log_prob", "entropy", "banana"]

CURVE_NOISE = 0.1
"""Standard deviation of the Gaussian noise added across the curve in ``line`` and ``cos``."""

_F64 = torch.float64
_8G_RADIUS = 4.0 / 1.414
_8G_STD = 0.5 / 1.414
_RINGS = ((3.0, 2.25, 1.5, 0.75), 0.08)
_CIRCLES = ((3.0, 1.5), 0.24)
_CURVE_HALF_WIDTH = 2.5


def _curve_line(t: Tensor) -> Tensor:
    return t


def _curve_sin(t: Tensor) -> Tensor:
    return 2.5 * torch.sin(t)


# --------------------------------------------------------------------------- random draws


def _uniform(n: int, g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=_F64)


def _normal(shape: tuple[int, ...], g: torch.Generator, std: float) -> Tensor:
    return std * torch.randn(shape, generator=g, dtype=_F64)


def _choice(n: int, k: int, g: torch.Generator) -> Tensor:
    return torch.randint(k, (n,), generator=g)


def _polar(r: Tensor, theta: Tensor) -> Tensor:
    return torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=1)


# --------------------------------------------------------------------------- samplers (n, g) -> (n, 2) float64


def _checkerboard(n: int, g: torch.Generator) -> Tensor:
    x1 = _uniform(n, g, -2.0, 2.0)
    x2 = _uniform(n, g) - 2 * _choice(n, 2, g) + torch.floor(x1) % 2
    return 2 * torch.stack([x1, x2], dim=1)


def _8g_centres() -> Tensor:
    return _polar(torch.full((8,), _8G_RADIUS, dtype=_F64), torch.arange(8, dtype=_F64) * math.pi / 4)


def _eight_gaussians(n: int, g: torch.Generator) -> Tensor:
    return _8g_centres()[_choice(n, 8, g)] + _normal((n, 2), g, _8G_STD)


def _two_spirals(n: int, g: torch.Generator) -> Tensor:
    t = torch.sqrt(_uniform(n, g)) * 3 * math.pi  # 540 degrees
    arm = torch.stack([-torch.cos(t) * t, torch.sin(t) * t], dim=1)
    jitter = torch.stack([_uniform(n, g, 0.0, 0.5), _uniform(n, g, 0.0, 0.5)], dim=1)
    sign = (1 - 2 * _choice(n, 2, g)).to(_F64).unsqueeze(1)
    return sign * (arm + jitter) / 3 + _normal((n, 2), g, 0.1)


def _pinwheel(n: int, g: torch.Generator) -> Tensor:
    arms = 5
    f = torch.stack([1 + _normal((n,), g, 0.3), _normal((n,), g, 0.1)], dim=1)
    angle = 2 * math.pi * _choice(n, arms, g).to(_F64) / arms + 0.25 * torch.exp(f[:, 0])
    c, s = torch.cos(angle), torch.sin(angle)
    return 2 * torch.stack([f[:, 0] * c + f[:, 1] * s, f[:, 1] * c - f[:, 0] * s], dim=1)


def _noisy_rings(radii: tuple[float, ...], std: float) -> Callable[[int, torch.Generator], Tensor]:
    def draw(n: int, g: torch.Generator) -> Tensor:
        r = torch.tensor(radii, dtype=_F64)[_choice(n, len(radii), g)]
        return _polar(r, _uniform(n, g, 0.0, 2 * math.pi)) + _normal((n, 2), g, std)

    return draw


def _moons(n: int, g: torch.Generator) -> Tensor:
    t = _uniform(n, g, 0.0, math.pi)
    upper = _choice(n, 2, g).bool().unsqueeze(1)
    outer = torch.stack([torch.cos(t), torch.sin(t)], dim=1)
    inner = torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t)], dim=1)
    x = torch.where(upper, outer, inner) + _normal((n, 2), g, 0.1)
    return 2 * x + torch.tensor([-1.0, -0.2], dtype=_F64)


def _swissroll(n: int, g: torch.Generator) -> Tensor:
    t = 1.5 * math.pi * (1 + 2 * _uniform(n, g))
    return (_polar(t, t) + _normal((n, 2), g, 1.0)) / 5


def _noisy_curve(h: Callable[[Tensor], Tensor]) -> Callable[[int, torch.Generator], Tensor]:
    def draw(n: int, g: torch.Generator) -> Tensor:
        x1 = _uniform(n, g, -_CURVE_HALF_WIDTH, _CURVE_HALF_WIDTH)
        return torch.stack([x1, h(x1) + _normal((n,), g, CURVE_NOISE)], dim=1)

    return draw


_SAMPLERS: dict[str, Callable[[int, torch.Generator], Tensor]] = {
    "checkerboard": _checkerboard,
    "8gaussians": _eight_gaussians,
    "2spirals": _two_spirals,
    "pinwheel": _pinwheel,
    "rings": _noisy_rings(*_RINGS),
    "circles": _noisy_rings(*_CIRCLES),
    "moons": _moons,
    "swissroll": _swissroll,
    "line": _noisy_curve(_curve_line),
    "cos": _noisy_curve(_curve_sin),
}

NAMES: tuple[str, ...] = tuple(_SAMPLERS)
"""Every dataset :func:`sample` knows."""


def _check_name(name: str) -> None:
    if name not in _SAMPLERS:
        raise ValueError(f"unknown toy dataset {name!r}; valid names: {', '.join(NAMES)}")


def _generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator:
    if generator is not None:
        if seed is not None:
            raise ValueError("pass either seed= or generator=, not both")
        return generator
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def sample(
    name: str,
    n: int,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """n i.i.d. points of toy dataset ``name``: a CPU tensor of shape (n, 2) and dtype ``dtype``.

    Reproducible given ``seed`` (or a CPU ``generator``, which is advanced); with neither, a
    fresh nondeterministic generator is used. The global torch RNG is never touched.
    """
    _check_name(name)
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    return _SAMPLERS[name](n, _generator(seed, generator)).to(dtype)


# --------------------------------------------------------------------------- exact densities (x (B, 2) float64 -> (B,))


def _checkerboard_log_prob(x: Tensor) -> Tensor:
    # Cell indices of the closed board [-4, 4]² (the edge x = 4 joins the last cell, so a
    # float32 sample rounded onto it still scores).
    u = torch.floor(x / 2).clamp(-2, 1)
    inside = (x.abs() <= 4).all(dim=1) & (u.sum(dim=1) % 2 == 0)
    return torch.where(inside, torch.tensor(-math.log(32.0), dtype=_F64), -math.inf)


def _gaussian_mixture_log_prob(x: Tensor, centres: Tensor, std: float) -> Tensor:
    sq = (x.unsqueeze(1) - centres).pow(2).sum(dim=2)  # (B, K)
    log_comp = -sq / (2 * std**2) - math.log(2 * math.pi * std**2)
    return torch.logsumexp(log_comp, dim=1) - math.log(centres.shape[0])


def _rings_log_prob(radii: tuple[float, ...], std: float) -> Callable[[Tensor], Tensor]:
    def log_p(x: Tensor) -> Tensor:
        rho = x.norm(dim=1, keepdim=True)
        r = torch.tensor(radii, dtype=_F64)
        # exp(-(ρ²+r²)/2s²) I₀(ρr/s²) = exp(-(ρ-r)²/2s²) i0e(ρr/s²), i0e(κ) = e^{-κ} I₀(κ)
        log_comp = -(rho - r).pow(2) / (2 * std**2) + torch.log(torch.special.i0e(rho * r / std**2))
        return torch.logsumexp(log_comp, dim=1) - math.log(2 * math.pi * std**2 * len(radii))

    return log_p


def _curve_log_prob(h: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def log_p(x: Tensor) -> Tensor:
        resid = x[:, 1] - h(x[:, 0])
        on_curve = (
            -math.log(2 * _CURVE_HALF_WIDTH)
            - 0.5 * (resid / CURVE_NOISE).pow(2)
            - 0.5 * math.log(2 * math.pi * CURVE_NOISE**2)
        )
        return torch.where(x[:, 0].abs() <= _CURVE_HALF_WIDTH, on_curve, -math.inf)

    return log_p


def _eight_gaussians_log_prob(x: Tensor) -> Tensor:
    return _gaussian_mixture_log_prob(x, _8g_centres(), _8G_STD)


_LOG_PROBS: dict[str, Callable[[Tensor], Tensor]] = {
    "checkerboard": _checkerboard_log_prob,
    "8gaussians": _eight_gaussians_log_prob,
    "rings": _rings_log_prob(*_RINGS),
    "circles": _rings_log_prob(*_CIRCLES),
    "line": _curve_log_prob(_curve_line),
    "cos": _curve_log_prob(_curve_sin),
}

EXACT_DENSITY: tuple[str, ...] = tuple(_LOG_PROBS)
"""The datasets with an exact :func:`log_prob` and a known :func:`entropy`."""

_CURVE_ENTROPY = math.log(2 * _CURVE_HALF_WIDTH) + 0.5 * math.log(2 * math.pi * math.e * CURVE_NOISE**2)

# Differential entropies in nats. The numerical ones come from adaptive quadrature of
# -p log p with the exact density (2-D over one symmetric wedge for 8gaussians, radial
# 1-D for rings/circles) and are re-derived independently in tests/test_toy2d.py.
_ENTROPY: dict[str, float] = {
    "checkerboard": math.log(32.0),
    "8gaussians": 2.831880406137666,
    "rings": 2.623182770300311,
    "circles": 3.268135711705764,
    "line": _CURVE_ENTROPY,
    "cos": _CURVE_ENTROPY,
}


def log_prob(name: str, x: Tensor) -> Tensor:
    """Exact log-density in nats of toy dataset ``name`` at x (B, 2) -> (B,), in x's dtype.

    -inf outside the support (checkerboard, line, cos). Raises ValueError for datasets
    without an exact density (those not in :data:`EXACT_DENSITY`).
    """
    _check_name(name)
    if name not in _LOG_PROBS:
        raise ValueError(
            f"toy dataset {name!r} has no exact density; these do: {', '.join(EXACT_DENSITY)}"
        )
    if x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected (batch, 2)")
    return _LOG_PROBS[name](x.detach().to(device="cpu", dtype=_F64)).to(device=x.device, dtype=x.dtype)


def entropy(name: str) -> float | None:
    """Differential entropy -∫ p log p in nats (the floor of any model's NLL per example).

    None for datasets without an exact density (not in :data:`EXACT_DENSITY`).
    Divide by ln 2 for bits.
    """
    _check_name(name)
    return _ENTROPY.get(name)


def banana(n: int, seed: int) -> Tensor:
    """The tutorial chapter's correlated, non-Gaussian 2-D data (not one of :data:`NAMES`):
    x₂ = ½x₁² + 0.8x₁ − 0.5 + 0.25ε with x₁, ε ~ N(0, 1), rotated by 30°. Shape (n, 2)."""
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n, generator=g)
    x2 = 0.5 * x1**2 + 0.8 * x1 - 0.5 + 0.25 * torch.randn(n, generator=g)
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    return torch.stack([x1, x2], 1) @ torch.tensor([[c, -s], [s, c]])
