"""Multi-scale Residual Flows and Implicit Flows on images (the ResFlow / ImpFlow CIFAR layout).

Layout, for ``blocks_per_scale = (n_1, …, n_S)``::

    [Logit] → [ActNorm] → scale 1: (block → [ActNorm]) × n_1 → Squeeze → [factor out half]
                        → scale 2: … → scale S: (block → [ActNorm]) × n_S

Each block acts on the whole image of its scale, (C_s, H/2^(s−1), W/2^(s−1)), with a
:class:`~impflow.nn.lipschitz_conv.LipschitzConvNet` g (kernels 3-1-3). After a squeeze the
channels quadruple; with ``factor_out`` the last half of them leaves for the latent (standard
normal), so C_{s+1} = 2·C_s instead of 4·C_s. The latent has the input's shape in
:class:`~impflow.transforms.reshape.MultiScale`'s layout. The paper compares ImpFlow 2-2-2 with
ResFlow 4-4-4: the same number of networks and (up to the ActNorms) parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import nn

from ..flow import Flow
from ..logdet import LogDetConfig
from ..nn.lipschitz_conv import LipschitzConvNet
from ..solvers import SolverConfig
from ..transforms.base import Compose, Transform
from ..transforms.elementwise import Logit
from ..transforms.implicit import ImplicitBlock
from ..transforms.normalization import ActNorm
from ..transforms.reshape import MultiScale, Squeeze
from ..transforms.residual import ResidualBlock
from .residual import EXACT_MAX_DIM

__all__ = ["image_resflow", "image_impflow", "default_image_logdet"]

Shape = tuple[int, int, int]
BlockFactory = Callable[[Shape], Transform]  # event shape of one scale -> one block


def default_image_logdet(shape: Sequence[int]) -> str:
    """The training estimator: "exact" for C·H·W ≤ 16 (as for vectors), else "neumann".

    Exact training on 8×8 digits costs about 20 times the Neumann estimator per step
    (``impflow train --model image-resflow --data digits --steps 20 --batch-size 64 --logdet
    exact`` trained for 81 s against 3.9 s with ``--logdet neumann``, one thread, 2026-12-07):
    the 64 vjps of every block's Jacobian and their backward. Evaluation stays exact up to 64
    dimensions (:func:`impflow.train.runs.evaluate`). The Neumann form keeps memory flat in the
    number of series terms and is the estimator of ``benchmarks/digits.py``.
    """
    return "exact" if math.prod(shape) <= EXACT_MAX_DIM else "neumann"


class _ResidualScales(MultiScale):
    """ResFlow's scale order (blocks, then squeeze, then factor-out) in MultiScale's latent layout.

    ``levels[i]`` runs up to the i-th factor-out; the last ``factored_shapes[i][0]`` channels of
    its output go to the latent. Forward, inverse and the latent layout are MultiScale's.
    """

    def __init__(
        self, shape: Shape, levels: list[Transform], factored_shapes: list[Shape], final_shape: Shape
    ) -> None:
        Transform.__init__(self)  # MultiScale.__init__ builds Glow levels; set its attributes here
        self.shape = shape
        self.blocks = nn.ModuleList(levels)
        self.factored_shapes = factored_shapes
        self.final_shape = final_shape


def _image_flow(
    shape: Sequence[int],
    blocks_per_scale: int | Sequence[int],
    block: BlockFactory,
    actnorm: bool,
    factor_out: bool,
    logit_alpha: float | None,
    actnorm_every: int = 1,
) -> Flow:
    """Assemble the layout of the module docstring from ``block(shape_of_scale)``; with
    ``actnorm_every`` = k the ActNorms follow every k-th block of a scale (and its last one)."""
    shape = tuple(shape)
    counts = (blocks_per_scale,) * 3 if isinstance(blocks_per_scale, int) else tuple(blocks_per_scale)
    if len(shape) != 3:
        raise ValueError(f"shape must be (C, H, W), got {shape}")
    if not counts or min(counts) < 1:
        raise ValueError(f"need at least one scale and one block per scale, got {counts}")
    if actnorm_every < 1:
        raise ValueError(f"actnorm_every must be at least 1, got {actnorm_every}")
    c, h, w = shape
    squeezes = len(counts) - 1
    if h % 2**squeezes or w % 2**squeezes:
        raise ValueError(f"{len(counts)} scales need H and W divisible by {2**squeezes}, got {h}×{w}")

    levels: list[Transform] = []
    factored: list[Shape] = []
    layers: list[Transform] = [ActNorm(c)] if actnorm else []
    for scale, n in enumerate(counts):
        for i in range(n):
            layers.append(block((c, h, w)))
            if actnorm and ((i + 1) % actnorm_every == 0 or i + 1 == n):
                layers.append(ActNorm(c))
        if scale == squeezes:
            break
        layers.append(Squeeze())
        c, h, w = 4 * c, h // 2, w // 2
        if factor_out:
            levels.append(Compose(layers))
            layers = []
            c //= 2
            factored.append((c, h, w))
    levels.append(Compose(layers))
    transform: Transform = _ResidualScales(shape, levels, factored, (c, h, w))
    if logit_alpha is not None:
        transform = Compose(Logit(logit_alpha), transform)
    return Flow(transform, event_shape=shape)


def _conv_net_factory(
    hidden: int, kernels: Sequence[int], coeff: float, activation: str, n_power_iterations: int
) -> Callable[[Shape], LipschitzConvNet]:
    def net(s: Shape) -> LipschitzConvNet:
        return LipschitzConvNet(s[0], hidden, s, kernels, coeff, activation, n_power_iterations)

    return net


def image_resflow(
    shape: Sequence[int],
    blocks_per_scale: int | Sequence[int] = (4, 4, 4),
    hidden: int = 64,
    kernels: Sequence[int] = (3, 1, 3),
    coeff: float = 0.97,
    activation: str = "lipswish",
    logdet: str | LogDetConfig | None = None,
    actnorm: bool = True,
    factor_out: bool = False,
    logit_alpha: float | None = None,
    solver: SolverConfig | None = None,
    n_power_iterations: int = 5,
    actnorm_every: int = 1,
) -> Flow:
    """A multi-scale Residual Flow on images of ``shape`` (C, H, W): blocks z = x + g(x).

    Args:
        blocks_per_scale: blocks at each scale; an int k means (k, k, k).
        hidden: channels inside each g; ``kernels`` its conv kernel sizes.
        coeff: operator-norm bound of each conv (Lip(g) ≤ coeff^len(kernels)).
        logdet: estimator; None picks :func:`default_image_logdet` (exact for C·H·W ≤ 16, else neumann).
        actnorm: ActNorm first and after every block.
        actnorm_every: with ``actnorm``, the ActNorms after every k-th block of a scale only (and
            its last): k = 2 puts them where ImpFlow with half the blocks has its, with exactly
            its parameters.
        factor_out: send half the channels to the latent after each squeeze.
        logit_alpha: if given, a :class:`~impflow.transforms.elementwise.Logit` first (data in [0, 1]).
        solver: root-solver settings of the inverses.
    """
    logdet = logdet if logdet is not None else default_image_logdet(shape)
    solver = solver if solver is not None else SolverConfig()
    net = _conv_net_factory(hidden, kernels, coeff, activation, n_power_iterations)
    return _image_flow(
        shape,
        blocks_per_scale,
        lambda s: ResidualBlock(net(s), logdet, solver),
        actnorm,
        factor_out,
        logit_alpha,
        actnorm_every,
    )


def image_impflow(
    shape: Sequence[int],
    blocks_per_scale: int | Sequence[int] = (2, 2, 2),
    hidden: int = 64,
    kernels: Sequence[int] = (3, 1, 3),
    coeff: float = 0.97,
    activation: str = "lipswish",
    logdet: str | LogDetConfig | None = None,
    actnorm: bool = True,
    factor_out: bool = False,
    logit_alpha: float | None = None,
    solver: SolverConfig | None = None,
    n_power_iterations: int = 5,
    inner_actnorm: bool = False,
) -> Flow:
    """A multi-scale Implicit Flow on images: blocks z = (Id + g_z)⁻¹((Id + g_x)(x)).

    Arguments as :func:`image_resflow`. Each block has two networks, so ImpFlow (2, 2, 2) has as
    many networks and parameters (ActNorms aside) as ResFlow (4, 4, 4). ``inner_actnorm`` also
    puts an ActNorm inside every block, z = (Id + g_z)⁻¹ ∘ ActNorm ∘ (Id + g_x)(x), where
    ResFlow (4, 4, 4) has one between its two blocks: with ``actnorm`` too, both then have the same
    ActNorms and exactly the same parameters.
    """
    logdet = logdet if logdet is not None else default_image_logdet(shape)
    solver = solver if solver is not None else SolverConfig()
    net = _conv_net_factory(hidden, kernels, coeff, activation, n_power_iterations)
    return _image_flow(
        shape,
        blocks_per_scale,
        lambda s: ImplicitBlock(net(s), net(s), logdet, solver, mid=ActNorm(s[0]) if inner_actnorm else None),
        actnorm,
        factor_out,
        logit_alpha,
    )
