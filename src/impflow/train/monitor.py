"""What training shows while it runs: root-solver statistics, convergence warnings, progress, and the
volume balance of the blocks (:class:`VolumeMonitor`)."""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from statistics import fmean
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..solvers import ConvergenceWarning, SolveInfo, SolverStats
from ..transforms.residual import ResidualBlock

__all__ = ["SolverMonitor", "summarize_solves", "WarningCounter", "Progress", "ProgressMode", "VolumeMonitor"]

ProgressMode = Literal["auto", "bar", "lines", "none"]


class SolverMonitor:
    """Collects the :class:`SolveInfo` s that a model's residual/implicit blocks produced since
    :meth:`reset` (each block keeps only its latest solve, so collect after every call)."""

    def __init__(self, model: nn.Module) -> None:
        self.blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
        self.reset()

    def reset(self) -> None:
        self._before = [b.last_solve for b in self.blocks]

    def collect(self) -> list[SolveInfo]:
        return [
            b.last_solve
            for b, old in zip(self.blocks, self._before)
            if b.last_solve is not None and b.last_solve is not old
        ]


def _stats(stats: list[SolverStats]) -> dict[str, float | int]:
    return {
        "solves": len(stats),
        "mean_iterations": fmean(s.mean_iterations for s in stats),
        "max_iterations": max(s.iterations for s in stats),
        "max_residual": max(s.max_residual for s in stats),
        "unconverged": sum(s.failed for s in stats),
    }


def summarize_solves(infos: list[SolveInfo]) -> dict:
    """Forward (and, where gradients flowed, backward) solver statistics over ``infos``:
    number of solves, mean per-sample iterations, worst iterations and residual, unconverged samples."""
    if not infos:
        return {"solves": 0}
    out: dict = _stats([i.forward for i in infos])
    backward = [i.backward for i in infos if i.backward is not None]
    if backward:
        out["backward"] = _stats(backward)
    return out


class WarningCounter:
    """Counts :class:`ConvergenceWarning` s instead of printing each; other warnings pass through."""

    def __init__(self, count: int = 0) -> None:
        self.count = count
        self.last: str | None = None

    @contextmanager
    def catch(self) -> Iterator[None]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            yield
        for w in caught:
            if issubclass(w.category, ConvergenceWarning):
                self.count += 1
                self.last = str(w.message)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


class Progress:
    """A tqdm bar (``"bar"``), a printed line per history record (``"lines"``) or nothing.

    ``"auto"`` is the bar when stdout is a terminal, else lines.
    """

    def __init__(self, mode: ProgressMode, total: int, initial: int) -> None:
        if mode == "auto":
            mode = "bar" if sys.stdout.isatty() else "lines"
        self.mode = mode
        self.total = total
        self._bar = (
            tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stdout)
            if mode == "bar"
            else None
        )
        self._mark = (initial, time.perf_counter())

    def update(self, step: int, values: Mapping[str, str], record: bool) -> None:
        """After ``step``: show ``values``; in line mode print them when ``record`` is set."""
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)
            self._bar.update(step - self._bar.n)
        elif self.mode == "lines" and record:
            now = time.perf_counter()
            rate = (step - self._mark[0]) / max(now - self._mark[1], 1e-9)
            self._mark = (step, now)
            shown = "  ".join(f"{k} {v}" for k, v in values.items())
            print(f"step {step}/{self.total}  {shown}  {rate:.2f} steps/s", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class VolumeMonitor:
    """Volume balance of a flow (DESIGN.md §4): per-layer log-dets and Lipschitz estimates.

    On fixed points ``points`` (e.g. the first ≤ 256 validation points), every layer of the flow
    (:func:`~impflow.transforms.layers`: containers such as Compose and an image model's
    multi-scale stack opened; ActNorm, ResidualBlock, ImplicitBlock, Logit, Squeeze or any other
    Transform whole) gets, at its own inputs in one pass of the flow:

    * ``logdet_mean``, ``logdet_std``: mean and standard deviation over the points of its exact
      log|det ∂y/∂x| (nats);
    * residual and implicit blocks also: ``lip`` = max ‖J_f‖₂ over the inputs and ``lip_inv`` =
      max ‖J_{f⁻¹}‖₂ over the outputs, lower estimates of Lip(f), Lip(f⁻¹), both from the singular
      values of J_f at the inputs (:func:`impflow.theory.block_jacobian`; J_{f⁻¹}(f(x)) =
      J_f(x)⁻¹, so no inverse is solved), and the certified bounds ``lip_bound``,
      ``lip_inv_bound`` (:func:`impflow.theory.block_lipschitz_bounds`).

    Calling the monitor returns ``{"n_points", "logdet_total_mean", "blocks": {"K Type": {...}},
    "convergence_warnings"}`` (JSON-ready; K counts the layers in the order they ran, and
    ``logdet_total_mean`` is the flow's own log-det, which the layers' add up to). It uses no
    randomness (exact log-dets, fixed points) and leaves the model's state alone (eval mode,
    gradients only with respect to the points), so a training run that calls it stays exactly
    resumable. Should a diagnostic fail, the result is ``{"error": message}`` instead of an
    exception: it never stops training.
    """

    def __init__(self, flow: nn.Module, points: Tensor, lipschitz: bool = True) -> None:
        self.flow = flow
        self.points = points
        self.lipschitz = lipschitz

    def __call__(self) -> dict[str, Any]:
        counter = WarningCounter()
        was_training = self.flow.training
        self.flow.eval()
        try:
            with counter.catch():
                result = self._measure()
        except Exception as e:  # a diagnostic must never stop training
            return {"error": f"{type(e).__name__}: {e}"}
        finally:
            self.flow.train(was_training)
        return result | {"convergence_warnings": counter.count}

    def _measure(self) -> dict[str, Any]:
        from ..logdet import exact_logdet
        from ..theory import block_jacobian, block_lipschitz_bounds
        from ..transforms import ImplicitBlock, layers, recording

        # one exact pass of the flow: every layer's input and (output, log-det) as they ran
        with recording(layers(self.flow.transform)) as calls, torch.no_grad(), exact_logdet():
            _, total = self.flow.transform(self.points)
        blocks: dict[str, dict[str, float]] = {}
        for k, (block, x, (y, ladj)) in enumerate(calls):
            ladj = ladj.detach().double()
            entry: dict[str, Any] = {
                "type": type(block).__name__,
                "logdet_mean": ladj.mean().item(),
                "logdet_std": ladj.std().item() if ladj.numel() > 1 else 0.0,
            }
            if self.lipschitz and isinstance(block, (ResidualBlock, ImplicitBlock)):
                sv = torch.linalg.svdvals(block_jacobian(block, x, y))
                entry["lip"] = sv[:, 0].max().item()
                entry["lip_inv"] = sv[:, -1].reciprocal().max().item()
                try:
                    bounds = block_lipschitz_bounds(block)
                    entry["lip_bound"], entry["lip_inv_bound"] = bounds["forward"], bounds["inverse"]
                except TypeError:  # g without spectrally normalised layers: no certificate
                    pass
            blocks[f"{k} {type(block).__name__}"] = entry
        n = int(self.points.shape[0])
        return {"n_points": n, "logdet_total_mean": total.detach().double().mean().item(), "blocks": blocks}
