"""Classifiers whose residual blocks are Lipschitz-constrained ResFlow or ImpFlow blocks.

logits = head(B_n ∘ … ∘ B_1(stem(x))), where the stem (a conv for images, a linear layer for
vectors) is unconstrained, each B_i is either a ResFlow block x ↦ x + g(x) or an ImpFlow block
x ↦ z solving (Id + g_z)(z) = (Id + g_x)(x) (gradients by the implicit function theorem), every
g with Lip(g) ≤ coeff, and the head is average pooling (images) and a linear layer. No
log-determinants are computed. At equal parameters an ImpFlow classifier has half as many blocks
(each holds two networks), which is how the paper compares them.

Images may instead use a ResNet-style multi-stage layout (``stages``): the blocks of stage s act
at width w_s and resolution H_s × W_s, and between stages an unconstrained downsampling layer
(1×1 conv with stride 2, BatchNorm, ReLU) changes the width to w_{s+1} and halves the
resolution, as in the paper's ResNet-18-shaped classifier.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

from torch import Tensor, nn

from ..nn.lipschitz import LipschitzMLP
from ..nn.lipschitz_conv import LipschitzConvNet
from ..solvers import SolverConfig
from ..transforms.implicit import ImplicitBlock
from ..transforms.residual import ResidualBlock

__all__ = ["LipschitzClassifier", "classifier"]


class LipschitzClassifier(nn.Module):
    """logits = head(B_n ∘ … ∘ D_1 ∘ … ∘ B_1(stem(x))).

    ``blocks`` is the flat list of residual/implicit blocks of all stages; ``stage_blocks[s]`` of
    them form stage s, and ``downsample[s]`` (unconstrained) follows stage s for every stage but
    the last. A single-stage classifier has ``stage_blocks == [len(blocks)]`` and no downsample
    layers.

    Shapes: x (B, *in_shape) -> logits (B, num_classes).
    """

    def __init__(
        self,
        stem: nn.Module,
        blocks: Sequence[ResidualBlock | ImplicitBlock],
        head: nn.Module,
        stage_blocks: Sequence[int] | None = None,
        downsample: Sequence[nn.Module] = (),
    ) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.stage_blocks = list(stage_blocks) if stage_blocks is not None else [len(self.blocks)]
        self.downsample = nn.ModuleList(downsample)
        if sum(self.stage_blocks) != len(self.blocks) or len(self.downsample) != len(self.stage_blocks) - 1:
            raise ValueError(
                f"{len(self.stage_blocks)} stages of {self.stage_blocks} blocks need {len(self.stage_blocks) - 1} "
                f"downsample layers and {sum(self.stage_blocks)} blocks, got {len(self.downsample)} and {len(self.blocks)}"
            )

    def features(self, x: Tensor) -> Tensor:
        """The output of the last block, (B, width, H, W) or (B, width) (last stage's width and size)."""
        h = self.stem(x)
        i = 0
        for s, n in enumerate(self.stage_blocks):
            if s > 0:
                h = self.downsample[s - 1](h)
            for block in self.blocks[i : i + n]:
                h = block.map(h)  # the block's forward map, no log-det
            i += n
        return h

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _check_stages(stages: Sequence[int]) -> tuple[int, ...]:
    try:
        out = tuple(stages)
    except TypeError:
        raise ValueError(f"stages must be a sequence of positive ints (widths per stage), got {stages!r}") from None
    if not out or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in out):
        raise ValueError(f"stages must be a non-empty sequence of positive ints (widths per stage), got {stages!r}")
    return out


def default_blocks(block: str, staged: bool) -> int:
    """Blocks when none are given: 4 ResFlow or 2 ImpFlow blocks (equal parameters); with
    ``staged`` (several stages) half as many per stage, ResNet-18's basic block."""
    return (4 if block == "resflow" else 2) // (2 if staged else 1)


def _pooled_head(width: int, pool: int, num_classes: int) -> nn.Module:
    """(B, width, H, W) -> average-pooled to pool × pool -> linear -> (B, num_classes)."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(pool), nn.Flatten(), nn.Linear(width * pool**2, num_classes))


def classifier(
    in_shape: int | Sequence[int],
    num_classes: int,
    block: str = "resflow",
    coeff: float = 0.9,
    width: int | None = None,
    blocks: int | None = None,
    hidden: int | None = None,
    kernels: Sequence[int] = (3, 1, 3),
    pool: int = 2,
    activation: str = "lipswish",
    solver: SolverConfig | None = None,
    n_power_iterations: int = 5,
    stages: Sequence[int] | None = None,
) -> LipschitzClassifier:
    """A ResNet-style classifier with ResFlow or ImpFlow residual blocks.

    Args:
        in_shape: (C, H, W) for images (conv stem, :class:`LipschitzConvNet` blocks, average
            pooling) or d / (d,) for vectors (linear stem, :class:`LipschitzMLP` blocks).
        num_classes: number of logits.
        block: ``"resflow"`` or ``"impflow"``.
        coeff: Lipschitz bound of every g (each of its layers is normalised to it).
        width: channels (images) or features (vectors) the blocks act on (default 32); not with
            ``stages``, which sets the widths.
        blocks: number of blocks (per stage with ``stages``); None gives 4 ResFlow or 2 ImpFlow
            blocks, or with ``stages`` 2 ResFlow or 1 ImpFlow block per stage (ResNet-18's
            "basic block" = two residual blocks); either way equal parameters.
        hidden: width inside each g (default ``width``): convs with ``kernels`` for images, an
            MLP with two hidden layers for vectors. With ``stages`` it is the hidden width of
            stage 1 and scales with the stage width (``round(hidden · w_s / w_1)``); None gives
            ``w_s``.
        pool: images are average-pooled to pool × pool before the linear layer: 1 is ResNet's
            global pooling; 2 keeps the coarse layout that small images (8×8 digits) need when
            there are no downsampling stages.
        activation: ``"lipswish"``, ``"sine"``, ``"elu"`` or ``"tanh"`` (inside every g).
        solver: root-solver settings of the ImpFlow blocks.
        stages: images only: widths (w_1, …, w_S) of a multi-stage layout. The stem conv maps C
            to w_1; stage s holds ``blocks`` blocks at width w_s and resolution H_s × W_s; between
            stages an unconstrained 1×1 conv with stride 2 (w_s → w_{s+1}), BatchNorm2d and ReLU
            give H_{s+1} = ⌈H_s / 2⌉; the head pools the last stage to pool × pool and applies a
            linear layer to w_S · pool² features. None: one stage (today's layout).

    Shapes: x (B, *in_shape) -> logits (B, num_classes).
    """
    if block not in ("resflow", "impflow"):
        raise ValueError(f"block must be 'resflow' or 'impflow', got {block!r}")
    blocks = blocks if blocks is not None else default_blocks(block, stages is not None)
    if blocks < 1 or num_classes < 2:
        raise ValueError(f"need blocks ≥ 1 and num_classes ≥ 2, got {blocks}, {num_classes}")
    in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
    solver = solver if solver is not None else SolverConfig()
    common = dict(coeff=coeff, activation=activation, n_power_iterations=n_power_iterations)

    def make(net: Callable[[], nn.Module]) -> list[ResidualBlock | ImplicitBlock]:
        if block == "resflow":
            return [ResidualBlock(net(), solver=solver) for _ in range(blocks)]
        return [ImplicitBlock(net(), net(), solver=solver) for _ in range(blocks)]

    if stages is not None:
        widths = _check_stages(stages)
        if width is not None:
            raise ValueError("give either width (one stage) or stages (widths per stage), not both")
        if len(in_shape) != 3:
            raise ValueError(f"stages need an image in_shape (C, H, W), got {in_shape}")
        c, h, w = in_shape
        sizes = [(h, w)]
        for _ in widths[1:]:
            sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))  # 1×1 conv, stride 2
        if min(sizes[-1]) < pool:
            raise ValueError(
                f"{len(widths)} stages reduce {h}×{w} images to {sizes[-1][0]}×{sizes[-1][1]}, "
                f"smaller than pool={pool}: use fewer stages or a smaller pool"
            )
        stem: nn.Module = nn.Conv2d(c, widths[0], 3, padding=1)
        layers: list[ResidualBlock | ImplicitBlock] = []
        for ch, (hs, ws) in zip(widths, sizes):
            hid = ch if hidden is None else max(1, round(hidden * ch / widths[0]))
            layers += make(partial(LipschitzConvNet, ch, hid, (ch, hs, ws), kernels, **common))
        down = [
            nn.Sequential(nn.Conv2d(a, b, 1, stride=2, bias=False), nn.BatchNorm2d(b), nn.ReLU())
            for a, b in zip(widths[:-1], widths[1:])
        ]
        head: nn.Module = _pooled_head(widths[-1], pool, num_classes)
        return LipschitzClassifier(stem, layers, head, [blocks] * len(widths), down)

    width = width if width is not None else 32
    hidden = hidden if hidden is not None else width
    if len(in_shape) == 3:
        c, h, w = in_shape
        stem = nn.Conv2d(c, width, 3, padding=1)
        head = _pooled_head(width, pool, num_classes)

        def net() -> nn.Module:
            return LipschitzConvNet(width, hidden, (width, h, w), kernels, **common)

    elif len(in_shape) == 1:
        stem = nn.Linear(in_shape[0], width)
        head = nn.Linear(width, num_classes)

        def net() -> nn.Module:
            return LipschitzMLP(width, (hidden, hidden), **common)

    else:
        raise ValueError(f"in_shape must be (C, H, W) or (d,), got {in_shape}")

    return LipschitzClassifier(stem, make(net), head)
