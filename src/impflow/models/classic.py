"""Builders for the classic flows, each returning an :class:`impflow.Flow` with a standard-normal
base: vectors with ``dim=d``, images with ``shape=(C, H, W)`` where the model has an image form
(then a :class:`~impflow.transforms.reshape.MultiScale` of ``levels`` levels).

Every step of ``glow``, ``maf`` and ``dlf`` starts with an
:class:`~impflow.transforms.normalization.ActNorm` (data-dependent initialisation on the first
training-mode forward pass); for ``realnvp`` and ``nsf`` it is optional (``actnorm=``, see
their docstrings for the measured default).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..flow import Flow
from ..transforms.autoregressive import MaskedAutoregressive
from ..transforms.base import Compose, Transform
from ..transforms.coupling import (
    Coupling,
    alternating_mask,
    channel_mask,
    checkerboard_mask,
    half_mask,
)
from ..transforms.dlf import DynamicLinear
from ..transforms.linear import InvertibleConv1x1, LULinear
from ..transforms.normalization import ActNorm
from ..transforms.reshape import MultiScale, StepFactory

__all__ = ["realnvp", "glow", "maf", "nsf", "dlf", "linear"]

VectorStep = Callable[[int, int], Transform]  # (dim, step index) -> one step


def _flow(
    dim: int | None,
    shape: Sequence[int] | None,
    steps: int,
    vector_step: VectorStep,
    image_step: StepFactory | None = None,
    levels: int = 2,
    hidden: int = 64,
) -> Flow:
    """A Flow of ``steps`` vector steps (``dim=``) or a multi-scale image model (``shape=``)."""
    if (dim is None) == (shape is None):
        raise ValueError("give exactly one of dim= (vectors) or shape= (images)")
    if dim is not None:
        return Flow(Compose([vector_step(dim, k) for k in range(steps)]), event_shape=(dim,))
    if image_step is None:
        raise ValueError("this model has no image form; flatten the images and pass dim=")
    shape = tuple(shape)
    if len(shape) != 3:
        raise ValueError(f"shape must be (C, H, W), got {shape}")
    return Flow(MultiScale(shape, levels, steps, image_step, hidden), event_shape=shape)


MIXING = ("permutation", "rotation", "identity")


def _mixing(dim: int, k: int = 0, kind: str = "rotation") -> LULinear:
    """The LU-parameterised linear layer of vector step k, initialised at

    * ``"permutation"``: the identity at even steps and the reversal of the features at odd
      ones, so consecutive couplings transform different halves from the start;
    * ``"rotation"``: a random rotation (mixes all features);
    * ``"identity"``: the identity.
    """
    if kind == "permutation":
        return LULinear(dim) if k % 2 == 0 else LULinear(dim, weight=torch.eye(dim).flip(0))
    if kind == "rotation":
        return LULinear(dim, weight=torch.linalg.qr(torch.randn(dim, dim))[0])
    if kind == "identity":
        return LULinear(dim)
    raise ValueError(f"unknown mixing {kind!r}; choose from {MIXING}")


def realnvp(
    dim: int | None = None,
    shape: Sequence[int] | None = None,
    steps: int = 4,
    levels: int = 2,
    hidden: int = 64,
    actnorm: bool | None = None,
    identity_init: bool | None = None,
) -> Flow:
    """RealNVP (Dinh et al. 2017): affine couplings z_b = x_b·e^s + μ (the paper's form) with
    alternating masks.

    Vectors: [ActNorm →] Coupling(alternating mask, parity k); the conditioner maps the kept
    half to the transformed half's parameters, as in the paper (and zuko's ``RealNVP``, which
    with ``actnorm=False`` this matches layer for layer). Images: per level, steps alternate
    checkerboard masks (parities 0, 1) and channel masks (parities 0, 1); channel masks only
    once the image is 1×1.

    ``actnorm``: an ActNorm before every coupling. ``None`` (default): off for vectors, on for
    images. Vectors: measured on standardised data (benchmarks/family.py data: three 2-D toys,
    500 steps, and 64-D digits, 300 steps; 3 seeds, same batches) it did not help: test NLL
    −0.01 to +0.03 nats on moons and checkerboard, +0.01 to +0.2 nats on 8gaussians, and on
    digits equal in one seed, +1.5 nats/image in another and diverged in the third (2598 vs 115
    nats/image), while it adds 15–40% to the time of a training step (a few small ops and two
    parameter tensors per step). Turn it on for vector data far from standardised. Images keep
    the ActNorm per step (multi-scale models on raw pixel scales; not re-measured).

    ``identity_init``: zero last conditioner layers, so every coupling starts as the identity.
    ``None`` (default): off for vectors (the last layer starts random, as zuko's), on for
    images (deep multi-scale stacks; not re-measured). Vectors, measured with
    ``python benchmarks/family.py --ablation-only`` (8 couplings, same batches, 3 seeds), ΔNLL
    vs zuko's RealNVP with the zero start: +0.01 / +0.07 / +0.05 nats on moons / 8gaussians /
    checkerboard; with the random start: +0.02 / +0.01 / +0.01. On digits (2 seeds) the zero
    start was not worse (−0.03 vs +0.00 bits/dim).
    """
    use_norm = {"vector": bool(actnorm), "image": True if actnorm is None else bool(actnorm)}
    use_id = {"vector": bool(identity_init), "image": True if identity_init is None else bool(identity_init)}

    def norm(c: int, kind: str) -> list[Transform]:
        return [ActNorm(c)] if use_norm[kind] else []

    def vector_step(d: int, k: int) -> Transform:
        coupling = Coupling(alternating_mask(d, k), hidden=hidden, identity_init=use_id["vector"])
        return Compose(*norm(d, "vector"), coupling)

    def image_step(s: tuple[int, int, int], k: int) -> Transform:
        checkerboard = (k // 2) % 2 == 0 and s[1] * s[2] > 1
        mask = checkerboard_mask(s, k) if checkerboard else channel_mask(s, k)
        return Compose(*norm(s[0], "image"), Coupling(mask, hidden=hidden, identity_init=use_id["image"]))

    return _flow(dim, shape, steps, vector_step, image_step, levels, hidden)


def glow(
    dim: int | None = None,
    shape: Sequence[int] | None = None,
    steps: int = 4,
    levels: int = 2,
    hidden: int = 64,
    lu: bool = True,
    mixing: str = "permutation",
    shift_first: bool = True,
) -> Flow:
    """Glow (Kingma & Dhariwal 2018): ActNorm → invertible 1×1 conv → affine channel coupling.

    Images: the 1×1 conv starts at a random rotation of the channels (as in the paper; ``lu``
    picks the LU parameterisation). Vectors use an :class:`LULinear` in place of the 1×1 conv
    and a half mask; ``mixing`` sets its initial value (see :func:`_mixing`):
    ``"permutation"`` (default) the identity at even steps and the reversal at odd ones,
    ``"rotation"`` a random rotation (the default before), ``"identity"``. On standardised 64-D
    digits (``python benchmarks/family.py --ablation-only``, 300 steps, 2 seeds) the random
    rotation scored 0.19 bits/dim worse than the permutation start, for glow and dlf alike: a
    rotation mixes every pixel into every coordinate, hiding the per-pixel structure the
    couplings model, and Adam undoes it only slowly.

    ``shift_first``: the coupling's affine form, (x + μ)·e^s as in the paper (default) or
    x·e^s + μ (see :class:`~impflow.transforms.coupling.AffineTransformer`).
    """

    def vector_step(d: int, k: int) -> Transform:
        coupling = Coupling(half_mask(d), hidden=hidden, shift_first=shift_first)
        return Compose(ActNorm(d), _mixing(d, k, mixing), coupling)

    def image_step(s: tuple[int, int, int], k: int) -> Transform:
        c = s[0]
        coupling = Coupling(channel_mask(s), hidden=hidden, shift_first=shift_first)
        return Compose(ActNorm(c), InvertibleConv1x1(c, lu=lu), coupling)

    if mixing not in MIXING:
        raise ValueError(f"unknown mixing {mixing!r}; choose from {MIXING}")
    return _flow(dim, shape, steps, vector_step, image_step, levels, hidden)


def maf(
    dim: int,
    steps: int = 4,
    hidden: int | Sequence[int] = (64, 64),
    transformer: str = "affine",
    **transformer_kwargs,
) -> Flow:
    """MAF (Papamakarios et al. 2017): ActNorm → MaskedAutoregressive, the order reversed
    every other step. Vectors only."""

    def vector_step(d: int, k: int) -> Transform:
        order = torch.arange(d) if k % 2 == 0 else torch.arange(d - 1, -1, -1)
        made = MaskedAutoregressive(d, transformer, hidden, order, **transformer_kwargs)
        return Compose(ActNorm(d), made)

    return _flow(dim, None, steps, vector_step)


NSF_MIXING = ("lu", "rotation", "none")


def nsf(
    dim: int,
    steps: int = 4,
    hidden: int = 64,
    bins: int = 8,
    bound: float = 5.0,
    autoregressive: bool = False,
    actnorm: bool = False,
    mixing: str = "lu",
) -> Flow:
    """Neural Spline Flow (Durkan et al. 2019): [ActNorm →] [LULinear →] rational-quadratic
    spline coupling (NSF-RQ-C) or, with ``autoregressive=True``, spline MAF (RQ-AR). Vectors
    only (dim ≥ 2 for the coupling form).

    The coupling steps transform the two halves in turn (``half_mask(d, k)``: the second half
    at even steps, the first at odd ones), so every feature is transformed even while the
    linear layers are still near the identity; the splines live on [−bound, bound] with
    identity tails.

    Args:
        bound: B of the splines' interval [−B, B]. 5 by default (as zuko's NSF): standardised
            data often has features beyond ±3, which the identity tails leave untransformed.
        actnorm: an ActNorm at the start of every step. Off by default: on the same runs as
            for :func:`realnvp` it changed the test NLL by −0.03 to +0.01 nats on the toys
            and by −0.06 to +0.27 nats/image on digits (within seed noise), at ~5% more time
            per step.
        mixing: the linear layer before each spline layer: ``"lu"`` an :class:`LULinear`
            initialised at the identity (default), ``"rotation"`` one initialised at a random
            rotation, ``"none"`` no linear layer (then the steps are plain alternating-half
            couplings, the structure of zuko's ``NSF(passes=2)`` without its unconditional
            splines of the kept half).

    The defaults come from controlled runs on standardised 64-D digits (benchmarks/family.py
    data, 300 Adam steps, equal widths, 3 seeds): a random-rotation initialisation of the LU
    layers, as used before, cost ≈0.6 bits/dim against the identity initialisation (a rotation
    mixes every pixel into every coordinate, hiding the per-pixel marginal structure that the
    elementwise splines model well, and Adam undoes it only slowly); with identity-initialised
    LU layers, transforming the same half at every step cost ≈0.3 bits/dim against alternating
    halves; bound 5 gained ≈0.03 bits/dim over bound 3.
    """
    if mixing not in NSF_MIXING:
        raise ValueError(f"unknown mixing {mixing!r}; choose from {NSF_MIXING}")

    def vector_step(d: int, k: int) -> Transform:
        if autoregressive:
            layer = MaskedAutoregressive(d, "spline", (hidden, hidden), bins=bins, bound=bound)
        else:
            layer = Coupling(half_mask(d, k), "spline", hidden=hidden, bins=bins, bound=bound)
        pre: list[Transform] = [ActNorm(d)] if actnorm else []
        if mixing == "lu":
            pre.append(LULinear(d))
        elif mixing == "rotation":
            pre.append(_mixing(d, k, "rotation"))
        return Compose(*pre, layer)

    return _flow(dim, None, steps, vector_step)


def dlf(
    dim: int | None = None,
    shape: Sequence[int] | None = None,
    steps: int = 4,
    levels: int = 2,
    partitions: int = 2,
    hidden: int = 64,
    mixing: str = "permutation",
    shift_first: bool = True,
) -> Flow:
    """Dynamic Linear Flow (Liao et al. 2019): ActNorm → 1×1 conv → DynamicLinear (channel
    partitions, conv conditioners) in a Glow-style multi-scale model; vectors use LULinear and
    MLP conditioners.

    ``mixing`` (vectors): the LULinear's initial value, as for :func:`glow` (default
    ``"permutation"``: identity / reversal at even / odd steps, so the partitions take turns).
    ``shift_first``: the affine form of every partition, s ⊙ (x + μ) as in the paper
    (default) or s ⊙ x + μ.
    """

    def vector_step(d: int, k: int) -> Transform:
        layer = DynamicLinear(d, partitions, hidden, shift_first=shift_first)
        return Compose(ActNorm(d), _mixing(d, k, mixing), layer)

    def image_step(s: tuple[int, int, int], k: int) -> Transform:
        c = s[0]
        layer = DynamicLinear(c, partitions, hidden, image=True, shift_first=shift_first)
        return Compose(ActNorm(c), InvertibleConv1x1(c), layer)

    if mixing not in MIXING:
        raise ValueError(f"unknown mixing {mixing!r}; choose from {MIXING}")
    return _flow(dim, shape, steps, vector_step, image_step, levels, hidden)


def linear(dim: int) -> Flow:
    """ActNorm → LULinear: z = W·diag(e^s)·(x + b) + c, any invertible affine map. Trained, it
    is the best Gaussian fit: an affine flow of a standard normal is exactly a Gaussian."""
    return Flow(Compose(ActNorm(dim), LULinear(dim)), event_shape=(dim,))
