"""Masked autoregressive flows: MAF (Papamakarios et al. 2017) and IAF (Kingma et al. 2016).

MAF maps data to noise with z_i = τ(x_i; θ_i(x_{<i})), θ from a :class:`~impflow.nn.made.MADE`:
the density needs one network pass, sampling needs D sequential ones. IAF is the same map
used the other way round, z = τ⁻¹(x; θ(z_{<i})): sampling in one pass, density in D. Build it
as :class:`InverseAutoregressive` (= ``Inverse(MaskedAutoregressive(...))``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..nn.made import MADE
from .base import Inverse, Transform
from .coupling import ElementwiseTransformer, make_transformer

__all__ = ["MaskedAutoregressive", "InverseAutoregressive"]


class MaskedAutoregressive(Transform):
    """MAF layer: z_i = τ(x_i; θ_i(x_{<i})), log|det ∂z/∂x| = Σ_i log|τ'(x_i; θ_i)|.

    Args:
        features: D (vectors of shape (B, D)).
        transformer: ``"affine"``, ``"additive"``, ``"piecewise_linear"``, ``"spline"`` or an
            :class:`~impflow.transforms.coupling.ElementwiseTransformer`.
        hidden: MADE hidden widths.
        order: autoregressive order (a permutation of 0…D−1; default natural). Alternate
            ``order`` (e.g. reversed) between stacked layers so every variable conditions on
            every other.
        **transformer_kwargs: options of the transformer.

    ``inverse`` runs D passes: after pass k the first k variables in the order are exact.
    """

    def __init__(
        self,
        features: int,
        transformer: str | ElementwiseTransformer = "affine",
        hidden: int | Sequence[int] = (64, 64),
        order: Sequence[int] | Tensor | None = None,
        **transformer_kwargs,
    ) -> None:
        super().__init__()
        self.features = features
        self.transformer = make_transformer(transformer, **transformer_kwargs)
        self.made = MADE(features, self.transformer.num_params, hidden, order)

    def _check(self, x: Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.features:
            raise ValueError(
                f"MaskedAutoregressive({self.features}) got input of shape {tuple(x.shape)}"
            )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x)
        z, logabsdet = self.transformer(x, self.made(x))
        return z, logabsdet.sum(1)

    def inverse(self, z: Tensor) -> Tensor:
        return self.inverse_and_log_det(z)[0]

    def inverse_and_log_det(self, z: Tensor) -> tuple[Tensor, Tensor]:
        self._check(z)
        x = z.new_zeros(z.shape)
        for _ in range(self.features):
            # the last pass sees exact x_{<i} for every i, so its log-det is exact too
            x, logabsdet = self.transformer.inverse(z, self.made(x))
        return x, logabsdet.sum(1)


class InverseAutoregressive(Inverse):
    """IAF layer: ``Inverse(MaskedAutoregressive(...))``, x ↦ z with z = τ⁻¹(x; θ(z_{<i})).

    Sampling (its inverse) is one network pass; density evaluation (its forward) takes D.
    Takes the arguments of :class:`MaskedAutoregressive`.
    """

    def __init__(self, features: int, **kwargs) -> None:
        super().__init__(MaskedAutoregressive(features, **kwargs))
