"""Dynamic Linear Flow (Liao et al. 2019): a partially autoregressive affine transform.

The features (vectors) or channels (images) are split into K partitions x_1, …, x_K and

    y_1 = s_1 ⊙ (x_1 + μ_1),                         (log s_1, μ_1) learned, or NN_1(context)
    y_k = s_k ⊙ (x_k + μ_k),  (log s_k, μ_k) = NN_k(x_{k−1}),    k = 2…K,

with log s = a·tanh(ŝ/a) bounded so the map stays bi-Lipschitz, and
log|det ∂y/∂x| = Σ_k Σ log s_k. Every NN_k reads the input, so the density is one parallel
pass, while the inverse recovers x_1, x_2, … in K sequential steps. The *inverse variant*
conditions on y_{k−1} instead: its inverse is parallel and its forward sequential.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..nn.conditioners import conditioner, unflatten_params
from .base import Transform
from .coupling import AffineTransformer

__all__ = ["DynamicLinear"]


class DynamicLinear(Transform):
    """The Dynamic Linear Transformation (DLT) on vectors (B, d) or images (B, C, H, W).

    Args:
        features: d for vectors, C for images (partitions are then over channels).
        partitions: K (2 ≤ K ≤ features); partition sizes differ by at most one.
        hidden: width of the conditioners NN_k (MLP for vectors, ConvNet for images), each
            zero-initialised so the layer starts as the identity.
        image: inputs are images.
        inverse_variant: NN_k reads y_{k−1} rather than x_{k−1}.
        context_features: size of an optional context vector c (e.g. a one-hot class):
            (log s_1, μ_1) = NN_1(c) (per channel for images) and c is appended to every
            NN_k's input. Pass it as ``forward(x, context=c)``.
        scale_bound: a, the bound on |log s|.
        shift_first: y_k = s_k ⊙ (x_k + μ_k) as above (the paper's form, default) or
            y_k = s_k ⊙ x_k + μ_k (see :class:`~impflow.transforms.coupling.AffineTransformer`).
    """

    def __init__(
        self,
        features: int,
        partitions: int = 2,
        hidden: int = 64,
        image: bool = False,
        inverse_variant: bool = False,
        context_features: int | None = None,
        scale_bound: float = 3.0,
        shift_first: bool = True,
    ) -> None:
        super().__init__()
        if not 2 <= partitions <= features:
            raise ValueError(f"need 2 ≤ partitions ≤ features, got {partitions} and {features}")
        self.features, self.image, self.inverse_variant = features, image, inverse_variant
        self.context_features = context_features or 0
        self.sizes = [len(p) for p in torch.arange(features).tensor_split(partitions)]
        self.transformer = AffineTransformer(scale_bound, shift_first=shift_first)
        if self.context_features:
            self.first = conditioner(self.context_features, 2 * self.sizes[0], image=False, hidden=hidden)
        else:
            self.first = nn.Parameter(torch.zeros(self.sizes[0], 2))  # (μ_1, ŝ_1) per feature
        self.nets = nn.ModuleList(
            conditioner(a, 2 * b, image=image, hidden=hidden, context_features=self.context_features)
            for a, b in zip(self.sizes[:-1], self.sizes[1:])
        )

    def _check(self, x: Tensor, context: Tensor | None) -> None:
        dims = 4 if self.image else 2
        if x.dim() != dims or x.shape[1] != self.features:
            expected = f"(batch, {self.features}{', H, W' if self.image else ''})"
            raise ValueError(f"DynamicLinear got input of shape {tuple(x.shape)}; expected {expected}")
        if (context is not None) != bool(self.context_features):
            raise ValueError(
                f"DynamicLinear built with context_features={self.context_features} "
                f"was called {'with' if context is not None else 'without'} context"
            )

    def _params(self, k: int, previous: Tensor | None, like: Tensor, context: Tensor | None) -> Tensor:
        """(μ_k, ŝ_k) shaped (*like.shape, 2); ``previous`` is x_{k−1} or y_{k−1} (k ≥ 1)."""
        if k > 0:
            return unflatten_params(self.nets[k - 1](previous, context), 2)
        first = self.first if context is None else unflatten_params(self.first(context), 2)
        if self.image:
            first = first.unsqueeze(-2).unsqueeze(-2)  # per channel: (…, C_1, 1, 1, 2)
        return first.expand(*like.shape, 2)

    def _chain(
        self, u: Tensor, context: Tensor | None, inverse: bool, condition_on_output: bool
    ) -> tuple[Tensor, Tensor]:
        """Map the partitions of u one by one (forward or inverse affine), NN_k reading
        partition k−1 of the input u or of the output."""
        self._check(u, context)
        inputs = u.split(self.sizes, dim=1)
        outputs: list[Tensor] = []
        ladj = u.new_zeros(u.shape[0])
        step = self.transformer.inverse if inverse else self.transformer
        for k, u_k in enumerate(inputs):
            previous = None if k == 0 else (outputs if condition_on_output else inputs)[k - 1]
            v_k, log_scale = step(u_k, self._params(k, previous, u_k, context))
            outputs.append(v_k)
            ladj = ladj + log_scale.flatten(1).sum(1)
        return torch.cat(outputs, dim=1), ladj

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._chain(x, context, inverse=False, condition_on_output=self.inverse_variant)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return self.inverse_and_log_det(z, context)[0]

    def inverse_and_log_det(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._chain(z, context, inverse=True, condition_on_output=not self.inverse_variant)
