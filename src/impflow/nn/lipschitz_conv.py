"""Lipschitz-constrained convolutional networks for image residual blocks.

:class:`SpectralConv2d` normalises the convolution *as an operator* on inputs of one fixed shape
(C, H, W) — not the reshaped kernel, whose norm is neither an upper nor a lower bound of the
operator's — by power iteration with ``conv2d`` and its adjoint ``conv_transpose2d``. It is a
:class:`~impflow.nn.lipschitz.SpectralLinear` whose linear map is that convolution, so it keeps
the same refresh policy (warm-started steps whenever the weight's version changes) and the same
checkpoint hooks. :func:`~impflow.nn.lipschitz.lipschitz_bound` certifies a network from the *exact* operator norms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .lipschitz import ACTIVATIONS, SpectralLinear, _unit, check_lipschitz_args

__all__ = ["SpectralConv2d", "LipschitzConvNet"]


class SpectralConv2d(SpectralLinear):
    """y = W̃ ⋆ x + b, W̃ = W / max(1, σ̂/coeff), σ̂ ≈ ‖x ↦ W ⋆ x‖₂ on inputs of ``input_shape``.

    Stride 1 and zero padding k//2 (k odd), so the operator maps (C, H, W) -> (C', H, W).
    Power iteration v ← Aᵀu/‖Aᵀu‖, u ← Av/‖Av‖ with A = conv2d and Aᵀ = conv_transpose2d on the
    persistent buffers u (C', H, W) and v (C, H, W); σ̂ = ⟨u, A v⟩, differentiable in W.

    Shapes: x (B, C, H, W) -> (B, C', H, W), with (C, H, W) = ``input_shape`` only (the norm of
    a zero-padded convolution grows with the image size, so other sizes are refused).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        input_shape: Sequence[int],
        coeff: float = 0.97,
        n_power_iterations: int = 5,
        bias: bool = True,
    ) -> None:
        # SpectralLinear.__init__ builds a dense (out, in) weight; the conv layer builds its own
        nn.Module.__init__(self)
        if not 0 < coeff:
            raise ValueError(f"coeff must be positive, got {coeff}")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same-size padding), got {kernel_size}")
        input_shape = tuple(input_shape)
        if len(input_shape) != 3 or input_shape[0] != in_channels:
            raise ValueError(f"input_shape must be ({in_channels}, H, W), got {input_shape}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.padding = kernel_size, kernel_size // 2
        self.input_shape = input_shape
        self.coeff = coeff
        self.n_power_iterations = n_power_iterations
        self.max_power_iterations = 100
        self.power_tol = 1e-4
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.orthogonal_(self.weight)  # orthogonal rows of the (out, in·k·k) kernel matrix
        if self.bias is not None:
            bound = 1 / math.sqrt(in_channels * kernel_size**2)
            nn.init.uniform_(self.bias, -bound, bound)
        _, h, w = input_shape
        self.register_buffer("u", _unit(torch.randn(out_channels, h, w)))
        self.register_buffer("v", _unit(torch.randn(in_channels, h, w)))
        self._seen_version = -1
        self.power_iteration(n=200)

    def _conv(self, x: Tensor, weight: Tensor) -> Tensor:
        """A x: (…, C, H, W) -> (…, C', H, W)."""
        return F.conv2d(x, weight, padding=self.padding)

    def _matvec(self, W: Tensor, v: Tensor) -> Tensor:
        """A v = W ⋆ v (zero padding k//2)."""
        return self._conv(v, W)

    def _rmatvec(self, W: Tensor, u: Tensor) -> Tensor:
        """Aᵀ u = conv_transpose2d(u, W)."""
        return F.conv_transpose2d(u, W, padding=self.padding)

    def dense_operator(self) -> Tensor:
        """The dense matrix (C'HW, CHW) of the raw operator x ↦ W ⋆ x."""
        return self._dense(self.weight.detach())

    def _dense(self, weight: Tensor) -> Tensor:
        n = math.prod(self.input_shape)
        eye = torch.eye(n, dtype=weight.dtype, device=weight.device)
        return self._conv(eye.view(n, *self.input_shape), weight).reshape(n, -1).T

    def operator_matrix(self) -> Tensor:
        """The dense matrix (C'HW, CHW) of x ↦ W̃ ⋆ x, from the identity basis (small shapes only)."""
        return self._dense(self.normalized_weight())

    @torch.no_grad()
    def operator_norm(self) -> float:
        """The exact operator norm of x ↦ W̃ ⋆ x. A 1×1 convolution applies the (C', C) matrix
        W̃[:, :, 0, 0] at every pixel (the operator is I_HW ⊗ W̃), so its norm is that matrix's;
        other kernels take the SVD of :meth:`operator_matrix`."""
        if self.kernel_size == 1:
            return float(torch.linalg.matrix_norm(self.normalized_weight()[:, :, 0, 0], ord=2))
        return float(torch.linalg.matrix_norm(self.operator_matrix(), ord=2))

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"SpectralConv2d was normalised for inputs (B, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(x.shape)}"
            )
        return F.conv2d(x, self.normalized_weight(), self.bias, padding=self.padding)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"input_shape={self.input_shape}, coeff={self.coeff}"
        )


class LipschitzConvNet(nn.Module):
    """g: (C, H, W) -> (C, H, W), convolutions (kernels 3-1-3 by default) and 1-Lipschitz activations.

    conv_k1(C → hidden) → σ → conv_k2(hidden → hidden) → σ → … → conv_kL(hidden → C), every conv a
    :class:`SpectralConv2d` with bound ``coeff``, so Lip(g) ≤ coeff^L ≤ coeff.

    Args:
        channels: C.
        hidden: channels of the intermediate feature maps.
        input_shape: (C, H, W) of one input.
        kernels: odd kernel sizes, one per conv.
        coeff: operator-norm bound of every conv (< 1 for an invertible residual block).
        activation: one of ``"lipswish"``, ``"sine"``, ``"elu"``, ``"tanh"``.
        n_power_iterations: warm-started power-iteration steps after each weight update.
    """

    def __init__(
        self,
        channels: int,
        hidden: int,
        input_shape: Sequence[int],
        kernels: Sequence[int] = (3, 1, 3),
        coeff: float = 0.97,
        activation: str = "lipswish",
        n_power_iterations: int = 5,
    ) -> None:
        super().__init__()
        check_lipschitz_args(activation, coeff)
        if not kernels:
            raise ValueError("kernels must name at least one convolution")
        self.event_shape = tuple(input_shape)
        if len(self.event_shape) != 3 or self.event_shape[0] != channels:
            raise ValueError(f"input_shape must be ({channels}, H, W), got {self.event_shape}")
        self.coeff = coeff
        _, h, w = self.event_shape
        sizes = [channels, *([hidden] * (len(kernels) - 1)), channels]
        layers: list[nn.Module] = []
        for i, (a, b, k) in enumerate(zip(sizes[:-1], sizes[1:], kernels)):
            if i > 0:
                layers.append(ACTIVATIONS[activation]())
            layers.append(SpectralConv2d(a, b, k, (a, h, w), coeff, n_power_iterations))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """x (batch, C, H, W) -> g(x) (batch, C, H, W)."""
        return self.net(x)
