"""Multi-scale architecture pieces (RealNVP, Glow): squeeze, split (factor-out) and the
:class:`MultiScale` container.

Latent layout of :class:`MultiScale`: the factored-out parts of levels 1…L−1 and the output of
the last level, each flattened, concatenated in that order and reshaped to the input's shape
(C, H, W). The flow's base therefore stays N(0, I) over the full dimensionality, and
``Flow(MultiScale(...), event_shape=(C, H, W))`` works with ``log_prob`` and ``sample``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..nn.conditioners import conditioner, unflatten_params
from .base import Compose, Transform
from .coupling import AffineTransformer

__all__ = ["Squeeze", "Split", "MultiScale"]


def _check_image(x: Tensor, name: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} expects images (B, C, H, W), got shape {tuple(x.shape)}")


class Squeeze(Transform):
    """Space-to-depth: (B, C, H, W) -> (B, 4C, H/2, W/2), each 2×2 patch stacked into channels.

    Output channel 4c + 2i + j holds pixel (2h + i, 2w + j) of input channel c. A
    permutation, so log|det| = 0. H and W must be even.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _check_image(x, "Squeeze")
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"Squeeze needs even height and width, got {h}×{w}")
        z = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return z.reshape(b, 4 * c, h // 2, w // 2), x.new_zeros(b)

    def inverse(self, z: Tensor) -> Tensor:
        _check_image(z, "Squeeze.inverse")
        b, c4, h, w = z.shape
        if c4 % 4:
            raise ValueError(f"Squeeze.inverse needs channels divisible by 4, got {c4}")
        x = z.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(b, c4 // 4, 2 * h, 2 * w)

    def inverse_and_log_det(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.inverse(z), z.new_zeros(z.shape[0])


class Split(Transform):
    """Factor-out with a Gaussian conditioned on the kept half (Glow's ``split2d``).

    Channels split into kept x_k (the first ⌈C/2⌉) and factored x_f (the rest). The factored
    half is modelled as x_f ~ N(μ(x_k), σ(x_k)²) with (μ, log σ) from a small conv net, i.e.
    it is standardised:

        z_k = x_k,    z_f = (x_f − μ(x_k)) · exp(−log σ(x_k)),    log|det| = −Σ log σ,

    so log N(z_f; 0, I) + log|det| = log N(x_f; μ, σ²). Written as an
    :class:`~impflow.transforms.coupling.AffineTransformer` with shift −μ and log-scale −log σ
    (bounded by ``scale_bound``); the zero-initialised net starts at N(0, I). The output has
    the input's shape: :class:`MultiScale` peels off z_f (channels ``kept_channels:``).

    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, hidden: int = 64, scale_bound: float = 3.0) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"Split needs at least 2 channels, got {channels}")
        self.channels = channels
        self.kept_channels = (channels + 1) // 2
        self.transformer = AffineTransformer(scale_bound, shift_first=True)  # x_f − μ, then ÷ σ
        factored = channels - self.kept_channels
        self.net = conditioner(self.kept_channels, 2 * factored, image=True, hidden=hidden)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        _check_image(x, "Split")
        if x.shape[1] != self.channels:
            raise ValueError(f"Split({self.channels}) got input of shape {tuple(x.shape)}")
        kept, factored = x[:, : self.kept_channels], x[:, self.kept_channels :]
        return kept, factored, unflatten_params(self.net(kept), 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        kept, x_f, params = self._split(x)
        z_f, logabsdet = self.transformer(x_f, params)
        return torch.cat([kept, z_f], dim=1), logabsdet.flatten(1).sum(1)

    def inverse(self, z: Tensor) -> Tensor:
        return self.inverse_and_log_det(z)[0]

    def inverse_and_log_det(self, z: Tensor) -> tuple[Tensor, Tensor]:
        kept, z_f, params = self._split(z)
        x_f, logabsdet = self.transformer.inverse(z_f, params)
        return torch.cat([kept, x_f], dim=1), logabsdet.flatten(1).sum(1)


StepFactory = Callable[[tuple[int, int, int], int], Transform]


class MultiScale(Transform):
    """The RealNVP/Glow multi-scale architecture: L levels of squeeze → K steps → split.

    Level l squeezes its input (C, H, W) to (4C, H/2, W/2), applies
    ``step_factory(shape, k)`` for k = 0…K−1 (``shape`` the squeezed (4C, H/2, W/2)), and,
    except at the last level, applies a :class:`Split` and factors out the standardised half;
    the kept 2C channels go on to the next level. The latent z has the input's shape (see the
    module docstring for the layout) and ``inverse`` is exact.

    Args:
        shape: (C, H, W) of one input; H and W must be divisible by 2^levels.
        levels: L.
        steps: K, flow steps per level.
        step_factory: builds one step for a given event shape and step index.
        hidden: width of the Split conv nets.
    """

    container = True

    def __init__(
        self,
        shape: tuple[int, int, int],
        levels: int,
        steps: int,
        step_factory: StepFactory,
        hidden: int = 64,
    ) -> None:
        super().__init__()
        c, h, w = shape
        if levels < 1:
            raise ValueError(f"levels must be ≥ 1, got {levels}")
        if h % 2**levels or w % 2**levels:
            raise ValueError(f"{levels} levels need H and W divisible by {2**levels}, got {h}×{w}")
        self.shape = (c, h, w)
        blocks: list[Transform] = []
        self.factored_shapes: list[tuple[int, int, int]] = []
        for level in range(levels):
            c, h, w = 4 * c, h // 2, w // 2
            block = [Squeeze(), *(step_factory((c, h, w), k) for k in range(steps))]
            if level < levels - 1:
                split = Split(c, hidden)
                block.append(split)
                self.factored_shapes.append((c - split.kept_channels, h, w))
                c = split.kept_channels
            blocks.append(Compose(block))
        self.final_shape = (c, h, w)
        self.blocks = torch.nn.ModuleList(blocks)

    def _check(self, x: Tensor, name: str) -> None:
        if tuple(x.shape[1:]) != self.shape:
            expected = ", ".join(map(str, self.shape))
            raise ValueError(f"{name} expects shape (B, {expected}), got {tuple(x.shape)}")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x, "MultiScale")
        ladj = x.new_zeros(x.shape[0])
        latents = []
        for block, factored in zip(self.blocks, [*self.factored_shapes, None]):
            x, l = block(x)
            ladj = ladj + l
            if factored is not None:
                kept = x.shape[1] - factored[0]
                latents.append(x[:, kept:].flatten(1))
                x = x[:, :kept]
        latents.append(x.flatten(1))
        return torch.cat(latents, dim=1).reshape(x.shape[0], *self.shape), ladj

    def _unflatten(self, z: Tensor) -> list[Tensor]:
        """z -> [factored_1, …, factored_{L−1}, final], each reshaped to its level's shape."""
        shapes = [*self.factored_shapes, self.final_shape]
        sizes = [a * b * c for a, b, c in shapes]
        parts = z.reshape(z.shape[0], -1).split(sizes, dim=1)
        return [p.reshape(z.shape[0], *s) for p, s in zip(parts, shapes)]

    def _join(self, x: Tensor, factored: list[Tensor], level: int) -> Tensor:
        """Re-attach level ``level``'s factored-out part (if any) to the kept channels x."""
        return torch.cat([x, factored[level]], dim=1) if level < len(factored) else x

    def inverse(self, z: Tensor) -> Tensor:
        self._check(z, "MultiScale.inverse")
        *factored, x = self._unflatten(z)
        for level in reversed(range(len(self.blocks))):
            x = self.blocks[level].inverse(self._join(x, factored, level))
        return x

    def inverse_and_log_det(self, z: Tensor) -> tuple[Tensor, Tensor]:
        self._check(z, "MultiScale.inverse")
        *factored, x = self._unflatten(z)
        ladj = z.new_zeros(z.shape[0])
        for level in reversed(range(len(self.blocks))):
            x, l = self.blocks[level].inverse_and_log_det(self._join(x, factored, level))
            ladj = ladj + l
        return x, ladj
