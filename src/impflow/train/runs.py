"""Runs on disk: the model and data of a :class:`RunConfig`, and loading, evaluating, sampling and
plotting a trained run.

Data (``config.data``, see :func:`impflow.config.data_kind`):

- a 2-D toy density: fresh seeded samples per stream (train/val/test/baseline);
- a UCI set (``load_tabular(name, config.data_root)``) or a ``.npy``/``.csv`` file
  (``from_array(path)``, shuffled with seed 0, split 80/10/10, standardised with the training
  statistics): the fixed train/validation/test splits; training batches are drawn with
  replacement from the training split (its first ``train_size`` rows when ``train_size`` > 0);
- images (``digits``; ``mnist``, ``cifar10`` from ``data_root``, :func:`impflow.data.load_images`):
  the validation set is the last 10% of the training images. Density runs see
  x = (x_int + u)/K, u ~ U[0, 1)^D drawn afresh for every training batch (once, seeded, for the
  validation/test/baseline sets), either as D-vectors (layout ``vector``) or as (C, H, W) images
  whose flow starts with the logit preprocessing (layout ``image``,
  :func:`impflow.config.layout`). Either way the NLL is that of the continuous density on
  [0, 1)^D (the logit's log-det is inside the flow), and ``impflow eval`` adds the
  dequantization term D·ln K for the discrete NLL bound and bits/dim. Classify runs see
  x_int/(K − 1) with the labels (CIFAR-10 training batches flipped left-right with probability ½).

Evaluation log-determinants (:func:`evaluate`): exact (:func:`impflow.exact_logdet`, one backward
pass per dimension) up to :data:`EXACT_EVAL_MAX_DIM` dimensions, above it the unbiased
Russian-roulette estimator, repeated with seeded noise and reported with its standard error.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import theory
from ..checkpoint import CONFIG, HISTORY, CheckpointError, load_weights, pointer, read_json, write_json
from ..config import ConfigError, RunConfig, data_kind, layout, logit_alpha, model_builder, model_kwargs
from ..data import toy2d
from ..data.arrays import from_array
from ..data.images import dequantize, load_images, random_hflip
from ..data.tabular import load_tabular
from ..flow import Flow
from ..logdet import exact_logdet
from ..transforms.base import Compose, Transform
from ..transforms.elementwise import Logit
from ..transforms.residual import ResidualBlock
from .monitor import SolverMonitor, WarningCounter, summarize_solves

__all__ = [
    "DIM",
    "EXACT_EVAL_MAX_DIM",
    "RunData",
    "run_data",
    "data_dim",
    "data_spec",
    "stream_seed",
    "dataset",
    "labelled",
    "torch_dtype",
    "resolve_device",
    "build_model",
    "write_config",
    "read_run",
    "saved_spec",
    "refresh_spectral",
    "load_model_state",
    "load",
    "logdet_method",
    "evaluate",
    "evaluate_classifier",
    "baselines",
    "evaluate_run",
    "sample_run",
    "standardization",
    "saved_image_shape",
    "plot_run",
    "plot_image_grid",
    "image_shape",
]

DIM = 2
"""Dimension of the toy datasets."""

EXACT_EVAL_MAX_DIM = 64
"""Evaluation uses exact log-determinants up to this many dimensions per example, the unbiased
estimator above (where one backward pass per dimension would dominate the cost)."""

_VAL_FRACTION = 0.1

_STREAMS = {"train": 0, "val": 1, "test": 2, "baseline": 3, "eval": 4}
_LN2 = math.log(2.0)
_BASELINE_TRAIN = 100_000
_PLOT_POINTS = 5000
_GRID = 64  # images in a sample grid


def stream_seed(seed: int, stream: str) -> int:
    """Independent seeds for the train/val/test/baseline data (and evaluation noise) of run seed ``seed``."""
    return int(np.random.SeedSequence([seed, _STREAMS[stream]]).generate_state(1, np.uint64)[0] >> 1)


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


@dataclass(frozen=True)
class RunData:
    """The fixed splits of a non-toy dataset: float tensors (N, D), or for images their integer
    levels (uint8, (N, C, H, W) or flattened (N, D)) with ``levels`` K and, for classify runs,
    the labels. ``mean``, ``std``: the standardisation z = (x − mean)/std of tabular and array
    data (float64 (D,), from the training split)."""

    name: str
    train: Tensor
    val: Tensor
    test: Tensor
    levels: int | None = None
    train_labels: Tensor | None = None
    val_labels: Tensor | None = None
    test_labels: Tensor | None = None
    num_classes: int | None = None
    hflip: bool = False
    image_shape: tuple[int, ...] | None = None
    mean: Tensor | None = None
    std: Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one example: (D,) or (C, H, W)."""
        return tuple(self.train.shape[1:])

    @property
    def dim(self) -> int:
        return math.prod(self.shape)


_CACHE: dict[tuple[Any, ...], RunData] = {}


def _file_key(path: Path) -> tuple[Any, ...]:
    try:
        stat = path.stat()
    except OSError:
        return (str(path),)
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def _image_data(config: RunConfig) -> RunData:
    images = load_images(config.data, config.data_root)
    flat = layout(config) == "vector"
    train, test = images.train_images, images.test_images
    if flat:
        train, test = train.flatten(1), test.flatten(1)
    n_val = max(1, int(_VAL_FRACTION * len(train)))
    labels = images.train_labels
    return RunData(
        images.name, train[:-n_val], train[-n_val:], test, levels=images.levels,
        train_labels=labels[:-n_val], val_labels=labels[-n_val:], test_labels=images.test_labels,
        num_classes=int(torch.cat([labels, images.test_labels]).max()) + 1, hflip=images.flip_train,
        image_shape=images.shape,
    )


def _load_data(config: RunConfig) -> RunData:
    kind = data_kind(config.data)
    try:
        if kind == "tabular":
            d = load_tabular(config.data, config.data_root)
            return RunData(d.name, d.train, d.val, d.test, mean=d.mean, std=d.std)
        if kind == "array":
            d = from_array(config.data)
            if min(len(d.train), len(d.val), len(d.test)) < 2:
                raise ValueError(
                    f"{config.data}: too few rows ({len(d.train)}/{len(d.val)}/{len(d.test)} train/val/test) "
                    "for training and evaluation"
                )
            return RunData(d.name, d.train, d.val, d.test, mean=d.mean, std=d.std)
        return _image_data(config)
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
    root = Path(config.data_root or ".")
    if kind == "tabular":
        key: tuple[Any, ...] = (kind, config.data, _file_key(root))
        key += tuple(_file_key(p) for p in sorted(root.glob(f"{config.data}/*"))) if root.is_dir() else ()
        key += tuple(_file_key(p) for p in sorted(root.glob("BSDS300/*"))) if config.data == "bsds300" else ()
    elif kind == "array":
        key = (kind, _file_key(Path(config.data)))
    else:
        key = (kind, config.data, layout(config) == "vector", _file_key(root) if config.data_root else None)
    if key not in _CACHE:
        if len(_CACHE) >= 4:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = _load_data(config)
    return _CACHE[key]


def data_dim(config: RunConfig) -> int:
    """The dimension of the run's data (2 for the toys; loads the data otherwise)."""
    data = run_data(config)
    return DIM if data is None else data.dim


def data_spec(config: RunConfig) -> dict[str, Any]:
    """What the model is built for (saved in ``config.json``): ``shape`` of one example, and
    ``logit_alpha`` (image layout) or ``num_classes`` (classify); ``image_shape`` (C, H, W) of image
    data in either layout; ``standardization`` {mean, std} of tabular and array data. With these a
    saved run samples without its data files."""
    data = run_data(config)
    spec: dict[str, Any] = {"shape": [DIM] if data is None else list(data.shape)}
    if data is not None and data.image_shape is not None:
        spec["image_shape"] = list(data.image_shape)
    if data is not None and data.mean is not None and data.std is not None:
        spec["standardization"] = {"mean": data.mean.tolist(), "std": data.std.tolist()}
    if config.task == "classify":
        assert data is not None and data.num_classes is not None
        spec["num_classes"] = data.num_classes
    elif layout(config) == "image":
        spec["logit_alpha"] = logit_alpha(config)
    return spec


def _dequantized(x: Tensor, levels: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    return dequantize(x, levels, generator=generator).to(dtype)


def _scaled(x: Tensor, levels: int, dtype: torch.dtype) -> Tensor:
    """Classifier inputs: integer levels mapped to [0, 1] by x/(K − 1)."""
    return x.to(dtype) / (levels - 1)


def dataset(config: RunConfig, stream: str, n: int) -> Tensor:
    """n points of the run's dataset from stream ``stream`` (CPU, the run's dtype).

    For fixed-split data: ``train`` -> the first n training rows (all when n is 0), ``val`` /
    ``test`` -> the first n rows of that split (all when n is 0 or larger), ``baseline`` -> the
    whole training split; images are dequantized once with the stream's seed (classify runs:
    scaled to [0, 1], see :func:`labelled` for the labels)."""
    dtype = torch_dtype(config.dtype)
    data = run_data(config)
    if data is None:
        return toy2d.sample(config.data, n, seed=stream_seed(config.seed, stream), dtype=dtype)
    x = {"train": data.train, "val": data.val, "test": data.test, "baseline": data.train}[stream]
    if stream != "baseline" and n:
        x = x[:n]
    if data.levels is not None:
        if config.task == "classify":
            return _scaled(x, data.levels, dtype)
        generator = torch.Generator().manual_seed(stream_seed(config.seed, stream))
        return _dequantized(x, data.levels, generator, dtype)
    return x.to(dtype)


def labelled(config: RunConfig, stream: str, n: int) -> tuple[Tensor, Tensor]:
    """(x, labels) of a classify run's split ``stream`` (``train``, ``val`` or ``test``; first n, all for 0)."""
    data = run_data(config)
    if data is None or data.train_labels is None:
        raise ConfigError(f"dataset {config.data!r} has no labels")
    labels = {"train": data.train_labels, "val": data.val_labels, "test": data.test_labels}[stream]
    assert labels is not None
    return dataset(config, stream, n), labels[:n] if n else labels


def train_pool(config: RunConfig) -> Any:
    """What training batches are drawn from with replacement (None: fresh toy samples): the
    training split (first ``train_size`` rows if set), undequantized for images, with the
    labels for classify runs."""
    data = run_data(config)
    if data is None:
        return dataset(config, "train", config.train_size) if config.train_size else None
    pool = data.train[: config.train_size] if config.train_size else data.train
    if config.task == "classify":
        assert data.train_labels is not None
        return pool, data.train_labels[: len(pool)]
    return pool if data.levels is not None else pool.to(torch_dtype(config.dtype))


def draw_batch(config: RunConfig, pool: Any, n: int, generator: torch.Generator) -> Any:
    """A training batch of n points (CPU) drawn with ``generator``: rows of ``pool`` (dequantized
    afresh for images) or fresh toy samples; classify runs: (x, labels)."""
    dtype = torch_dtype(config.dtype)
    if pool is None:
        return toy2d.sample(config.data, n, generator=generator, dtype=dtype)
    data = run_data(config)
    if config.task == "classify":
        assert data is not None and data.levels is not None
        images, labels = pool
        idx = torch.randint(images.shape[0], (n,), generator=generator)
        x = _scaled(images[idx], data.levels, dtype)
        return (random_hflip(x, generator) if data.hflip else x), labels[idx]
    x = pool[torch.randint(pool.shape[0], (n,), generator=generator)]
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


class _Flatten(Transform):
    """(B, C, H, W) -> (B, C·H·W), log-det 0: lets a vector-only flow (nsf, maf) model images."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x.flatten(1), x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        return z.reshape(z.shape[0], *self.shape)

    def inverse_and_log_det(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.inverse(z), z.new_zeros(z.shape[0])


def _image_flow(builder: Any, shape: tuple[int, ...], alpha: float, kwargs: dict[str, Any]) -> Flow:
    """Logit(α) followed by the builder's image form (``shape=``), or by its vector form on the
    flattened logits when it has none."""
    import inspect

    if "shape" in inspect.signature(builder).parameters:
        inner = builder(shape=shape, **kwargs)
        layers: list[Transform] = [Logit(alpha), inner.transform]
    else:
        inner = builder(dim=math.prod(shape), **kwargs)
        layers = [Logit(alpha), _Flatten(shape), inner.transform]
    return Flow(Compose(layers), base=inner.base, event_shape=shape)


def build_model(
    config: RunConfig, kwargs: dict[str, Any] | None = None, spec: dict[str, Any] | None = None
) -> torch.nn.Module:
    """The untrained model of ``config``: a :class:`Flow` (density runs) or a
    :class:`~impflow.models.LipschitzClassifier` (classify runs); builder kwargs from
    :func:`model_kwargs` unless given, data description ``spec`` from :func:`data_spec` unless
    given (``{"shape": [...], "logit_alpha": α}`` for an image-layout flow)."""
    kwargs = model_kwargs(config) if kwargs is None else kwargs
    spec = data_spec(config) if spec is None else spec
    shape = tuple(spec["shape"])
    builder = model_builder(config.model, config.task)
    try:
        if config.task == "classify":
            model = builder(in_shape=shape, num_classes=spec["num_classes"], **kwargs)
        elif spec.get("logit_alpha") is not None:
            model = _image_flow(builder, shape, spec["logit_alpha"], kwargs)
        else:
            model = builder(dim=math.prod(shape), **kwargs)
    except ValueError as e:
        raise ConfigError(f"cannot build model {config.model!r}: {' '.join(str(e).split())}") from None
    return model.to(torch_dtype(config.dtype))


def write_config(run: Path, config: RunConfig, kwargs: dict[str, Any], spec: dict[str, Any] | None = None) -> None:
    spec = data_spec(config) if spec is None else spec
    write_json(run / CONFIG, {"config": config.to_dict(), "model_kwargs": kwargs, "dim": math.prod(spec["shape"]),
                              "data_spec": spec})


def saved_spec(run: str | Path) -> dict[str, Any]:
    """The data description recorded in run ``run`` (runs written before it was recorded: their
    ``dim``, or 2)."""
    saved = read_json(Path(run) / CONFIG, "not an impflow run directory?")
    if isinstance(saved, dict) and isinstance(saved.get("data_spec"), dict) and "shape" in saved["data_spec"]:
        return dict(saved["data_spec"])
    dim = saved.get("dim", DIM) if isinstance(saved, dict) else DIM
    return {"shape": [int(dim) if isinstance(dim, int) else DIM]}


def saved_dim(run: str | Path) -> int:
    """The data dimension recorded in run ``run`` (2 for runs written before it was recorded)."""
    return math.prod(saved_spec(run)["shape"])


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
) -> torch.nn.Module:
    """The trained model of run directory ``run`` (checkpoint ``which``: ``best`` or ``last``) in
    eval mode: a :class:`Flow`, or for ``--task classify`` runs the
    :class:`~impflow.models.LipschitzClassifier` (``model(x)`` gives logits); on ``device`` (alias
    ``map_location``; default cpu; ``"auto"`` picks cuda when available). The global RNG is left
    untouched."""
    config, kwargs = read_run(run)
    with torch.random.fork_rng(devices=[]):
        model = build_model(config, kwargs, saved_spec(run))
    target = resolve_device(str(device if device is not None else map_location if map_location is not None else "cpu"))
    model.to(target)
    load_model_state(model, load_weights(run, which, target), str(pointer(run, which)["dir"]))
    return model.eval()


def logdet_method(flow: torch.nn.Module, requested: str = "auto") -> str:
    """How :func:`evaluate` computes the log-determinants of ``flow``: ``"closed-form"`` when it has
    no residual/implicit blocks (couplings, ActNorm, ...: exact by construction), else ``requested``
    (``"exact"`` or ``"unbiased"``), or for ``"auto"`` exact up to :data:`EXACT_EVAL_MAX_DIM`
    dimensions per example and unbiased above."""
    if requested not in ("auto", "exact", "unbiased"):
        raise ConfigError(f"unknown evaluation log-det {requested!r}; valid: auto, exact, unbiased")
    if not any(isinstance(m, ResidualBlock) for m in flow.modules()):
        return "closed-form"
    if requested != "auto":
        return requested
    shape = getattr(flow, "event_shape", None)
    return "exact" if shape is not None and math.prod(shape) <= EXACT_EVAL_MAX_DIM else "unbiased"


@contextmanager
def _unbiased(flow: torch.nn.Module) -> Iterator[None]:
    """Every residual block of ``flow`` uses the unbiased estimator (its own roulette settings)."""
    blocks = [m for m in flow.modules() if isinstance(m, ResidualBlock)]
    saved = [b.logdet for b in blocks]
    try:
        for b in blocks:
            b.logdet = dataclasses.replace(b.logdet, mode="unbiased")
        yield
    finally:
        for b, cfg in zip(blocks, saved):
            b.logdet = cfg


def _chunk(flow: torch.nn.Module, method: str) -> int:
    """Examples per forward pass: 4096 for vectors, fewer for images (per-pixel activations, and
    for exact log-dets one backward pass per dimension)."""
    shape = tuple(getattr(flow, "event_shape", (DIM,)))
    if len(shape) == 1:
        return 4096
    d = math.prod(shape)
    return max(4, (2**17 // d**2) if method == "exact" else (2**15 // d))


@torch.no_grad()
def evaluate(
    flow: Flow, x: Tensor, chunk_size: int | None = None, logdet: str = "auto", repeats: int = 1, seed: int = 0
) -> dict[str, Any]:
    """Mean NLL (nats per example) of ``x``, its standard error and the solver statistics.

    Log-determinants by :func:`logdet_method` (``logdet``: auto, exact or unbiased). With the
    unbiased estimator the pass is made ``repeats`` times with noise seeded by ``seed`` (the global
    RNG is left untouched) and the result has ``nll`` = the mean over passes and examples,
    ``nll_se_data`` = std over examples of their pass-averaged values / √n, ``estimator_se`` = std of
    the per-pass means / √repeats (the Monte-Carlo error at fixed data; None for one pass) and
    ``nll_se`` = √(nll_se_data² + estimator_se²). Otherwise ``nll_se`` = std / √n. Convergence
    warnings are counted, not printed."""
    if repeats < 1:
        raise ConfigError(f"repeats must be at least 1, got {repeats}")
    method = logdet_method(flow, logdet)
    chunk_size = chunk_size if chunk_size is not None else _chunk(flow, method)
    monitor, counter, infos = SolverMonitor(flow), WarningCounter(), []
    was_training = flow.training
    flow.eval()

    def one_pass() -> Tensor:
        parts = []
        for chunk in x.split(chunk_size):
            monitor.reset()
            parts.append(-flow.log_prob(chunk))
            infos.extend(monitor.collect())
        return torch.cat(parts).double()

    try:
        with counter.catch():
            if method == "unbiased":
                device = x.device
                with _unbiased(flow), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(seed)
                    passes = torch.stack([one_pass() for _ in range(repeats)])
            else:
                with exact_logdet():
                    passes = one_pass()[None]
    finally:
        flow.train(was_training)
    n = passes.shape[1]
    per_example = passes.mean(0)
    se_data = per_example.std().item() / math.sqrt(n) if n > 1 else float("nan")
    out: dict[str, Any] = {"nll": per_example.mean().item(), "nll_se": se_data, "n": n, "logdet": method}
    if method == "unbiased":
        est = passes.mean(1).std().item() / math.sqrt(repeats) if repeats > 1 else None
        out |= {
            "nll_se": se_data if est is None else math.hypot(se_data, est),
            "nll_se_data": se_data,
            "estimator_se": est,
            "repeats": repeats,
        }
    out["solver"] = summarize_solves(infos) | {"convergence_warnings": counter.count}
    return out


@torch.no_grad()
def evaluate_classifier(model: torch.nn.Module, x: Tensor, labels: Tensor, chunk_size: int = 1024) -> dict[str, Any]:
    """Cross-entropy (nats), error and accuracy (fractions) of ``model`` on (x, labels), the
    binomial standard error of the error, and the ImpFlow blocks' solver statistics."""
    monitor, counter, infos = SolverMonitor(model), WarningCounter(), []
    was_training = model.training
    model.eval()
    loss, wrong = torch.zeros((), dtype=torch.float64), 0
    try:
        with counter.catch():
            for xb, yb in zip(x.split(chunk_size), labels.split(chunk_size)):
                monitor.reset()
                logits = model(xb)
                infos.extend(monitor.collect())
                yb = yb.to(logits.device)
                loss += F.cross_entropy(logits, yb, reduction="sum").double().cpu()
                wrong += int((logits.argmax(1) != yb).sum())
    finally:
        model.train(was_training)
    n = len(labels)
    error = wrong / n
    return {
        "loss": loss.item() / n,
        "error": error,
        "error_se": math.sqrt(error * (1 - error) / n),
        "accuracy": 1 - error,
        "n": n,
        "solver": summarize_solves(infos) | {"convergence_warnings": counter.count},
    }


def baselines(config: RunConfig, test: Tensor, alpha: float | None = None) -> dict[str, float | None]:
    """The floors a model's test NLL is compared with (nats): the true entropy (None when unknown:
    every non-toy dataset) and the held-out NLL of the best affine flow (the ML Gaussian of
    training samples; the whole training split for fixed-split data). With ``alpha``, the run's
    logit α (from its saved spec), also ``logit_gaussian_nll``: the best affine flow after that same
    fixed step, its log-det included (the tighter baseline for such runs)."""
    train = dataset(config, "baseline", _BASELINE_TRAIN)
    gauss = theory.gaussian_nll(train, test)
    out = {
        "entropy": toy2d.entropy(config.data) if data_kind(config.data) == "toy" else None,
        "gaussian_nll": gauss["test_nll"],
        "gaussian_nll_se": gauss["test_nll_se"],
    }
    if alpha is not None:
        logit = Logit(alpha)
        with torch.no_grad():
            (y_train, _), (y_test, ladj) = logit(train.double()), logit(test.double())
        g = theory.gaussian_nll(y_train, y_test, test_ladj=ladj)
        out |= {"logit_gaussian_nll": g["test_nll"], "logit_gaussian_nll_se": g["test_nll_se"]}
    return out


def _with_bits(d: dict[str, float | None]) -> dict[str, float | None]:
    """Each value followed by ``<key>_bits`` = value / ln 2."""
    out: dict[str, float | None] = {}
    for k, v in d.items():
        out[k], out[f"{k}_bits"] = v, None if v is None else v / _LN2
    return out


_LOGDET_NOTES = {
    "exact": "exact log-determinants (dimension <= {max})",
    "closed-form": "closed-form log-determinants (no residual/implicit blocks)",
    "unbiased": "unbiased Russian-roulette estimate (the default above {max} dimensions), {repeats} seeded passes; "
    "test_nll_se = "
    "sqrt(test_nll_se_data^2 + estimator_se^2), estimator_se = std of the pass means / sqrt(passes)",
}


def _classify_report(run: Path, which: str, config: RunConfig, kwargs: dict[str, Any], model: torch.nn.Module,
                     ptr: dict[str, Any]) -> dict[str, Any]:
    device = next(model.parameters()).device
    x, labels = labelled(config, "test", 0)
    start = time.perf_counter()
    result = evaluate_classifier(model, x.to(device), labels)
    seconds = time.perf_counter() - start
    spec = saved_spec(run)
    return {
        "run": str(run),
        "checkpoint": which,
        "step": ptr["step"],
        "task": "classify",
        "data": config.data,
        "data_root": config.data_root,
        "shape": spec["shape"],
        "num_classes": spec.get("num_classes"),
        "test_split": "the whole test split",
        "model": config.model,
        "model_kwargs": kwargs,
        "dtype": config.dtype,
        "n_test": result["n"],
        "units": "test_error and test_accuracy are fractions; test_loss is the cross-entropy in nats",
        "test_error": result["error"],
        "test_error_se": result["error_se"],
        "test_accuracy": result["accuracy"],
        "test_loss": result["loss"],
        "params": sum(p.numel() for p in model.parameters()),
        "solver": result["solver"],
        "eval_seconds": seconds,
        "train_seconds": ptr.get("train_seconds"),
    }


def evaluate_run(
    run: str | Path,
    which: str = "best",
    n: int = 20000,
    device: str | torch.device | None = None,
    logdet: str = "auto",
    repeats: int = 4,
) -> dict[str, Any]:
    """The JSON report of ``impflow eval``.

    Density runs: test NLL (nats and bits per example, with standard errors) on ``n`` fresh
    held-out points (toy data) or on the whole test split (fixed-split data; ``n`` is ignored),
    the entropy and Gaussian baselines and the gaps to them, parameter count, solver statistics
    and timings; ``logdet_eval`` says how the log-determinants were computed (:func:`evaluate`:
    ``logdet`` auto/exact/unbiased, ``repeats`` passes of the unbiased estimator). For images also
    the dequantization term D·ln K and ``bits_per_dim`` = (NLL + D·ln K)/(D·ln 2), an upper bound
    on the discrete NLL that includes the logit preprocessing's log-det (it is inside the flow),
    with the Gaussian baseline's likewise.

    Classify runs: test error, accuracy (fractions, the error with its binomial standard error),
    cross-entropy, parameters, solver statistics."""
    run = Path(run)
    config, kwargs = read_run(run)
    ptr = pointer(run, which)
    model = load(run, device=device, which=which)
    if config.task == "classify":
        return _classify_report(run, which, config, kwargs, model, ptr)
    flow = model
    fixed = run_data(config)
    test = dataset(config, "test", 0 if fixed is not None else n).to(next(flow.parameters()).device)
    start = time.perf_counter()
    result = evaluate(flow, test, logdet=logdet, repeats=repeats, seed=stream_seed(config.seed, "eval"))
    seconds = time.perf_counter() - start
    alpha = saved_spec(run).get("logit_alpha")  # the run's own α: the model's, and its baseline's
    base = baselines(config, test.cpu(), alpha)
    nll = {"test_nll": result["nll"], "test_nll_se": result["nll_se"]}
    gaps = {
        "gap_to_entropy": None if base["entropy"] is None else result["nll"] - base["entropy"],
        "gap_to_gaussian": result["nll"] - base["gaussian_nll"],
    }
    estimator: dict[str, Any] = {}
    if result["logdet"] == "unbiased":
        estimator = {"test_nll_se_data": result["nll_se_data"], "estimator_se": result["estimator_se"],
                     "estimator_passes": result["repeats"]}
    units: dict[str, Any] = {}
    if fixed is not None and fixed.std is not None:
        shift = float(fixed.std.log().sum())
        units = {
            "test_nll_data_units": result["nll"] + shift,
            "test_nll_data_units_bits": (result["nll"] + shift) / _LN2,
            "standardization_note": "test_nll is of the standardised data z = (x - mean)/std (mean, std of the "
            "training split; the convention of the published UCI figures); test_nll_data_units = test_nll + "
            f"sum_d ln std_d (= {shift:.6g}) is the NLL of x in the data file's units",
        }
    images: dict[str, Any] = {}
    if fixed is not None and fixed.levels is not None:
        dim, levels = fixed.dim, fixed.levels
        term = dim * math.log(levels)
        scale = dim * _LN2
        inside = f"; the logit preprocessing (alpha {alpha}) and its log-det are part of the flow" if alpha else ""
        images = {
            "dequantization_nats": term,
            "bits_per_dim": (result["nll"] + term) / scale,
            "bits_per_dim_se": result["nll_se"] / scale,
            "gaussian_bits_per_dim": (base["gaussian_nll"] + term) / scale,
            **({} if base.get("logit_gaussian_nll") is None else {
                "logit_gaussian_bits_per_dim": (base["logit_gaussian_nll"] + term) / scale,
                "gap_to_logit_gaussian_bits_per_dim": (result["nll"] - base["logit_gaussian_nll"]) / scale,
            }),
            "bits_per_dim_note": f"(test_nll + {dim}*ln {levels}) / ({dim}*ln 2): test_nll is of the "
            f"dequantized (x + u)/{levels} in [0, 1)^{dim}{inside}; gaussian_*: the best affine flow of the "
            "dequantized pixels" + ("; logit_gaussian_*: the best affine flow after the run's own logit step "
                                    "(its log-det included), the tighter affine baseline" if alpha else ""),
        }
    return {
        "run": str(run),
        "checkpoint": which,
        "step": ptr["step"],
        "task": "density",
        "data": config.data,
        "data_root": config.data_root,
        "dim": fixed.dim if fixed is not None else test.shape[1],
        "shape": list(test.shape[1:]),
        "test_split": "fresh samples" if fixed is None else "the whole test split",
        "model": config.model,
        "model_kwargs": kwargs,
        "dtype": config.dtype,
        "n_test": result["n"],
        "units": "nats per example; *_bits = nats / ln 2",
        "logdet_eval": result["logdet"],
        "logdet_eval_note": _LOGDET_NOTES[result["logdet"]].format(max=EXACT_EVAL_MAX_DIM, repeats=result.get("repeats"))
        + ("; with 1 pass the estimator's spread is unknown (estimator_se null, test_nll_se counts the data "
           "only): use --repeats 2 or more" if result.get("repeats") == 1 else ""),
        **_with_bits(nll | base | gaps),
        **estimator,
        **units,
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
    run: str | Path,
    n: int,
    seed: int = 0,
    which: str = "best",
    device: str | torch.device | None = None,
    standardized: bool = False,
) -> Tensor:
    """n samples (CPU tensor (n, *shape)) from run ``run``, reproducible by ``seed``.

    Tabular and array data: in the data's own units x = mean + std·z (float64; the training split's
    statistics, saved in the run), or with ``standardized`` the z the model was trained on. Images:
    x ≈ (x_int + u)/K, the dequantized space; with the logit preprocessing they lie in (−a, 1 + a),
    a = α/(1 − 2α), and floor(K·clip(x, 0, 1 − 1/(2K))) are the integer levels."""
    config, _ = read_run(run)
    if config.task == "classify":
        raise ConfigError(f"{run} is a classify run: it has no samples (try impflow eval {run})")
    samples = _draw(load(run, device=device, which=which), n, seed)
    stats = None if standardized else standardization(run)
    if stats is not None:  # float64, as the data were read: a float32 grid could not resolve std ≪ |mean|
        mean, std = stats
        samples = samples.double() * std + mean
    return samples


def standardization(run: str | Path) -> tuple[Tensor, Tensor] | None:
    """(mean, std), float64 (D,), of run ``run``'s standardised data (tabular and array data; None
    otherwise). Runs saved before the spec recorded them read their data."""
    spec = saved_spec(run)
    if "standardization" in spec:
        stats = spec["standardization"]
        return torch.tensor(stats["mean"], dtype=torch.float64), torch.tensor(stats["std"], dtype=torch.float64)
    config, _ = read_run(run)
    if data_kind(config.data) not in ("tabular", "array"):
        return None
    try:
        data = run_data(config)
    except ConfigError as e:
        raise ConfigError(f"{e} (this run predates saved statistics: its data give the units; "
                          "--standardized samples without them)") from None
    return None if data is None or data.mean is None or data.std is None else (data.mean, data.std)


def saved_image_shape(run: str | Path) -> tuple[int, ...] | None:
    """(C, H, W) of run ``run``'s images, whichever layout the model sees; None for other data.
    Runs saved before the spec recorded it read their data."""
    spec = saved_spec(run)
    if "image_shape" in spec:
        return tuple(spec["image_shape"])
    config, _ = read_run(run)
    return image_shape(config) if data_kind(config.data) == "image" else None


def image_shape(config: RunConfig) -> tuple[int, int, int] | None:
    """(C, H, W) of the run's images (whichever layout the model sees), None for other data."""
    data = run_data(config)
    return None if data is None or data.image_shape is None else tuple(data.image_shape)  # type: ignore[return-value]


def plot_image_grid(
    panels: dict[str, Tensor], path: str | Path, title: str | None = None, columns: int = 8
) -> Path:
    """Grids of images side by side: ``panels`` maps a caption to images (N, C, H, W) in [0, 1]
    (values outside are clipped); each panel shows up to ``columns``² of them. Returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5 * len(panels), 4.8))
    for k, (caption, images) in enumerate(panels.items()):
        x = images[: columns * columns].detach().cpu().double().clamp(0, 1)
        b, c, h, w = x.shape
        rows = math.ceil(b / columns)
        grid = torch.ones(c, rows * (h + 1) - 1, columns * (w + 1) - 1, dtype=x.dtype)
        for i in range(b):
            r, q = divmod(i, columns)
            grid[:, r * (h + 1) : r * (h + 1) + h, q * (w + 1) : q * (w + 1) + w] = x[i]
        ax = fig.add_subplot(1, len(panels), k + 1)
        if c == 1:
            ax.imshow(grid[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(caption)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def plot_run(run: str | Path, which: str = "best", device: str | torch.device | None = None) -> dict[str, Path]:
    """PNGs in ``run/plots``: the learned density (exact log-det) and samples beside data (2-D data
    only), a grid of samples beside test images (image data), the training curve with the entropy
    and Gaussian baseline (classify runs: the losses), and the true density where known; and,
    when the history has volume-monitor records, ``run/plots/diagnostics/volume.png`` (per-block
    log-dets and Lipschitz estimates, :func:`impflow.plots.plot_volume`). Returns the paths."""
    from .. import plots  # matplotlib only when plotting

    run = Path(run)
    config, _ = read_run(run)
    step = pointer(run, which)["step"]
    out = run / "plots"
    name = config.data if data_kind(config.data) != "array" else Path(config.data).name
    history = read_json(run / HISTORY, "training history") if (run / HISTORY).is_file() else []
    if config.task == "classify":
        title = f"{config.model}-block classifier on {name}, step {step}"
        if not history:
            return {}
        return {"training_curve": plots.plot_training_curve(history, out / "training_curve.png", None, title)}
    title = f"{config.model} on {name}, step {step}"
    data = dataset(config, "test", _PLOT_POINTS)
    paths: dict[str, Path] = {}
    bounds = (0.0, 1.0)
    if data.dim() == 2 and data.shape[1] == DIM:  # density and sample plots are 2-D only
        lo, hi = data.min().item(), data.max().item()
        bounds = (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
        flow = load(run, device=device, which=which)
        paths["density"] = plots.plot_density(flow, out / "density.png", bounds, title=title, context=exact_logdet)
        paths["samples"] = plots.plot_samples(_draw(flow, _PLOT_POINTS, seed=0), data, out / "samples.png")
    shape = image_shape(config)
    if shape is not None:
        flow = load(run, device=device, which=which)
        samples = _draw(flow, _GRID, seed=0).reshape(-1, *shape)
        paths["samples"] = plot_image_grid(
            {"model samples": samples, "test images": data[:_GRID].reshape(-1, *shape)}, out / "samples.png", title
        )
    if history:
        base = baselines(config, data, saved_spec(run).get("logit_alpha"))
        reference = {"Gaussian (best affine flow)": base["gaussian_nll"]}
        if base.get("logit_gaussian_nll") is not None:
            reference["logit + Gaussian"] = base["logit_gaussian_nll"]
        if base["entropy"] is not None:
            reference["entropy"] = base["entropy"]
        paths["training_curve"] = plots.plot_training_curve(history, out / "training_curve.png", reference, title)
        if any(isinstance(r.get("volume"), dict) and "blocks" in r["volume"] for r in history):
            # a subfolder: plots/*.png stays the fixed set of run plots
            paths["volume"] = plots.plot_volume(history, out / "diagnostics" / "volume.png", title=title)
    if config.data in toy2d.EXACT_DENSITY:
        paths["true_density"] = plots.plot_true_density(config.data, out / "true_density.png", bounds)
    return paths
