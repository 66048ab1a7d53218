"""Runs on disk: the model and data of a :class:`RunConfig`, and loading, evaluating, sampling and
plotting a trained run."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import theory
from ..checkpoint import CONFIG, HISTORY, CheckpointError, load_weights, pointer, read_json, write_json
from ..config import ConfigError, RunConfig, model_builder, model_kwargs
from ..data import toy2d
from ..flow import Flow
from ..logdet import exact_logdet
from .monitor import SolverMonitor, WarningCounter, summarize_solves

__all__ = [
    "DIM",
    "stream_seed",
    "dataset",
    "torch_dtype",
    "resolve_device",
    "build_model",
    "write_config",
    "read_run",
    "refresh_spectral",
    "load_model_state",
    "load",
    "evaluate",
    "baselines",
    "evaluate_run",
    "sample_run",
    "plot_run",
]

DIM = 2
"""Dimension of the toy datasets."""

_STREAMS = {"train": 0, "val": 1, "test": 2, "baseline": 3}
_LN2 = math.log(2.0)
_BASELINE_TRAIN = 100_000
_PLOT_POINTS = 5000


def stream_seed(seed: int, stream: str) -> int:
    """Independent seeds for the train/val/test/baseline data of run seed ``seed``."""
    return int(np.random.SeedSequence([seed, _STREAMS[stream]]).generate_state(1, np.uint64)[0] >> 1)


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


def dataset(config: RunConfig, stream: str, n: int) -> Tensor:
    """n points of the run's dataset from stream ``stream`` (CPU, the run's dtype)."""
    return toy2d.sample(config.data, n, seed=stream_seed(config.seed, stream), dtype=torch_dtype(config.dtype))


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available, else cpu; an unavailable device is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return device


def build_model(config: RunConfig, kwargs: dict[str, Any] | None = None) -> Flow:
    """The untrained Flow of ``config`` (builder kwargs from :func:`model_kwargs` unless given)."""
    kwargs = model_kwargs(config) if kwargs is None else kwargs
    try:
        flow = model_builder(config.model)(dim=DIM, **kwargs)
    except ValueError as e:
        raise ConfigError(f"cannot build model {config.model!r}: {e}") from None
    return flow.to(torch_dtype(config.dtype))


def write_config(run: Path, config: RunConfig, kwargs: dict[str, Any]) -> None:
    write_json(run / CONFIG, {"config": config.to_dict(), "model_kwargs": kwargs, "dim": DIM})


def read_run(run: str | Path) -> tuple[RunConfig, dict[str, Any]]:
    """The config and builder kwargs saved in run directory ``run``."""
    run = Path(run)
    if not run.is_dir():
        raise CheckpointError(f"run directory {run} does not exist")
    saved = read_json(run / CONFIG, "not an impflow run directory?")
    try:
        return RunConfig.from_dict(saved["config"], source=str(run / CONFIG)), dict(saved["model_kwargs"])
    except (KeyError, TypeError):
        raise CheckpointError(f"{run / CONFIG} is not an impflow run config") from None


def refresh_spectral(model: torch.nn.Module) -> None:
    """Bring every spectral-norm estimate up to date with its weight now (the refinement the next
    forward pass would do), so that a checkpoint holds u, v that match its weights."""
    with torch.no_grad():
        for layer in model.modules():
            if hasattr(layer, "mark_current"):  # spectrally normalised layers
                layer.sigma()


def load_model_state(model: torch.nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load a checkpoint's weights and buffers into ``model``.

    The saved spectral-norm vectors were refreshed for the saved weights (:func:`refresh_spectral`),
    so copying the weights in must not trigger another refinement: the layers are marked
    current, which makes a resumed run continue bit for bit.
    """
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise CheckpointError(f"checkpoint {source} does not fit the model in its config: {detail}") from None
    for layer in model.modules():
        if hasattr(layer, "mark_current"):
            layer.mark_current()


def load(
    run: str | Path,
    map_location: str | torch.device | None = None,
    *,
    device: str | torch.device | None = None,
    which: str = "best",
) -> Flow:
    """The trained Flow of run directory ``run`` (checkpoint ``which``: ``best`` or ``last``) in eval mode,
    on ``device`` (alias ``map_location``; default cpu; ``"auto"`` picks cuda when available). The
    global RNG is left untouched."""
    config, kwargs = read_run(run)
    with torch.random.fork_rng(devices=[]):
        flow = build_model(config, kwargs)
    target = resolve_device(str(device if device is not None else map_location if map_location is not None else "cpu"))
    flow.to(target)
    load_model_state(flow, load_weights(run, which, target), str(pointer(run, which)["dir"]))
    return flow.eval()


@torch.no_grad()
def evaluate(flow: Flow, x: Tensor, chunk_size: int = 4096) -> dict[str, Any]:
    """Mean NLL (nats per example) of ``x`` with exact log-dets, its standard error, and the solver
    statistics of the pass. Convergence warnings are counted, not printed."""
    monitor, counter, infos = SolverMonitor(flow), WarningCounter(), []
    was_training = flow.training
    flow.eval()
    try:
        with exact_logdet(), counter.catch():
            parts = []
            for chunk in x.split(chunk_size):
                monitor.reset()
                parts.append(-flow.log_prob(chunk))
                infos += monitor.collect()
    finally:
        flow.train(was_training)
    nll = torch.cat(parts).double()
    n = nll.numel()
    return {
        "nll": nll.mean().item(),
        "nll_se": nll.std().item() / math.sqrt(n) if n > 1 else float("nan"),
        "n": n,
        "solver": summarize_solves(infos) | {"convergence_warnings": counter.count},
    }


def baselines(config: RunConfig, test: Tensor) -> dict[str, float | None]:
    """The floors a model's test NLL is compared with (nats): the true entropy (None when unknown)
    and the held-out NLL of the best affine flow (the ML Gaussian of training samples)."""
    gauss = theory.gaussian_nll(dataset(config, "baseline", _BASELINE_TRAIN), test)
    return {
        "entropy": toy2d.entropy(config.data),
        "gaussian_nll": gauss["test_nll"],
        "gaussian_nll_se": gauss["test_nll_se"],
    }


def _with_bits(d: dict[str, float | None]) -> dict[str, float | None]:
    """Each value followed by ``<key>_bits`` = value / ln 2."""
    out: dict[str, float | None] = {}
    for k, v in d.items():
        out[k], out[f"{k}_bits"] = v, None if v is None else v / _LN2
    return out


def evaluate_run(
    run: str | Path, which: str = "best", n: int = 20000, device: str | torch.device | None = None
) -> dict[str, Any]:
    """The JSON report of ``impflow eval``: test NLL (nats and bits per example, with standard
    errors) on ``n`` fresh held-out points, the entropy and Gaussian baselines and the gaps to
    them, parameter count, solver statistics and timings."""
    config, kwargs = read_run(run)
    ptr = pointer(run, which)
    flow = load(run, device=device, which=which)
    test = dataset(config, "test", n).to(next(flow.parameters()).device)
    start = time.perf_counter()
    result = evaluate(flow, test)
    seconds = time.perf_counter() - start
    base = baselines(config, test.cpu())
    nll = {"test_nll": result["nll"], "test_nll_se": result["nll_se"]}
    gaps = {
        "gap_to_entropy": None if base["entropy"] is None else result["nll"] - base["entropy"],
        "gap_to_gaussian": result["nll"] - base["gaussian_nll"],
    }
    return {
        "run": str(run),
        "checkpoint": which,
        "step": ptr["step"],
        "data": config.data,
        "model": config.model,
        "model_kwargs": kwargs,
        "dtype": config.dtype,
        "n_test": result["n"],
        "units": "nats per example; *_bits = nats / ln 2",
        **_with_bits(nll | base | gaps),
        "params": sum(p.numel() for p in flow.parameters()),
        "solver": result["solver"],
        "eval_seconds": seconds,
        "train_seconds": ptr.get("train_seconds"),
    }


def _draw(flow: Flow, n: int, seed: int) -> Tensor:
    generator = torch.Generator(device=next(flow.parameters()).device).manual_seed(seed)
    return flow.sample(n, generator=generator).cpu()


def sample_run(
    run: str | Path, n: int, seed: int = 0, which: str = "best", device: str | torch.device | None = None
) -> Tensor:
    """n samples (CPU tensor (n, 2)) from run ``run``, reproducible by ``seed``."""
    return _draw(load(run, device=device, which=which), n, seed)


def plot_run(run: str | Path, which: str = "best", device: str | torch.device | None = None) -> dict[str, Path]:
    """PNGs in ``run/plots``: the learned density (exact log-det), samples beside data, the training
    curve with the entropy and Gaussian baseline, and the true density where known; and, when the
    history has volume-monitor records, ``run/plots/diagnostics/volume.png`` (per-block log-dets
    and Lipschitz estimates, :func:`impflow.plots.plot_volume`). Returns the paths."""
    from .. import plots  # matplotlib only when plotting

    run = Path(run)
    config, _ = read_run(run)
    step = pointer(run, which)["step"]
    data = dataset(config, "test", _PLOT_POINTS)
    lo, hi = data.min().item(), data.max().item()
    bounds = (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    out = run / "plots"
    title = f"{config.model} on {config.data}, step {step}"
    flow = load(run, device=device, which=which)
    paths = {
        "density": plots.plot_density(flow, out / "density.png", bounds, title=title, context=exact_logdet),
        "samples": plots.plot_samples(_draw(flow, _PLOT_POINTS, seed=0), data, out / "samples.png"),
    }
    history = read_json(run / HISTORY, "training history") if (run / HISTORY).is_file() else []
    if history:
        base = baselines(config, data)
        reference = {"Gaussian (best affine flow)": base["gaussian_nll"]}
        if base["entropy"] is not None:
            reference["entropy"] = base["entropy"]
        paths["training_curve"] = plots.plot_training_curve(history, out / "training_curve.png", reference, title)
        if any(isinstance(r.get("volume"), dict) and "blocks" in r["volume"] for r in history):
            # a subfolder: plots/*.png stays the fixed set of run plots
            paths["volume"] = plots.plot_volume(history, out / "diagnostics" / "volume.png", title=title)
    if config.data in toy2d.EXACT_DENSITY:
        paths["true_density"] = plots.plot_true_density(config.data, out / "true_density.png", bounds)
    return paths
