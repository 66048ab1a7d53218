"""ActNorm (Glow): a per-feature (per-channel for images) affine map with data-dependent init."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Transform

__all__ = ["ActNorm"]


class ActNorm(Transform):
    """z = (x + b) · exp(s), per feature of a vector or per channel of an image.

    log|det ∂z/∂x| = Σ s · (H·W for images). On the first forward pass in training mode,
    b and s are set so that the batch's output has zero mean and unit variance per
    feature/channel (data-dependent initialisation); the ``initialized`` buffer records it
    so a loaded checkpoint is not re-initialised.

    Args:
        features: number of features (vectors, shape (B, features)) or channels
            (images, shape (B, features, H, W)).
        eps: floor on the initial standard deviation (constant features stay finite).
    """

    def __init__(self, features: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.features = features
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(features))
        self.log_scale = nn.Parameter(torch.zeros(features))
        self.register_buffer("initialized", torch.tensor(False))

    def _view(self, p: Tensor, x: Tensor) -> Tensor:
        if x.dim() == 2:
            return p.view(1, -1)
        return p.view(1, -1, *([1] * (x.dim() - 2)))

    def _check(self, x: Tensor) -> None:
        if x.dim() < 2 or x.shape[1] != self.features:
            raise ValueError(
                f"ActNorm({self.features}) got input of shape {tuple(x.shape)}; "
                f"expected (batch, {self.features}, ...)"
            )

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dim=dims)
        std = x.std(dim=dims, unbiased=False) if x.shape[0] > 1 else torch.ones_like(mean)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std.clamp_min(self.eps)))
        self.initialized.fill_(True)

    def _spatial(self, x: Tensor) -> int:
        n = 1
        for s in x.shape[2:]:
            n *= s
        return n

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x)
        if self.training and not bool(self.initialized):
            self._initialize(x)
        z = (x + self._view(self.bias, x)) * torch.exp(self._view(self.log_scale, x))
        ladj = (self.log_scale.sum() * self._spatial(x)).expand(x.shape[0])
        return z, ladj

    def inverse(self, z: Tensor) -> Tensor:
        self._check(z)
        return z * torch.exp(-self._view(self.log_scale, z)) - self._view(self.bias, z)

    def inverse_and_log_det(self, z: Tensor) -> tuple[Tensor, Tensor]:
        x = self.inverse(z)
        return x, (-self.log_scale.sum() * self._spatial(z)).expand(z.shape[0])
