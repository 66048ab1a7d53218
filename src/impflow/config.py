"""Run configuration for ``impflow train``: defaults < preset < YAML file < command-line flags.

:class:`RunConfig` lists every setting once; the CLI builds its flags from the fields (their
``help`` metadata) and a YAML file may set any of them by the same name (``batch_size`` or
``batch-size``). :func:`model_builder` maps ``--model NAME`` to a builder and
:func:`model_kwargs` turns the config into that builder's keyword arguments.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from . import models
from .data import toy2d
from .data.images import IMAGES, LOGIT_ALPHA
from .data.tabular import TABULAR
from .flow import Flow
from .models.classifier import default_blocks

__all__ = [
    "ConfigError",
    "RunConfig",
    "PRESETS",
    "DTYPES",
    "model_names",
    "model_builder",
    "model_kwargs",
    "resolve",
    "coerce",
    "FIELDS",
    "RESUMABLE",
    "preset_help",
    "data_kind",
    "IMAGE_DATA",
    "IMAGE_MODELS",
    "TASKS",
    "LAYOUTS",
    "layout",
    "logit_alpha",
]

DTYPES = ("float32", "float64")
SCHEDULES = ("cosine", "constant")
LOGDETS = ("exact", "unbiased", "neumann")
CLASSIC_MODELS = ("realnvp", "glow", "maf", "nsf", "dlf", "linear")
IMAGE_MODELS = ("image-impflow", "image-resflow")
"""Multi-scale convolutional ResFlow/ImpFlow (:mod:`impflow.models.image`): image layout only."""
CLASSIFIER_BLOCKS = ("resflow", "impflow")
"""``--model`` of a ``--task classify`` run: the block type of :func:`impflow.models.classifier`."""
TASKS = ("density", "classify")
LAYOUTS = ("vector", "image")
IMAGE_DATA = IMAGES
"""Image sets ``--data`` accepts (mnist and cifar10 are read from ``--data-root``)."""
ARRAY_SUFFIXES = (".npy", ".csv")
_ROOTED_IMAGES = ("mnist", "cifar10")


def data_kind(name: str) -> str:
    """``"toy"`` (a 2-D toy density), ``"tabular"`` (a UCI set, needs ``data_root``), ``"image"``
    (digits; mnist and cifar10, which need ``data_root``) or ``"array"`` (a ``.npy``/``.csv`` file); raises ConfigError for anything else."""
    if name in toy2d.NAMES:
        return "toy"
    if name in TABULAR:
        return "tabular"
    if name in IMAGE_DATA:
        return "image"
    if name.lower().endswith(ARRAY_SUFFIXES):
        return "array"
    raise ConfigError(
        f"unknown dataset {name!r}; valid names: {', '.join(toy2d.NAMES + TABULAR + IMAGE_DATA)}, "
        "or the path of a .npy or .csv file"
    )


class ConfigError(ValueError):
    """A bad setting (unknown name, wrong type, out of range); the message is one line."""


def layout(config: "RunConfig") -> str | None:
    """How a density run feeds its data to the model: ``"image"`` ((C, H, W), logit inside the
    flow), ``"vector"`` (flattened) for image data, None for other data and classify runs."""
    if config.task != "density" or data_kind(config.data) != "image":
        return None
    if config.layout is not None:
        return config.layout
    return "image" if config.model in IMAGE_MODELS or config.data in _ROOTED_IMAGES else "vector"


def logit_alpha(config: "RunConfig") -> float | None:
    """The α of the logit preprocessing (image layout only; None otherwise)."""
    if layout(config) != "image":
        return None
    return config.logit_alpha if config.logit_alpha is not None else LOGIT_ALPHA[config.data]


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().absolute())


def parse_hidden(text: str) -> tuple[int, ...]:
    """``"128,128"`` -> ``(128, 128)``."""
    try:
        sizes = tuple(int(s) for s in str(text).split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"expected comma-separated integers like 128,128, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"expected positive layer widths like 128,128, got {text!r}")
    return sizes


def parse_bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"expected true or false, got {text!r}")


def parse_switch(text: str) -> bool:
    """A true/false setting given as a value (``--actnorm false``), unlike the store-true flags."""
    return parse_bool(text)


def _opt(default: Any, help: str, parse: Callable[[str], Any] = str, resumable: bool = False) -> Any:
    """A RunConfig field: ``parse`` reads it from text, ``resumable`` fields may change on --resume."""
    return field(default=default, metadata={"help": help, "parse": parse, "resumable": resumable})


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run (see ``impflow train --help``)."""

    task: str = _opt(
        "density",
        "density (maximum likelihood) or classify (cross-entropy; a ResNet-style classifier whose residual "
        "blocks are Lipschitz ResFlow or ImpFlow blocks, impflow.models.classifier; --data digits, mnist or "
        "cifar10; --model resflow|impflow picks the block type)",
    )
    data: str = _opt(
        "checkerboard",
        f"dataset: a 2-D toy ({', '.join(toy2d.NAMES)}); a UCI set ({', '.join(TABULAR)}; needs --data-root); "
        "images: digits (8x8, 17 levels, with scikit-learn), mnist or cifar10 (files under --data-root; "
        "see --layout); or the path of an (N, D) .npy/.csv file "
        "(split 80/10/10 and standardised by impflow.data.from_array)",
    )
    data_root: str | None = _opt(
        None, "directory holding the MAF data files (power/, gas/, hepmass/, miniboone/, BSDS300/) for the UCI sets, "
        "or the MNIST IDX files / cifar-10-batches-py/ for mnist and cifar10",
    )
    layout: str | None = _opt(
        None,
        "how a density model sees image data: image = (C, H, W) tensors, dequantized, logit preprocessing "
        "inside the flow (--logit-alpha), the image forms of glow/dlf/realnvp (vector-only models such as nsf "
        "see the flattened logits); vector = flattened and dequantized, no logit. Default: image for image-impflow/image-resflow "
        "and for mnist/cifar10, vector otherwise (e.g. digits with nsf: the 64-D runs)",
    )
    logit_alpha: float | None = _opt(
        None,
        "alpha of the image-layout preprocessing y = logit(alpha + (1 - 2 alpha) x), in (0, 0.5) (default "
        + ", ".join(f"{k} {v:g}" for k, v in LOGIT_ALPHA.items()) + "); its log-det is part of the NLL and bits/dim",
        float,
    )
    model: str = _opt(
        "impflow",
        "model name: impflow, resflow, image-impflow, image-resflow (multi-scale conv flows, image layout), or a "
        "classic flow: " + ", ".join(CLASSIC_MODELS) + "; with --task classify: resflow or impflow blocks",
    )
    blocks: int | None = _opt(
        None,
        "number of blocks/steps (default: 4 for impflow, 8 for resflow; image-impflow/image-resflow: blocks per "
        "scale, 3 scales, default 2/4; classify: 2 impflow / 4 resflow blocks)",
        int,
    )
    hidden: tuple[int, ...] | None = _opt(
        None, "hidden widths of each network, e.g. 128,128 (one width for conv and classifier networks)", parse_hidden
    )
    width: tuple[int, ...] | None = _opt(
        None,
        "classify: channels the classifier's blocks act on (default 32); several, e.g. 16,32,64,128, give a "
        "ResNet-shaped classifier with one stage per width (1x1 stride-2 conv, BatchNorm and ReLU between stages; "
        "--blocks then counts per stage, default 2 resflow / 1 impflow)",
        parse_hidden,
    )
    coeff: float | None = _opt(
        None, "spectral-norm bound of every layer, in (0, 1) (default 0.97; classify: 0.9)", float
    )
    activation: str | None = _opt(None, "lipswish, sine (sin(ωx)/ω, learnable ω), elu or tanh (default lipswish)")
    actnorm: bool | None = _opt(
        None,
        "true/false: an ActNorm before every block and at the end (default: the builder's; true for impflow and "
        "resflow). The ImpFlow paper's toy runs use none; see benchmarks/toy2d.py --actnorm false",
        parse_switch,
    )
    actnorm_every: int | None = _opt(
        None,
        "resflow / image-resflow: the ActNorms at every k-th block only (default 1: at every block). "
        "k = 2 gives ResFlow the ActNorms, and exactly the parameters, of the ImpFlow with half its blocks",
        int,
    )
    inner_actnorm: bool | None = _opt(
        None,
        "impflow / image-impflow, true/false: also an ActNorm inside every block, z = (Id + g_z)^-1(ActNorm(x + "
        "g_x(x))), where the ResFlow with twice the blocks has one between its two blocks (default false)",
        parse_switch,
    )
    logdet: str | None = _opt(
        None,
        "training log-det estimator: exact, unbiased or neumann (default exact up to 16 dimensions, else unbiased "
        "for vectors and neumann for images); evaluation is exact up to 64 dimensions, else unbiased with its "
        "standard error",
    )
    steps: int = _opt(2000, "total optimisation steps", int, resumable=True)
    batch_size: int = _opt(1024, "training minibatch size", int)
    lr: float = _opt(1e-3, "peak Adam learning rate", float)
    warmup: int = _opt(0, "linear learning-rate warm-up steps", int)
    schedule: str = _opt("cosine", "learning-rate decay after warm-up: cosine (to 0 at --steps) or constant")
    clip: float = _opt(10.0, "gradient-norm clipping threshold (0: off)", float)
    train_size: int = _opt(0, "0: fresh samples every step; N: a fixed training set of N points", int)
    seed: int = _opt(0, "seed of the model initialisation and of the training data", int)
    dtype: str = _opt("float32", "float32 or float64")
    eval_every: int = _opt(
        250, "steps between evaluations (validation NLL or classification error) and checkpoints", int,
        resumable=True,
    )
    eval_size: int = _opt(
        10000, "held-out validation points (toys: a different seed from training; fixed splits: the first N of "
        "the validation split)", int,
    )
    log_every: int = _opt(
        100, "steps between history records (and log lines when stdout is not a terminal)", int, resumable=True
    )
    device: str = _opt("auto", "cpu, cuda, cuda:N or auto (cuda if available)", resumable=True)
    threads: int = _opt(
        1,
        "CPU intra-op threads (0: all cores). Default 1: on the shared 2-core machines a 4-block 2-D ImpFlow "
        "(128-128 networks, batch 1024 or 5000) trained 4-14x faster with 1 thread than with 2, with the "
        "other core busy or not (benchmarks/results/threads.json)",
        int,
        resumable=True,
    )
    quiet: bool = _opt(False, "no progress output", parse_bool, resumable=True)
    preset: str | None = _opt(None, "the preset this run started from (informational)")

    def __post_init__(self) -> None:
        for name in ("hidden", "width"):  # a list or int -> tuple
            object.__setattr__(self, name, coerce(name, getattr(self, name), "RunConfig"))
        kind = data_kind(self.data)
        # files are named absolutely (~ expanded), so eval, sample, plot and --resume find them from
        # any directory
        if kind == "array":
            object.__setattr__(self, "data", _absolute(self.data))
        if self.data_root is not None:
            object.__setattr__(self, "data_root", _absolute(self.data_root))
        if kind == "tabular" and self.data_root is None:
            raise ConfigError(
                f"dataset {self.data!r} needs --data-root DIR (the unpacked MAF data.tar.gz, "
                "https://zenodo.org/record/1161203)"
            )
        if self.data in _ROOTED_IMAGES and self.data_root is None:
            raise ConfigError(f"dataset {self.data!r} is read from files: it needs --data-root DIR")
        for name, valid in (("task", TASKS), ("layout", LAYOUTS)):
            value = getattr(self, name)
            if value is not None and value not in valid:
                raise ConfigError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
        if self.task == "classify":
            if kind != "image":
                raise ConfigError(f"--task classify needs image data ({', '.join(IMAGE_DATA)}), got {self.data!r}")
            if self.model not in CLASSIFIER_BLOCKS:
                raise ConfigError(
                    f"--task classify takes --model {' or '.join(CLASSIFIER_BLOCKS)} (the block type), got {self.model!r}"
                )
            for name in ("layout", "logit_alpha", "logdet"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{name} applies to density runs only (--task classify was given)")
        else:
            model_builder(self.model)
            if self.width is not None:
                raise ConfigError("width applies to --task classify only (density networks take --hidden)")
            if self.model in IMAGE_MODELS and layout(self) != "image":
                raise ConfigError(f"model {self.model!r} needs image data in the image layout "
                                  f"(--data {' / '.join(IMAGE_DATA)}, not --layout vector)")
            if self.layout is not None and kind != "image":
                raise ConfigError(f"layout applies to image data ({', '.join(IMAGE_DATA)}), got {self.data!r}")
            if self.logit_alpha is not None and layout(self) != "image":
                raise ConfigError("logit_alpha applies to the image layout only (--layout image)")
        if self.logit_alpha is not None and not 0 < self.logit_alpha < 0.5:
            raise ConfigError(f"logit_alpha must lie in (0, 0.5), got {self.logit_alpha}")
        for name in ("steps", "batch_size", "eval_every", "eval_size", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup", "train_size", "threads", "clip", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be non-negative, got {getattr(self, name)}")
        if self.actnorm_every is not None and self.actnorm_every < 1:
            raise ConfigError(f"actnorm_every must be at least 1, got {self.actnorm_every}")
        if self.blocks is not None and self.blocks < 1:
            raise ConfigError(f"blocks must be at least 1, got {self.blocks}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.coeff is not None and not 0 < self.coeff < 1:
            raise ConfigError(f"coeff must lie in (0, 1), got {self.coeff}")
        for name, valid in (("dtype", DTYPES), ("schedule", SCHEDULES), ("logdet", LOGDETS)):
            value = getattr(self, name)
            if value is not None and value not in valid:
                raise ConfigError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> "RunConfig":
        """Build from a mapping of field names (dashes allowed) to values or text."""
        return cls(**{k: coerce(k, v, source) for k, v in _normalize(values, source).items()})

    def replace(self, **changes: Any) -> "RunConfig":
        return replace(self, **changes)


FIELDS = {f.name: f for f in fields(RunConfig)}
RESUMABLE = tuple(name for name, f in FIELDS.items() if f.metadata["resumable"])


def _normalize(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise ConfigError(f"{source}: unknown setting {key!r}; valid: {', '.join(FIELDS)}")
        out[name] = value
    return out


def coerce(name: str, value: Any, source: str | None = "config") -> Any:
    """Convert ``value`` (text, or a YAML scalar/list) to the type of field ``name``; errors name
    ``source`` and the field unless ``source`` is None."""
    if value is None:
        return None
    parse = FIELDS[name].metadata["parse"]
    kind = {int: "an integer", float: "a number", parse_bool: "true or false", parse_switch: "true or false"}.get(
        parse, "text"
    )
    prefix = f"{source}: {name}: " if source else ""
    if parse is parse_hidden and isinstance(value, (list, tuple)):  # YAML/JSON lists of widths
        value = ",".join(map(str, value))
    wrong_bool = isinstance(value, bool) and parse not in (parse_bool, parse_switch)
    if wrong_bool or (parse is int and isinstance(value, float)):
        raise ConfigError(f"{prefix}expected {kind}, got {value!r}")
    try:
        return parse(value)
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}") from None
    except (TypeError, ValueError):
        raise ConfigError(f"{prefix}expected {kind}, got {value!r}") from None

# --------------------------------------------------------------------------- presets

PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "demo": (
        "an 8-block ImpFlow (64-64 networks, coeff 0.99) on checkerboard in minutes on 2 CPU cores "
        "(what `make demo` runs)",
        dict(data="checkerboard", model="impflow", blocks=8, hidden=(64, 64), coeff=0.99, steps=2500,
             batch_size=1024, lr=5e-3, warmup=100, schedule="cosine", eval_every=500, eval_size=10000),
    ),
    "paper-fig3": (
        "ImpFlow paper Fig. 3: 4-block ImpFlow, 128-128 networks with sine activations, coeff 0.99, no ActNorm "
        "(the paper's toy protocol), on checkerboard (hours on 2 CPU cores)",
        dict(data="checkerboard", model="impflow", blocks=4, hidden=(128, 128), coeff=0.99, actnorm=False,
             activation="sine",
             steps=20000, batch_size=5000, lr=1e-3, warmup=500, schedule="cosine", eval_every=1000,
             eval_size=20000),
    ),
    "paper-fig3-resflow": (
        "the ResFlow side of Fig. 3: 8 residual blocks, same networks and budget as paper-fig3",
        dict(data="checkerboard", model="resflow", blocks=8, hidden=(128, 128), coeff=0.99, actnorm=False,
             activation="sine",
             steps=20000, batch_size=5000, lr=1e-3, warmup=500, schedule="cosine", eval_every=1000,
             eval_size=20000),
    ),
    "tabular-smoke": (
        "a seconds-long smoke test of vector-data training: 1-block ImpFlow, 16-wide network; "
        "needs --data FILE.npy|.csv (any small (N, D) array, e.g. 300x5)",
        dict(model="impflow", blocks=1, hidden=(16,), steps=20, batch_size=64, lr=1e-3, eval_every=10,
             eval_size=1000, log_every=5),
    ),
    "tabular-smoke-resflow": (
        "the ResFlow side of tabular-smoke: 2 residual blocks (twice tabular-smoke's 1 implicit block, the same "
        "16-wide networks, equal parameters); needs --data FILE.npy|.csv",
        dict(model="resflow", blocks=2, hidden=(16,), steps=20, batch_size=64, lr=1e-3, eval_every=10,
             eval_size=1000, log_every=5),
    ),
    **{
        f"{name}{suffix}": (
            f"ImpFlow paper Table 2 ({name.upper()}, {dim}-D), the {side} side: "
            + (
                f"{blocks} implicit blocks, half the {2 * blocks} residual blocks of {name}-resflow "
                "(each implicit block holds two networks: equal parameters)"
                if suffix == ""
                else f"{2 * blocks} residual blocks, twice the {blocks} implicit blocks of {name} "
                "with the same networks (equal parameters)"
            )
            + f"; {','.join(map(str, hidden))} networks (widths and budget are this package's choice). "
            f"Paper test log-likelihood: ImpFlow {imp} nats, ResFlow {res} nats (NLL = minus these). "
            "Needs --data-root DIR. Evaluation uses the exact log-det"
            + (", O(D) backward passes per point: slow at 63-D" if dim > 16 else ""),
            dict(data=name, model="impflow" if suffix == "" else "resflow",
                 blocks=blocks if suffix == "" else 2 * blocks, hidden=hidden, steps=steps, batch_size=1000,
                 lr=1e-3, warmup=1000, schedule="cosine", eval_every=2500, eval_size=10000, log_every=100),
        )
        for name, dim, imp, res, hidden, steps in (
            ("power", 6, "0.30", "0.26", (128, 128), 50000),
            ("gas", 8, "6.94", "6.20", (128, 128), 50000),
            ("hepmass", 21, "-18.52", "-18.91", (256, 256), 50000),
            ("miniboone", 43, "-21.50", "-21.81", (256, 256), 20000),
            ("bsds300", 63, "113.72", "104.63", (512, 512), 50000),
        )
        for suffix, side, blocks in (("", "ImpFlow", 5), ("-resflow", "ResFlow", 5))
    },
}
"""name -> (description, settings)."""

_PRESET_NEEDS = {"tabular-smoke": "data", "tabular-smoke-resflow": "data"}
"""Presets that run only with a setting given explicitly (flag or config file)."""


def preset_help() -> str:
    """A text block describing every preset, for ``--help``."""
    lines = ["presets (--preset NAME; flags and --config override them):"]
    for name, (text, settings) in PRESETS.items():
        shown = " ".join(f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in settings.items())
        lines += [f"  {name}: {text}", f"      {shown}"]
    return "\n".join(lines)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Settings from a YAML mapping (keys as in RunConfig, dashes or underscores)."""
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, got {type(loaded).__name__}")
    return {k: coerce(k, v, str(path)) for k, v in _normalize(loaded, str(path)).items()}


def resolve(
    preset: str | None = None, file: str | Path | None = None, flags: Mapping[str, Any] | None = None
) -> tuple[RunConfig, dict[str, Any]]:
    """Merge defaults < preset < YAML file < flags.

    A ``preset`` key in the file names a preset too (the ``preset`` argument wins). Returns the
    config and the settings that were given explicitly (preset, file or flags), which is what
    ``--resume`` may apply to a saved run.
    """
    from_file = load_yaml(file) if file is not None else {}
    flags = _normalize(flags or {}, "flags")
    name = preset if preset is not None else from_file.get("preset")
    explicit: dict[str, Any] = {}
    if name is not None:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
        explicit |= PRESETS[name][1] | {"preset": name}
    explicit |= {k: v for k, v in from_file.items() if k != "preset"} | flags
    needed = _PRESET_NEEDS.get(name) if name is not None else None
    if needed is not None and needed not in explicit:
        raise ConfigError(f"preset {name} needs --{needed.replace('_', '-')} (see impflow train --help)")
    return RunConfig(**explicit), explicit


# --------------------------------------------------------------------------- models


def _registry() -> dict[str, Callable[..., Flow]]:
    builders: dict[str, Callable[..., Flow]] = {
        "impflow": models.impflow,
        "resflow": models.resflow,
        "image-impflow": models.image_impflow,
        "image-resflow": models.image_resflow,
    }
    try:
        from .models import classic
    except ImportError:
        return builders
    return builders | {name: getattr(classic, name) for name in CLASSIC_MODELS if hasattr(classic, name)}


def model_names() -> tuple[str, ...]:
    """The names ``--model`` accepts."""
    return tuple(_registry())


def model_builder(name: str, task: str = "density") -> Callable[..., Any]:
    """The builder for ``--model name``: a flow builder called as ``builder(dim=..., **kwargs)``
    (``shape=`` for image-layout models), or for ``task="classify"``
    :func:`impflow.models.classifier` (``name`` is then its block type)."""
    if task == "classify":
        return models.classifier
    builders = _registry()
    if name not in builders:
        raise ConfigError(f"unknown model {name!r}; valid names: {', '.join(builders)}")
    return builders[name]


# RunConfig field -> the builder parameters it may set (first one the builder has wins).
_MODEL_OPTIONS: dict[str, tuple[str, ...]] = {
    "blocks": ("blocks", "steps", "blocks_per_scale"),
    "hidden": ("hidden",),
    "width": ("width",),
    "coeff": ("coeff",),
    "activation": ("activation",),
    "actnorm": ("actnorm",),
    "actnorm_every": ("actnorm_every",),
    "inner_actnorm": ("inner_actnorm",),
    "logdet": ("logdet",),
}


def model_kwargs(config: RunConfig) -> dict[str, Any]:
    """The builder's keyword arguments for ``config`` (JSON-ready), builder defaults filled in.

    Raises ConfigError when a setting is given that the model does not have (e.g. ``coeff``
    for ``realnvp``) or a multi-layer ``hidden`` for a builder that takes one width.
    """
    params = inspect.signature(model_builder(config.model, config.task)).parameters
    kwargs: dict[str, Any] = {"block": config.model} if config.task == "classify" else {}
    for option, candidates in _MODEL_OPTIONS.items():
        value = getattr(config, option)
        target = next((p for p in candidates if p in params), None)
        if target is None:
            if value is not None:
                raise ConfigError(f"model {config.model!r} has no setting {option!r}")
            continue
        fallback = params[target].default
        if value is None:
            value = None if fallback is inspect.Parameter.empty else fallback
        if option == "blocks" and isinstance(value, tuple):
            value = list(value)
        if option == "hidden" and value is not None:
            if isinstance(fallback, int) or target == "hidden" and config.task == "classify":  # one width
                if not isinstance(value, int) and len(value) != 1:
                    raise ConfigError(f"model {config.model!r} takes one hidden width, got {','.join(map(str, value))}")
                value = value if isinstance(value, int) else value[0]
            else:
                value = list(value)
        kwargs[target] = value
    if config.task == "classify":  # the classifier's defaults, recorded
        width = kwargs["width"]
        staged = width is not None and len(width) > 1  # several widths: one stage each
        if kwargs.get("blocks") is None:
            kwargs["blocks"] = default_blocks(config.model, staged)
        if staged:
            kwargs["width"], kwargs["stages"] = None, list(width)
        else:
            kwargs["width"] = width if width is None else width[0]
            if kwargs.get("hidden") is None:
                kwargs["hidden"] = kwargs["width"]
    return kwargs
