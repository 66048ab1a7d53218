"""Training and trained runs: :class:`Trainer`, :func:`load`, evaluation, sampling and plots of a run
directory (layout in :mod:`impflow.checkpoint`)."""

from .monitor import SolverMonitor, WarningCounter, summarize_solves
from .runs import build_model, evaluate, evaluate_run, load, plot_run, read_run, sample_run
from .trainer import FitResult, Trainer, lr_factor

__all__ = [
    "Trainer",
    "FitResult",
    "lr_factor",
    "load",
    "build_model",
    "read_run",
    "evaluate",
    "evaluate_run",
    "sample_run",
    "plot_run",
    "SolverMonitor",
    "WarningCounter",
    "summarize_solves",
]
