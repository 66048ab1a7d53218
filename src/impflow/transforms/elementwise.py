"""Elementwise flows: z_i = f(x_i; θ), so log|det ∂z/∂x| = Σ_i log|f'(x_i)|.

Two layers of API:

* plain functions :func:`piecewise_linear` and :func:`rational_quadratic_spline` take
  their parameters as tensors with one row of bin parameters per element of ``x``
  (shape ``(*x.shape, K)``), so coupling and autoregressive layers can feed them
  per-sample outputs of a network; they return ``(y, logabsdet)`` elementwise;
* :class:`~impflow.transforms.base.Transform` modules that own per-feature parameters
  and call those functions: :class:`PiecewiseLinear`, :class:`RationalQuadraticSpline`,
  plus the fixed-form maps :class:`LeakyReLU`, :class:`Sigmoid` and :class:`Logit`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Transform, as_int

__all__ = [
    "piecewise_linear",
    "rational_quadratic_spline",
    "LeakyReLU",
    "PiecewiseLinear",
    "RationalQuadraticSpline",
    "Sigmoid",
    "Logit",
]


# ----------------------------------------------------------------------------- helpers


def _sum_per_sample(t: Tensor) -> Tensor:
    """(batch, *event) -> (batch,): the sum over every non-batch dimension."""
    return t.reshape(t.shape[0], -1).sum(dim=1)


def _check_unit_interval(x: Tensor, name: str, *, closed: bool) -> None:
    """Raise ValueError unless every entry of x lies in [0, 1] (closed) or (0, 1) (open)."""
    inside = (x >= 0) & (x <= 1) if closed else (x > 0) & (x < 1)
    if not bool(inside.all()):
        interval = "[0, 1]" if closed else "(0, 1)"
        nan = torch.isnan(x)
        numbers = x[~nan]
        found = f"values in [{numbers.min().item():.6g}, {numbers.max().item():.6g}]" if numbers.numel() else ""
        if bool(nan.any()):
            found += (" and " if found else "") + f"{int(nan.sum())} NaN"
        raise ValueError(f"{name} must lie in {interval}; got {found} ({int((~inside).sum())} outside)")


def _expand_params(p: Tensor, x: Tensor, name: str) -> Tensor:
    """Broadcast bin parameters of shape (..., K) to (*x.shape, K)."""
    try:
        return p.expand(*x.shape, p.shape[-1])
    except RuntimeError as err:
        raise ValueError(
            f"{name} has shape {tuple(p.shape)}; expected (*x.shape, K) = "
            f"({', '.join(map(str, x.shape))}, K) or a shape broadcastable to it"
        ) from err


def _knots(unnormalized: Tensor, lo: float, hi: float, min_size: float) -> tuple[Tensor, Tensor]:
    """Bin edges and bin sizes partitioning [lo, hi] from unnormalised bin sizes (..., K).

    sizes = (hi − lo)·(min_size + (1 − K·min_size)·softmax(unnormalized)); the edges are
    their cumulative sum, (..., K+1), pinned to lo and hi at the ends (exactly so for the
    intervals [0, 1] and [−B, B] used here).
    """
    K = unnormalized.shape[-1]
    if min_size * K >= 1:
        raise ValueError(f"minimal bin size {min_size} is too large for {K} bins (need K·min < 1)")
    p = min_size + (1 - min_size * K) * torch.softmax(unnormalized, dim=-1)
    inner = torch.cumsum(p, dim=-1)[..., :-1]
    edges = lo + (hi - lo) * F.pad(F.pad(inner, (1, 0), value=0.0), (0, 1), value=1.0)
    return edges, edges[..., 1:] - edges[..., :-1]


def _search_bins(edges: Tensor, v: Tensor) -> Tensor:
    """Index b in [0, K−1] of the bin edges[b] ≤ v < edges[b+1] (the last bin includes its end)."""
    idx = torch.searchsorted(edges.detach().contiguous(), v.detach()[..., None].contiguous(), right=True)
    return (idx.squeeze(-1) - 1).clamp(0, edges.shape[-1] - 2)


def _gather(t: Tensor, b: Tensor) -> Tensor:
    """t[..., b] elementwise: t (*shape, n), b (*shape) -> (*shape)."""
    return t.gather(-1, b[..., None]).squeeze(-1)


# ----------------------------------------------------------------------------- functions


def piecewise_linear(x: Tensor, logits: Tensor, inverse: bool = False) -> tuple[Tensor, Tensor]:
    """Monotone piecewise-linear map of [0, 1] onto [0, 1] with K equal-width bins.

    φ = softmax(logits) (φ_k > 0, Σ φ_k = 1). For h in [0, 1] the bin is b = ⌊K h⌋ + 1
    (1-based; h = 1 belongs to bin K) and::

        f(h) = Σ_{k<b} φ_k + (h K − b + 1) φ_b,     f'(h) = K φ_b.

    The inverse finds the bin by the cumulative φ and undoes the linear piece:
    h = (b − 1 + (y − Σ_{k<b} φ_k) / φ_b) / K.

    Args:
        x: inputs of any shape, every entry in [0, 1] (else ValueError).
        logits: unnormalised bin masses, shape (*x.shape, K) or broadcastable to it.
        inverse: apply f⁻¹ instead of f.

    Returns:
        ``(y, logabsdet)``, both shaped like x: y = f(x) and log f'(x) (forward), or
        y = f⁻¹(x) and log (f⁻¹)'(x) = −log f'(y) (inverse).
    """
    _check_unit_interval(x, "piecewise_linear input", closed=True)
    logits = _expand_params(logits, x, "logits")
    K = logits.shape[-1]
    cdf, phi = _knots(logits, 0.0, 1.0, 0.0)
    if inverse:
        b = _search_bins(cdf, x)
        phi_b = _gather(phi, b)
        y = (b + (x - _gather(cdf, b)) / phi_b) / K
        return y, -torch.log(K * phi_b)
    b = torch.floor(K * x).clamp(max=K - 1).long()
    phi_b = _gather(phi, b)
    y = _gather(cdf, b) + (K * x - b) * phi_b
    return y, torch.log(K * phi_b)


def _rq_log_derivative(xi: Tensor, s: Tensor, d0: Tensor, d1: Tensor, denom: Tensor) -> Tensor:
    """log dy/dx of one rational-quadratic bin (Durkan et al. 2019, eq. 5), at ξ ∈ [0, 1]."""
    num = s.pow(2) * (d1 * xi.pow(2) + 2 * s * xi * (1 - xi) + d0 * (1 - xi).pow(2))
    return torch.log(num) - 2 * torch.log(denom)


def rational_quadratic_spline(
    x: Tensor,
    unnormalized_widths: Tensor,
    unnormalized_heights: Tensor,
    unnormalized_derivatives: Tensor,
    inverse: bool = False,
    bound: float = 3.0,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    """Monotone rational-quadratic spline on [−B, B] with identity (linear) tails (Durkan et al. 2019).

    K bins with widths w_k = 2B·(m_w + (1 − K m_w)·softmax(unnormalized_widths)), heights
    likewise, and knot derivatives δ_k = m_δ + softplus(unnormalized_derivatives). With
    s_k = h_k / w_k and ξ = (x − x_k) / w_k in bin k::

        y = y_k + h_k (s_k ξ² + δ_k ξ(1−ξ)) / (s_k + (δ_{k+1} + δ_k − 2 s_k) ξ(1−ξ)).

    The inverse solves the quadratic a ξ² + b ξ + c = 0 in the stable form
    ξ = 2c / (−b − √(b² − 4ac)). Outside [−B, B] the map is the identity (log-det 0).

    Args:
        x: inputs of any shape.
        unnormalized_widths: (*x.shape, K) or broadcastable to it.
        unnormalized_heights: (*x.shape, K) or broadcastable to it.
        unnormalized_derivatives: (*x.shape, K − 1) for the interior knots, the boundary
            derivatives then being exactly 1 so that the tails join smoothly; or
            (*x.shape, K + 1) to give every knot (the density may then jump at ±B).
        inverse: apply the inverse spline.
        bound: B, the half-width of the spline's interval in both x and y.
        min_bin_width, min_bin_height, min_derivative: floors m_w, m_h, m_δ keeping the
            map well conditioned (need K·m_w < 1 and K·m_h < 1).

    Returns:
        ``(y, logabsdet)``, both shaped like x: log|dy/dx| of the applied direction.
    """
    unnormalized_widths = _expand_params(unnormalized_widths, x, "unnormalized_widths")
    unnormalized_heights = _expand_params(unnormalized_heights, x, "unnormalized_heights")
    unnormalized_derivatives = _expand_params(unnormalized_derivatives, x, "unnormalized_derivatives")
    K = unnormalized_widths.shape[-1]
    if unnormalized_heights.shape[-1] != K:
        raise ValueError(f"{K} widths but {unnormalized_heights.shape[-1]} heights per element")
    if unnormalized_derivatives.shape[-1] == K - 1:
        boundary = math.log(math.expm1(1 - min_derivative))  # softplus⁻¹(1 − m_δ): δ = 1 at ±B
        unnormalized_derivatives = F.pad(unnormalized_derivatives, (1, 1), value=boundary)
    elif unnormalized_derivatives.shape[-1] != K + 1:
        raise ValueError(
            f"unnormalized_derivatives needs K − 1 = {K - 1} or K + 1 = {K + 1} entries per "
            f"element, got {unnormalized_derivatives.shape[-1]}"
        )

    xs, widths = _knots(unnormalized_widths, -bound, bound, min_bin_width)
    ys, heights = _knots(unnormalized_heights, -bound, bound, min_bin_height)
    derivs = min_derivative + F.softplus(unnormalized_derivatives)

    inside = (x >= -bound) & (x <= bound)
    v = x.clamp(-bound, bound)  # spline evaluated on clamped values: no NaN gradients in the tails
    b = _search_bins(ys if inverse else xs, v)
    x_k, w, y_k, h = _gather(xs, b), _gather(widths, b), _gather(ys, b), _gather(heights, b)
    d0, d1 = _gather(derivs, b), _gather(derivs, b + 1)
    s = h / w
    if inverse:
        dy = v - y_k
        t = d1 + d0 - 2 * s
        qa = h * (s - d0) + dy * t
        qb = h * d0 - dy * t
        qc = -s * dy
        disc = (qb.pow(2) - 4 * qa * qc).clamp_min(0)
        xi = 2 * qc / (-qb - torch.sqrt(disc))
        out = x_k + xi * w
        denom = s + t * xi * (1 - xi)
        logabsdet = -_rq_log_derivative(xi, s, d0, d1, denom)
    else:
        xi = (v - x_k) / w
        xi1 = xi * (1 - xi)
        denom = s + (d1 + d0 - 2 * s) * xi1
        out = y_k + h * (s * xi.pow(2) + d0 * xi1) / denom
        logabsdet = _rq_log_derivative(xi, s, d0, d1, denom)
    return torch.where(inside, out, x), torch.where(inside, logabsdet, torch.zeros_like(logabsdet))


# ----------------------------------------------------------------------------- modules


class _FeatureWise(Transform):
    """Shape check shared by the per-feature parameterised maps: inputs (batch, features)."""

    def __init__(self, features: int, bins: int) -> None:
        super().__init__()
        checked = []
        for name, value in (("features", features), ("bins", bins)):
            number = as_int(value)
            if number is None or number < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be a positive int, got {value!r}")
            checked.append(number)
        self.features, self.bins = checked

    def _check(self, x: Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.features:
            raise ValueError(
                f"{type(self).__name__}({self.features}) got input of shape {tuple(x.shape)}; "
                f"expected (batch, {self.features})"
            )


class PiecewiseLinear(_FeatureWise):
    """Per-feature piecewise-linear bijection of [0, 1] with K bins (see :func:`piecewise_linear`).

    φ = softmax(logits) per feature; identity at initialisation (φ_k = 1/K). Inputs
    (batch, features) with entries in [0, 1]; log|det| = Σ_i log(K φ_{b_i}).
    """

    def __init__(self, features: int, bins: int = 5) -> None:
        super().__init__(features, bins)
        self.logits = nn.Parameter(torch.zeros(self.features, self.bins))

    @classmethod
    def from_probabilities(cls, phi: Tensor | Sequence[float], features: int | None = None) -> "PiecewiseLinear":
        """A layer with the given bin masses φ, shape (K,) shared by ``features`` features (default 1)
        or (features, K), one row per feature.

        The layer takes φ's dtype when φ is a floating tensor (else the default dtype).
        """
        phi = torch.as_tensor(phi)
        if not phi.is_floating_point():
            phi = phi.to(torch.get_default_dtype())
        if phi.dim() not in (1, 2):
            raise ValueError(f"φ must have shape (K,) or (features, K), got {tuple(phi.shape)}")
        if not bool((phi > 0).all()) or (phi.sum(-1) - 1).abs().max() > 1e-6:
            raise ValueError(f"φ must be positive and sum to 1 along the last axis, got {phi.tolist()}")
        if phi.dim() == 2:
            if features is not None and features != phi.shape[0]:
                raise ValueError(f"features={features} but φ has {phi.shape[0]} rows (one per feature)")
            features = phi.shape[0]
        layer = cls(1 if features is None else features, bins=phi.shape[-1]).to(phi.dtype)
        with torch.no_grad():
            layer.logits.copy_(torch.log(phi).expand_as(layer.logits))
        return layer

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x)
        z, logabsdet = piecewise_linear(x, self.logits)
        return z, _sum_per_sample(logabsdet)

    def inverse(self, z: Tensor) -> Tensor:
        return self.inverse_and_log_det(z)[0]

    def inverse_and_log_det(self, z: Tensor) -> tuple[Tensor, Tensor]:
        self._check(z)
        x, logabsdet = piecewise_linear(z, self.logits, inverse=True)
        return x, _sum_per_sample(logabsdet)


class RationalQuadraticSpline(_FeatureWise):
    """Per-feature rational-quadratic spline on [−B, B], identity tails (Durkan et al. 2019).

    K bins per feature with learned widths, heights and K − 1 interior derivatives (see
    :func:`rational_quadratic_spline`); identity at initialisation. Inputs (batch, features).
    """

    def __init__(
        self,
        features: int,
        bins: int = 8,
        bound: float = 3.0,
        min_bin_width: float = 1e-3,
        min_bin_height: float = 1e-3,
        min_derivative: float = 1e-3,
    ) -> None:
        super().__init__(features, bins)
        if not 0 < bound < math.inf:
            raise ValueError(f"RationalQuadraticSpline: bound must be positive and finite, got {bound}")
        for name, floor in (("min_bin_width", min_bin_width), ("min_bin_height", min_bin_height)):
            if not 0 <= floor * self.bins < 1:
                raise ValueError(f"RationalQuadraticSpline: {name} must lie in [0, 1/bins), got {floor}")
        if not 0 <= min_derivative < 1:
            raise ValueError(f"RationalQuadraticSpline: min_derivative must lie in [0, 1), got {min_derivative}")
        self.spline_kwargs = dict(
            bound=bound,
            min_bin_width=min_bin_width,
            min_bin_height=min_bin_height,
            min_derivative=min_derivative,
        )
        self.unnormalized_widths = nn.Parameter(torch.zeros(self.features, self.bins))
        self.unnormalized_heights = nn.Parameter(torch.zeros(self.features, self.bins))
        identity = math.log(math.expm1(1 - min_derivative))  # δ_k = 1 everywhere: identity map
        self.unnormalized_derivatives = nn.Parameter(torch.full((self.features, self.bins - 1), identity))

    def _spline(self, x: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        self._check(x)
        y, logabsdet = rational_quadratic_spline(
            x,
            self.unnormalized_widths,
            self.unnormalized_heights,
            self.unnormalized_derivatives,
            inverse=inverse,
            **self.spline_kwargs,
        )
        return y, _sum_per_sample(logabsdet)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._spline(x, inverse=False)

    def inverse(self, z: Tensor) -> Tensor:
        return self._spline(z, inverse=True)[0]

    def inverse_and_log_det(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self._spline(z, inverse=True)


class LeakyReLU(Transform):
    """z = x for x ≥ 0, α x for x < 0, with slope α > 0 (learned as log α when ``learnable``).

    log|det ∂z/∂x| = (number of negative entries) · log α. Any input shape (batch, ...).
    """

    def __init__(self, negative_slope: float = 0.1, learnable: bool = True) -> None:
        super().__init__()
        if negative_slope <= 0:
            raise ValueError(f"negative_slope must be positive for a bijection, got {negative_slope}")
        log_slope = torch.tensor(math.log(negative_slope))
        if learnable:
            self.log_slope = nn.Parameter(log_slope)
        else:
            self.register_buffer("log_slope", log_slope)

    def _ladj(self, negative: Tensor) -> Tensor:
        return _sum_per_sample(negative.to(self.log_slope.dtype)) * self.log_slope

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        negative = x < 0
        z = torch.where(negative, x * torch.exp(self.log_slope), x)
        return z, self._ladj(negative)

    def inverse(self, z: Tensor) -> Tensor:
        return torch.where(z < 0, z * torch.exp(-self.log_slope), z)

    def inverse_and_log_det(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.inverse(z), -self._ladj(z < 0)


def _log_sigmoid_derivative(x: Tensor) -> Tensor:
    """log σ'(x) = log σ(x) + log σ(−x) = −softplus(−x) − softplus(x), stable for large |x|."""
    return -F.softplus(-x) - F.softplus(x)


class Sigmoid(Transform):
    """z = σ(x) = 1 / (1 + e^{−x}), elementwise; log|det| = Σ log σ(x)(1 − σ(x)). Any shape."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return torch.sigmoid(x), _sum_per_sample(_log_sigmoid_derivative(x))

    def inverse(self, z: Tensor) -> Tensor:
        _check_unit_interval(z, "Sigmoid.inverse input", closed=False)
        return torch.logit(z)

    def inverse_and_log_det(self, z: Tensor) -> tuple[Tensor, Tensor]:
        x = self.inverse(z)
        return x, -_sum_per_sample(_log_sigmoid_derivative(x))


class Logit(Transform):
    """RealNVP's pre-processing for data in [0, 1]: y = α + (1 − 2α) x, z = logit(y).

    log|det ∂z/∂x| = Σ [log(1 − 2α) − log y − log(1 − y)]; the α-squashing keeps pixel
    values of exactly 0 or 1 finite. Any input shape (batch, ...), e.g. (B, d) or (B, C, H, W).
    """

    def __init__(self, alpha: float = 0.05) -> None:
        super().__init__()
        if not 0 <= alpha < 0.5:
            raise ValueError(f"alpha must lie in [0, 0.5), got {alpha}")
        self.alpha = alpha

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = self.alpha + (1 - 2 * self.alpha) * x
        name = f"Logit input mapped by y = α + (1 − 2α)x (α = {self.alpha})"
        _check_unit_interval(y, name, closed=False)
        z = torch.logit(y)
        return z, -_sum_per_sample(_log_sigmoid_derivative(z)) + self._log_squash(x)

    def inverse(self, z: Tensor) -> Tensor:
        return (torch.sigmoid(z) - self.alpha) / (1 - 2 * self.alpha)

    def inverse_and_log_det(self, z: Tensor) -> tuple[Tensor, Tensor]:
        x = self.inverse(z)
        return x, _sum_per_sample(_log_sigmoid_derivative(z)) - self._log_squash(z)

    def _log_squash(self, x: Tensor) -> Tensor:
        """Σ log(1 − 2α) over one example's entries, (batch,)."""
        return x.new_full((x.shape[0],), x.shape[1:].numel() * math.log(1 - 2 * self.alpha))
