"""Runs on disk: the model and data of a :class:`RunConfig`, and loading, evaluating, sampling and
plotting a trained run.

Data (``config.data``, see :func:`impflow.config.data_kind`):

- a 2-D toy density: fresh seeded samples per stream (train/val/test/baseline);
- a UCI set (``load_tabular(name, config.data_root)``) or a ``.npy``/``.csv`` file
  (``from_array(path)``, shuffled with seed 0, split 80/10/10, standardised with the training
  statistics): the fixed train/validation/test splits; training batches are drawn with
  replacement from the training split (its first ``train_size`` rows when ``train_size`` > 0);
- ``digits``: scikit-learn's 8x8 digits as 64-D vectors x = (x_int + u)/17, u ~ U[0, 1)^64 drawn
  afresh for every training batch (once, seeded, for the validation/test/baseline sets). The
  validation set is the last 10% of the training images. NLLs are of this continuous density
  on [0, 1)^64; ``impflow eval`` adds the dequantization term 64·ln 17 for the discrete NLL bound
  and bits/dim.

Evaluation always uses exact log-determinants (:func:`impflow.exact_logdet`): one backward pass
per dimension, so above ~64 dimensions it becomes the dominant cost (kept exact for now).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import theory
from ..checkpoint import CONFIG, HISTORY, CheckpointError, load_weights, pointer, read_json, write_json
from ..config import ConfigError, RunConfig, data_kind, model_builder, model_kwargs
from ..data import toy2d
from ..data.arrays import from_array
from ..data.images import dequantize, load_digits
from ..data.tabular import load_tabular
from ..flow import Flow
from ..logdet import exact_logdet
from .monitor import SolverMonitor, WarningCounter, summarize_solves

__all__ = [
    "DIM",
    "RunData",
    "run_data",
    "data_dim",
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

_DIGITS_VAL_FRACTION = 0.1

_STREAMS = {"train": 0, "val": 1, "test": 2, "baseline": 3}
_LN2 = math.log(2.0)
_BASELINE_TRAIN = 100_000
_PLOT_POINTS = 5000


def stream_seed(seed: int, stream: str) -> int:
    """Independent seeds for the train/val/test/baseline data of run seed ``seed``."""
    return int(np.random.SeedSequence([seed, _STREAMS[stream]]).generate_state(1, np.uint64)[0] >> 1)


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


@dataclass(frozen=True)
class RunData:
    """The fixed splits of a non-toy dataset: float tensors (N, D) (``levels`` is None) or, for
    images, their integer levels as float (N, D) to be dequantized by (x + u)/levels."""

    name: str
    train: Tensor
    val: Tensor
    test: Tensor
    levels: int | None = None

    @property
    def dim(self) -> int:
        return self.train.shape[1]


_CACHE: dict[tuple[Any, ...], RunData] = {}


def _file_key(path: Path) -> tuple[Any, ...]:
    try:
        stat = path.stat()
    except OSError:
        return (str(path),)
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def _load_data(config: RunConfig) -> RunData:
    kind = data_kind(config.data)
    try:
        if kind == "tabular":
            d = load_tabular(config.data, config.data_root)
            return RunData(d.name, d.train, d.val, d.test)
        if kind == "array":
            d = from_array(config.data)
            if min(len(d.train), len(d.val), len(d.test)) < 2:
                raise ValueError(
                    f"{config.data}: too few rows ({len(d.train)}/{len(d.val)}/{len(d.test)} train/val/test) "
                    "for training and evaluation"
                )
            return RunData(d.name, d.train, d.val, d.test)
        images = load_digits()
        train = images.train_images.flatten(1).to(torch.float32)
        n_val = int(_DIGITS_VAL_FRACTION * len(train))
        test = images.test_images.flatten(1).to(torch.float32)
        return RunData(images.name, train[:-n_val], train[-n_val:], test, levels=images.levels)
    except FileNotFoundError as e:
        raise ConfigError(str(e).splitlines()[0] if str(e) else f"data file for {config.data!r} not found") from None
    except (ValueError, OSError, ImportError) as e:
        raise ConfigError(f"cannot load dataset {config.data!r}: {' '.join(str(e).split())}") from None


def run_data(config: RunConfig) -> RunData | None:
    """The splits of ``config.data`` (cached per file version), or None for a 2-D toy density.

    Raises ConfigError (one line, naming the path) when a file is missing or unreadable."""
    kind = data_kind(config.data)
    if kind == "toy":
        return None
    if kind == "tabular":
        key: tuple[Any, ...] = (kind, config.data, _file_key(Path(config.data_root or ".")))
        root = Path(config.data_root or ".")
        key += tuple(_file_key(p) for p in sorted(root.glob(f"{config.data}/*"))) if root.is_dir() else ()
        key += tuple(_file_key(p) for p in sorted(root.glob("BSDS300/*"))) if config.data == "bsds300" else ()
    elif kind == "array":
        key = (kind, _file_key(Path(config.data)))
    else:
        key = (kind, config.data)
    if key not in _CACHE:
        if len(_CACHE) >= 4:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = _load_data(config)
    return _CACHE[key]


def data_dim(config: RunConfig) -> int:
    """The dimension of the run's data (2 for the toys; loads the data otherwise)."""
    data = run_data(config)
    return DIM if data is None else data.dim


def _dequantized(x: Tensor, levels: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    return dequantize(x, levels, generator=generator).to(dtype)


def dataset(config: RunConfig, stream: str, n: int) -> Tensor:
    """n points of the run's dataset from stream ``stream`` (CPU, the run's dtype).

    For fixed-split data: ``train`` -> the first n training rows (all when n is 0), ``val`` /
    ``test`` -> the first n rows of that split (all when n is 0 or larger), ``baseline`` -> the
    whole training split; images are dequantized once with the stream's seed."""
    dtype = torch_dtype(config.dtype)
    data = run_data(config)
    if data is None:
        return toy2d.sample(config.data, n, seed=stream_seed(config.seed, stream), dtype=dtype)
    x = {"train": data.train, "val": data.val, "test": data.test, "baseline": data.train}[stream]
    if stream != "baseline" and n:
        x = x[:n]
    if data.levels is not None:
        generator = torch.Generator().manual_seed(stream_seed(config.seed, stream))
        return _dequantized(x, data.levels, generator, dtype)
    return x.to(dtype)


def train_pool(config: RunConfig) -> Tensor | None:
    """What training batches are drawn from with replacement (None: fresh toy samples): the
    training split (first ``train_size`` rows if set), undequantized for images."""
    data = run_data(config)
    if data is None:
        return dataset(config, "train", config.train_size) if config.train_size else None
    pool = data.train[: config.train_size] if config.train_size else data.train
    return pool if data.levels is not None else pool.to(torch_dtype(config.dtype))


def draw_batch(config: RunConfig, pool: Tensor | None, n: int, generator: torch.Generator) -> Tensor:
    """A training batch of n points (CPU) drawn with ``generator``: rows of ``pool`` (dequantized
    afresh for images) or fresh toy samples."""
    dtype = torch_dtype(config.dtype)
    if pool is None:
        return toy2d.sample(config.data, n, generator=generator, dtype=dtype)
    x = pool[torch.randint(pool.shape[0], (n,), generator=generator)]
    data = run_data(config)
    if data is not None and data.levels is not None:
        x = _dequantized(x, data.levels, generator, dtype)
    return x


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


def build_model(config: RunConfig, kwargs: dict[str, Any] | None = None, dim: int | None = None) -> Flow:
    """The untrained Flow of ``config`` (builder kwargs from :func:`model_kwargs` unless given) on
    ``dim``-D data (default: the dimension of the run's data)."""
    kwargs = model_kwargs(config) if kwargs is None else kwargs
    dim = data_dim(config) if dim is None else dim
    try:
        flow = model_builder(config.model)(dim=dim, **kwargs)
    except ValueError as e:
        raise ConfigError(f"cannot build model {config.model!r}: {e}") from None
    return flow.to(torch_dtype(config.dtype))


def write_config(run: Path, config: RunConfig, kwargs: dict[str, Any], dim: int | None = None) -> None:
    dim = data_dim(config) if dim is None else dim
    write_json(run / CONFIG, {"config": config.to_dict(), "model_kwargs": kwargs, "dim": dim})


def saved_dim(run: str | Path) -> int:
    """The data dimension recorded in run ``run`` (2 for runs written before it was recorded)."""
    saved = read_json(Path(run) / CONFIG, "not an impflow run directory?")
    dim = saved.get("dim", DIM) if isinstance(saved, dict) else DIM
    return int(dim) if isinstance(dim, int) else DIM


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
        flow = build_model(config, kwargs, dim=saved_dim(run))
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
    """The floors a model's test NLL is compared with (nats): the true entropy (None when unknown:
    every non-toy dataset) and the held-out NLL of the best affine flow (the ML Gaussian of
    training samples; the whole training split for fixed-split data)."""
    gauss = theory.gaussian_nll(dataset(config, "baseline", _BASELINE_TRAIN), test)
    return {
        "entropy": toy2d.entropy(config.data) if data_kind(config.data) == "toy" else None,
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
    errors) on ``n`` fresh held-out points (toy data) or on the whole test split (fixed-split
    data; ``n`` is ignored), the entropy and Gaussian baselines and the gaps to them, parameter
    count, solver statistics and timings. For images (digits) also the dequantization term
    D·ln K and ``bits_per_dim`` = (NLL + D·ln K)/(D·ln 2), an upper bound on the discrete NLL,
    with the Gaussian baseline's likewise."""
    config, kwargs = read_run(run)
    ptr = pointer(run, which)
    flow = load(run, device=device, which=which)
    fixed = run_data(config)
    test = dataset(config, "test", 0 if fixed is not None else n).to(next(flow.parameters()).device)
    start = time.perf_counter()
    result = evaluate(flow, test)
    seconds = time.perf_counter() - start
    base = baselines(config, test.cpu())
    nll = {"test_nll": result["nll"], "test_nll_se": result["nll_se"]}
    gaps = {
        "gap_to_entropy": None if base["entropy"] is None else result["nll"] - base["entropy"],
        "gap_to_gaussian": result["nll"] - base["gaussian_nll"],
    }
    images: dict[str, Any] = {}
    if fixed is not None and fixed.levels is not None:
        dim, levels = fixed.dim, fixed.levels
        term = dim * math.log(levels)
        scale = dim * _LN2
        images = {
            "dequantization_nats": term,
            "bits_per_dim": (result["nll"] + term) / scale,
            "bits_per_dim_se": result["nll_se"] / scale,
            "gaussian_bits_per_dim": (base["gaussian_nll"] + term) / scale,
            "bits_per_dim_note": f"(test_nll + {dim}*ln {levels}) / ({dim}*ln 2): test_nll is of the "
            f"dequantized (x + u)/{levels} in [0, 1)^{dim}",
        }
    return {
        "run": str(run),
        "checkpoint": which,
        "step": ptr["step"],
        "data": config.data,
        "data_root": config.data_root,
        "dim": test.shape[1],
        "test_split": "fresh samples" if fixed is None else "the whole test split",
        "model": config.model,
        "model_kwargs": kwargs,
        "dtype": config.dtype,
        "n_test": result["n"],
        "units": "nats per example; *_bits = nats / ln 2",
        **_with_bits(nll | base | gaps),
        **images,
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
    """n samples (CPU tensor (n, D)) from run ``run``, reproducible by ``seed`` (for fixed-split
    data in the standardised / dequantized space the model was trained in)."""
    return _draw(load(run, device=device, which=which), n, seed)


def plot_run(run: str | Path, which: str = "best", device: str | torch.device | None = None) -> dict[str, Path]:
    """PNGs in ``run/plots``: the learned density (exact log-det) and samples beside data (2-D data
    only), the training curve with the entropy and Gaussian baseline, and the true density where
    known; and, when the
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
    name = config.data if data_kind(config.data) != "array" else Path(config.data).name
    title = f"{config.model} on {name}, step {step}"
    paths: dict[str, Path] = {}
    if data.shape[1] == DIM:  # density and sample plots are 2-D only
        flow = load(run, device=device, which=which)
        paths["density"] = plots.plot_density(flow, out / "density.png", bounds, title=title, context=exact_logdet)
        paths["samples"] = plots.plot_samples(_draw(flow, _PLOT_POINTS, seed=0), data, out / "samples.png")
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
