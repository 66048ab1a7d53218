"""Matplotlib figures for flows: 2-D densities, samples against data, training curves, and the
diagnostics (volume monitor, PPCA curve).

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas, so importing this
module never changes the global pyplot backend or leaks open figures. Every ``plot_*``
function writes the file (creating parent folders) and returns its path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn

from .data import toy2d

__all__ = [
    "density_grid",
    "plot_density",
    "plot_true_density",
    "plot_samples",
    "plot_training_curve",
    "plot_density_panels",
    "plot_volume",
    "plot_ppca_curve",
]

Bounds = tuple[float, float]
ArrayLike = Tensor | np.ndarray

_TRAINING_KEYS = ("loss", "train_loss")


def _grid(bounds: Bounds, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Square grid of n×n points on [lo, hi]²: xx[i, j] = x_j, yy[i, j] = y_i (rows are y)."""
    lo, hi = bounds
    if not hi > lo or n < 2:
        raise ValueError(f"need bounds lo < hi and n >= 2, got bounds={bounds}, n={n}")
    axis = np.linspace(lo, hi, n)
    return np.meshgrid(axis, axis, indexing="xy")


def _reference_tensor(module: nn.Module) -> Tensor | None:
    return next((t for t in chain(module.parameters(), module.buffers()) if t.is_floating_point()), None)


def density_grid(
    flow: nn.Module,
    bounds: Bounds = (-4.0, 4.0),
    n: int = 200,
    device: torch.device | str | None = None,
    context: Callable[[], AbstractContextManager] | None = None,
    chunk_size: int = 8192,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """log p(x) of a 2-D flow on an n×n grid over [lo, hi]²: (xx, yy, logp), each (n, n) float64.

    ``flow.log_prob`` is called on chunks of ``chunk_size`` points in eval mode (the previous
    mode is restored) under ``torch.no_grad()``; ``context()``, if given, is entered inside
    that (e.g. an exact-log-det switch for residual/implicit flows; it may re-enable grad).
    Points are made in the flow's dtype on ``device`` (default: the flow's device).
    """
    xx, yy = _grid(bounds, n)
    ref = _reference_tensor(flow)
    dtype = ref.dtype if ref is not None else torch.get_default_dtype()
    if device is None:
        device = ref.device if ref is not None else "cpu"
    points = torch.as_tensor(np.stack([xx.ravel(), yy.ravel()], axis=1), dtype=dtype, device=device)
    was_training = flow.training
    flow.eval()
    try:
        with torch.no_grad(), (context() if context is not None else nullcontext()):
            logp = torch.cat([flow.log_prob(chunk) for chunk in points.split(chunk_size)])
    finally:
        flow.train(was_training)
    return xx, yy, logp.detach().cpu().double().numpy().reshape(xx.shape)


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def _draw_density(xx: np.ndarray, yy: np.ndarray, logp: np.ndarray, path: str | os.PathLike, title: str | None) -> Path:
    fig = Figure(figsize=(4.5, 4))
    ax = fig.add_subplot()
    extent = (xx[0, 0], xx[0, -1], yy[0, 0], yy[-1, 0])
    im = ax.imshow(np.exp(logp), origin="lower", extent=extent, cmap="viridis", aspect="equal")
    fig.colorbar(im, ax=ax, label="p(x)")
    if title:  # over the whole figure: a long title over the axes alone runs into the colour bar
        fig.suptitle(title)
    return _save(fig, path)


def plot_density(
    flow: nn.Module,
    path: str | os.PathLike,
    bounds: Bounds = (-4.0, 4.0),
    n: int = 200,
    title: str | None = None,
    context: Callable[[], AbstractContextManager] | None = None,
) -> Path:
    """Image of p(x) = exp(log p(x)) of a 2-D flow on [lo, hi]² (see :func:`density_grid`)."""
    return _draw_density(*density_grid(flow, bounds, n, context=context), path, title)


def plot_true_density(
    name: str,
    path: str | os.PathLike,
    bounds: Bounds = (-4.0, 4.0),
    n: int = 200,
    title: str | None = None,
) -> Path:
    """Image of the exact density of toy dataset ``name`` (one of ``toy2d.EXACT_DENSITY``)."""
    xx, yy = _grid(bounds, n)
    logp = toy2d.log_prob(name, torch.from_numpy(np.stack([xx.ravel(), yy.ravel()], axis=1)))
    return _draw_density(xx, yy, logp.numpy().reshape(xx.shape), path, title or name)


def _points(x: ArrayLike, name: str) -> np.ndarray:
    arr = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} has shape {arr.shape}; expected (N, 2)")
    return arr


def plot_samples(
    samples: ArrayLike,
    data: ArrayLike,
    path: str | os.PathLike,
    bounds: Sequence[Bounds] | None = None,
    titles: tuple[str, str] = ("model samples", "data"),
) -> Path:
    """Scatter plots of model ``samples`` (N, 2) and ``data`` (M, 2) side by side on the same axes.

    ``bounds`` = ((x_lo, x_hi), (y_lo, y_hi)); by default the data's range plus 5% per side,
    so stray model samples do not rescale the view.
    """
    samples, data = _points(samples, "samples"), _points(data, "data")
    if bounds is None:
        lo, hi = data.min(axis=0), data.max(axis=0)
        pad = 0.05 * (hi - lo)
        bounds = tuple(zip(lo - pad, hi + pad))
    fig = Figure(figsize=(9, 4.5))
    for k, (points, title) in enumerate(zip((samples, data), titles)):
        ax = fig.add_subplot(1, 2, k + 1)
        ax.scatter(points[:, 0], points[:, 1], s=1, alpha=0.3, rasterized=True)
        ax.set_xlim(*bounds[0])
        ax.set_ylim(*bounds[1])
        ax.set_aspect("equal")
        ax.set_title(title)
    return _save(fig, path)


def _is_curve(key: str) -> bool:
    return any(tag in key for tag in ("loss", "nll", "bpd"))


def plot_training_curve(
    history: Sequence[Mapping[str, float]],
    path: str | os.PathLike,
    reference: Mapping[str, float] | None = None,
    title: str | None = None,
) -> Path:
    """Training loss and evaluated NLLs against ``step`` (or the record index).

    Plots every key of the records that is ``loss``/``train_loss`` (labelled as the training
    minibatch loss) or contains ``loss``, ``nll`` or ``bpd`` (labelled as evaluated), each
    from the records that have it, so sparse evaluations are fine. ``reference`` draws
    horizontal lines, e.g. ``{"entropy": 3.466, "Gaussian optimum": 5.1}``.
    """
    keys = [k for k in dict.fromkeys(chain.from_iterable(history)) if _is_curve(k)]
    if not keys:
        found = sorted(set(chain.from_iterable(history)))
        raise ValueError(f"no loss/nll/bpd keys to plot in history (keys found: {found})")
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for key in keys:
        rows = [(rec.get("step", i), rec[key]) for i, rec in enumerate(history) if rec.get(key) is not None]
        steps, values = zip(*rows)
        if key in _TRAINING_KEYS:
            ax.plot(steps, values, lw=0.8, alpha=0.7, label=f"{key} (training minibatch)")
        else:
            ax.plot(steps, values, marker="o", ms=3, label=f"{key} (evaluated)")
    for k, (label, value) in enumerate((reference or {}).items()):
        ax.axhline(value, ls="--", lw=1, color=f"C{len(keys) + k}", label=label)
    ax.set_xlabel("step" if any("step" in rec for rec in history) else "record")
    ax.set_ylabel("loss / NLL")
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, path)


# --------------------------------------------------------------------------- diagnostics


def plot_density_panels(
    panels: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
    path: str | os.PathLike,
    suptitle: str | None = None,
) -> Path:
    """Densities side by side on a common colour scale (0 to the largest 99.5th percentile of the
    panels): ``panels`` = [(title, xx, yy, logp), ...] with xx, yy, logp as returned by
    :func:`density_grid` (e.g. the true density, then models)."""
    if not panels:
        raise ValueError("no panels to draw")
    vmax = max(float(np.percentile(np.exp(p[3]), 99.5)) for p in panels)  # a sharp model peak saturates
    fig = Figure(figsize=(3.6 * len(panels), 3.8))
    for k, (title, xx, yy, logp) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        extent = (xx[0, 0], xx[0, -1], yy[0, 0], yy[-1, 0])
        ax.imshow(np.exp(logp), origin="lower", extent=extent, cmap="viridis", aspect="equal", vmin=0, vmax=vmax)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def _volume_records(history: Sequence[Mapping]) -> list[tuple[int, Mapping]]:
    return [
        (rec.get("step", i), rec["volume"]["blocks"])
        for i, rec in enumerate(history)
        if isinstance(rec.get("volume"), Mapping) and "blocks" in rec["volume"]
    ]


def plot_volume(history: Sequence[Mapping], path: str | os.PathLike, title: str | None = None) -> Path:
    """The volume monitor's records (``history[i]["volume"]``, see
    :class:`impflow.train.monitor.VolumeMonitor`) against the step, three panels: per-block
    log-det mean (± one standard deviation, shaded), and the estimated Lip(f) and Lip(f⁻¹) of
    each residual/implicit block (solid) with their certified bounds (dotted, where finite and
    on scale)."""
    records = _volume_records(history)
    if not records:
        raise ValueError("no volume records in history (train with the volume monitor on)")
    names = list(dict.fromkeys(chain.from_iterable(blocks for _, blocks in records)))
    fig = Figure(figsize=(15, 4.2))
    ax = [fig.add_subplot(1, 3, k + 1) for k in range(3)]

    def series(name: str, key: str) -> tuple[list[int], list[float]]:
        rows = [(s, b[name][key]) for s, b in records if name in b and b[name].get(key) is not None]
        return ([r[0] for r in rows], [r[1] for r in rows]) if rows else ([], [])

    from matplotlib import colormaps

    learned = [n for n in names if "ActNorm" not in n]
    others = [n for n in names if "ActNorm" in n]
    cmap = colormaps["tab10"] if len(learned) <= 10 else colormaps["viridis"].resampled(len(learned))
    greys = colormaps["Greys"]
    colours = {n: cmap(j) for j, n in enumerate(learned)}
    colours |= {n: greys(0.35 + 0.6 * j / max(len(others) - 1, 1)) for j, n in enumerate(others)}
    lip_max = 1.0
    for name in names:
        colour = colours[name]
        steps, mean = series(name, "logdet_mean")
        _, std = series(name, "logdet_std")
        if steps:
            m, s = np.asarray(mean), np.asarray(std)
            if "ActNorm" in name:  # constant over points: a thin dashed line, no band
                ax[0].plot(steps, m, ls="--", lw=0.8, color=colour, label=name)
            else:
                ax[0].plot(steps, m, marker="o", ms=2.5, color=colour, label=name)
                ax[0].fill_between(steps, m - s, m + s, color=colour, alpha=0.12)
        for a, key in ((ax[1], "lip"), (ax[2], "lip_inv")):
            steps, values = series(name, key)
            if not steps:
                continue
            lip_max = max(lip_max, *values)
            a.plot(steps, values, marker="o", ms=2.5, color=colour, label=name)
            b_steps, bounds = series(name, f"{key}_bound")
            finite = [(s, b) for s, b in zip(b_steps, bounds) if np.isfinite(b)]
            if finite:
                a.plot(*zip(*finite), ls=":", lw=0.8, alpha=0.6, color=colour)
    ax[0].axhline(0, color="k", lw=0.5)
    ax[0].set_title("per-block log|det J| (mean ± std over points; ActNorm dashed)", fontsize=10)
    ax[0].set_ylabel("nats")
    ax[1].set_title("Lip(block): estimate (solid), certified bound (dotted)", fontsize=10)
    ax[2].set_title("Lip(block⁻¹): estimate (solid), certified bound (dotted)", fontsize=10)
    for a in ax[1:]:
        a.set_yscale("log")
        a.set_ylim(top=lip_max * 4)  # bounds far above the estimates are clipped, not rescaled to
    for a in ax:
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    ax[0].legend(fontsize=6, ncol=2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_ppca_curve(
    train: Tensor | np.ndarray,
    path: str | os.PathLike,
    qs: Sequence[int] | None = None,
    title: str | None = None,
) -> Path:
    """The closed-form optimum of probabilistic PCA with q principal components against q
    (:func:`impflow.theory.ppca_curve`: nats per example, and bits per dimension on the right
    axis), with the full Gaussian - the best affine flow - as a horizontal line. ``train`` is
    (N, D) or (N, *event) data as the model sees it; ``qs`` default: every q < D up to D = 64,
    else about 40 values spread over [0, D)."""
    from . import theory

    x = torch.as_tensor(np.asarray(train) if not isinstance(train, Tensor) else train)
    curve = theory.ppca_curve(x, qs)
    d = curve["dim"]
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.plot(curve["q"], curve["nll"], marker="o", ms=3, label="PPCA optimum, q components")
    full = curve["gaussian_nll"]
    ax.axhline(full, color="C3", ls="--", lw=1, label=f"full Gaussian (best affine flow): {full:.4g}")
    ax.set_xlabel("q (principal components)")
    ax.set_ylabel("training NLL (nats per example)")
    right = ax.secondary_yaxis("right", functions=(lambda v: v / (d * np.log(2)), lambda b: b * d * np.log(2)))
    right.set_ylabel("bits per dimension (nats / D ln 2)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(title or f"PPCA curve, D = {d}, N = {curve['n_train']}")
    return _save(fig, path)
