"""The five UCI density-estimation benchmarks in the preprocessed form used since MAF.

Papamakarios et al. (2017, "Masked Autoregressive Flow for Density Estimation") published
their preprocessed files as ``data.tar.gz`` at https://zenodo.org/record/1161203; unpacked,
it holds the layout :func:`load_tabular` expects under ``root``::

    power/data.npy  gas/ethylene_CO.pickle  hepmass/1000_train.csv  hepmass/1000_test.csv
    miniboone/data.npy  BSDS300/BSDS300.hdf5

Nothing is downloaded. Every loader reproduces the cleaning and the split of the MAF
reference code (github.com/gpapamak/maf, ``datasets/*.py``), giving the standard
dimensions POWER 6, GAS 8, HEPMASS 21, MINIBOONE 43, BSDS300 63:

- **power**: ``data.npy`` has 8 columns (global active power, global reactive power,
  voltage, global intensity, sub-meterings 1–3, time of day in minutes; the date was
  already discarded). Rows are shuffled with ``np.random.RandomState(42)``; global reactive
  power (column 1, many exact zeros) and global intensity (column 3) are deleted; the same
  generator then draws the jitter U[0, ε) with ε = 0.01 (voltage), 0.001 (active power),
  1 (each sub-metering) and 0 (time), in MAF's order, so the split and the noise match the
  reference bit for bit.
- **gas**: a pickled pandas DataFrame (pandas is needed to read it). Columns 'Meth', 'Eth'
  and 'Time' are dropped; then, while some column has a Pearson correlation > 0.98 with
  another (signed, as in MAF: strong negative correlations are kept), the first such
  column is dropped. Correlations are computed on the whole file, as in MAF, so the column
  set is the standard one; this selects columns only and uses no standardisation statistic.
- **hepmass**: ``1000_train.csv`` / ``1000_test.csv`` (one header line, column 0 the class
  label). Only the positive class (label 1) is kept and the label dropped. MAF drops the
  last column of the test file ("the data set is messed up"): here it is dropped exactly
  when the test file has one more column than the training file. A feature is removed when
  its *smallest* value occurs more than 5 times among the training file's positive rows —
  MAF's rule, which counts the minimum's occurrences, not the mode's; it removes the
  constant mass column and the discrete-valued features.
- **miniboone**: ``data.npy`` is already cleaned by MAF (outliers and features with
  repeated values removed); loaded as is.
- **bsds300**: HDF5 datasets 'train', 'validation' and 'test' of 8×8 monochrome patches
  (already dequantised, per-patch mean removed, last pixel dropped). Splits are the file's;
  not standardised by default, as in MAF, so log-likelihoods compare with published nats.

Splits (power, gas, miniboone): the last 10% of rows (after POWER's shuffle; the others
keep file order, as MAF does) are the test set, the last 10% of the rest the validation
set. HEPMASS: the test set is the test file's, validation the last 10% of the training
file's positive rows. Sizes are ``int(0.1·N)`` as in MAF.

Standardisation (all but bsds300 by default): x ↦ (x − μ) / σ with μ and the population σ
(ddof 0) of the **training split only**, applied unchanged to validation and test. MAF
used the training plus validation rows (power, miniboone), the whole training file
(hepmass) or the whole file including test rows (gas, with ddof 1); training statistics
only rule out any leakage and differ from those by a negligible amount at these sizes. A
column constant on the training split (σ ≤ 1e-10·max|x|) keeps σ = 1 and a warning is
issued. Reported log-likelihoods are in the standardised space, as in the literature; add
−Σ log σ for the original units.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["TABULAR", "TabularData", "load_tabular"]

PathLike = str | os.PathLike[str]

_SOURCE = (
    "impflow reads the preprocessed files of Papamakarios et al. (2017, MAF), distributed as "
    "data.tar.gz at https://zenodo.org/record/1161203; unpack it and pass the directory that "
    "holds power/, gas/, hepmass/, miniboone/ and BSDS300/ as root (--data-root)"
)
_TEST_FRACTION = 0.1
_VAL_FRACTION = 0.1
_CONSTANT_RTOL = 1e-10
_POWER_SEED = 42
_POWER_COLUMNS = 8
_GAS_DROP = ("Meth", "Eth", "Time")
_GAS_MAX_CORRELATION = 0.98
_HEPMASS_MAX_MIN_COUNT = 5


@dataclass(frozen=True)
class TabularData:
    """A standardised train/validation/test split of an (N, D) data set.

    ``train``, ``val``, ``test``: float32 (N_split, D) tensors, z = (x − mean) / std.
    ``mean``, ``std``: float64 (D,) tensors of the training split (0 and 1 when not
    standardised); x = z·std + mean recovers the cleaned data.
    """

    train: Tensor
    val: Tensor
    test: Tensor
    mean: Tensor
    std: Tensor
    name: str

    @property
    def dim(self) -> int:
        """D, the number of features."""
        return self.train.shape[1]


# ----------------------------------------------------------------------------- shared pipeline


def split(data: np.ndarray, val_fraction: float, test_fraction: float) -> tuple[np.ndarray, ...]:
    """Rows (train, val, test) of ``data`` in order: the last int(test_fraction·N) rows are
    test, the last int(val_fraction·(N − N_test)) of the rest validation (MAF's convention).
    With fractions below 1 the training split keeps at least one row."""
    for label, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= f < 1:
            raise ValueError(f"{label} must lie in [0, 1), got {f}")
    if len(data) == 0:
        raise ValueError("the data set has no rows")
    n_test = int(test_fraction * len(data))
    rest = data[: len(data) - n_test]
    train = rest[: len(rest) - int(val_fraction * len(rest))]
    return train, rest[len(train) :], data[len(data) - n_test :]


def finish(
    name: str, train: np.ndarray, val: np.ndarray, test: np.ndarray, standardize: bool
) -> TabularData:
    """Standardise all three splits with the training split's mean and σ (ddof 0) and package.

    Columns constant on the training split keep σ = 1 (with a warning). Raises ValueError when
    a split holds NaN or Inf, in the file or after standardising to float32 (a value far outside
    the training split's range overflows), so no loader returns a non-finite value.
    """
    train, val, test = (np.asarray(a, dtype=np.float64) for a in (train, val, test))
    dim = train.shape[1]
    mean, std = np.zeros(dim), np.ones(dim)
    if standardize:
        mean, std = train.mean(axis=0), train.std(axis=0)
        constant = std <= _CONSTANT_RTOL * np.abs(train).max(axis=0)
        if constant.any():
            warnings.warn(
                f"{name}: columns {np.flatnonzero(constant).tolist()} are constant on the training "
                "split; they are centred but not scaled (σ = 1) and make any density degenerate",
                stacklevel=3,
            )
            std[constant] = 1.0

    def out(a: np.ndarray, split: str) -> Tensor:
        with np.errstate(over="ignore"):  # overflow to inf is reported below
            z = ((a - mean) / std).astype(np.float32)
        rows = np.flatnonzero(~np.isfinite(z).all(axis=1))
        if rows.size:
            raise ValueError(f"{name}: {rows.size} rows of the standardised {split} split are NaN or infinite "
                             f"(first: {rows[:5].tolist()})")
        return torch.from_numpy(z)

    splits = (out(train, "train"), out(val, "validation"), out(test, "test"))
    return TabularData(*splits, torch.from_numpy(mean), torch.from_numpy(std), name)


def read_csv(path: Path) -> np.ndarray:
    """A numeric comma-separated file as float64 (N, D); the first line is skipped when it is
    not all numbers (a header). Empty fields become NaN (slower parser, used only then)."""
    with open(path) as f:
        first = f.readline()
    try:
        [float(v) for v in first.split(",")]
        header = 0
    except ValueError:
        header = 1
    try:
        return np.loadtxt(path, delimiter=",", skiprows=header, dtype=np.float64, ndmin=2)
    except ValueError:
        with open(path) as f:  # the slow path: name a cell that is neither a number nor empty
            for line_number, line in enumerate(f, 1):
                for cell in line.split(",") if line_number > header else ():
                    try:
                        float(cell) if cell.strip() else None
                    except ValueError:
                        raise ValueError(f"{path}, line {line_number}: {cell.strip()!r} is not a number") from None
        return np.genfromtxt(path, delimiter=",", skip_header=header, dtype=np.float64, ndmin=2)


def _require(path: Path, name: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{name}: expected file {path} does not exist. {_SOURCE}")
    return path


def _check_matrix(x: np.ndarray, name: str, columns: int | None = None) -> np.ndarray:
    if x.ndim != 2 or (columns is not None and x.shape[1] != columns):
        want = f"(N, {columns})" if columns is not None else "(N, D)"
        raise ValueError(f"{name}: data has shape {x.shape}; expected {want}")
    return np.asarray(x, dtype=np.float64)


# ----------------------------------------------------------------------------- the five sets


def _power(root: Path) -> tuple[np.ndarray, ...]:
    data = _check_matrix(np.load(_require(root / "power" / "data.npy", "power")), "power", _POWER_COLUMNS)
    rng = np.random.RandomState(_POWER_SEED)
    rng.shuffle(data)
    data = np.delete(data, [1, 3], axis=1)  # gap, voltage, sm1, sm2, sm3, time
    n = len(data)
    voltage = 0.01 * rng.rand(n, 1)  # drawn in MAF's order: voltage, active power, sub-meterings
    active = 0.001 * rng.rand(n, 1)
    meterings = rng.rand(n, 3)
    data = data + np.hstack([active, voltage, meterings, np.zeros((n, 1))])
    return split(data, _VAL_FRACTION, _TEST_FRACTION)


def _drop_correlated(x: np.ndarray, threshold: float) -> list[int]:
    """Indices of the columns kept by MAF's GAS rule: while some column has correlation
    > threshold with another, drop the first such column."""
    keep = list(range(x.shape[1]))
    while True:
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = np.atleast_2d(np.corrcoef(x[:, keep], rowvar=False))
        offenders = np.flatnonzero((corr > threshold).sum(axis=1) > 1)
        if offenders.size == 0:
            return keep
        del keep[offenders[0]]


def _gas(root: Path) -> tuple[np.ndarray, ...]:
    path = _require(root / "gas" / "ethylene_CO.pickle", "gas")
    try:
        import pandas as pd
    except ImportError as err:
        raise ImportError(
            f"gas: {path} is a pickled pandas DataFrame; install pandas (pip install pandas) to read it"
        ) from err
    frame = pd.read_pickle(path)
    missing = [c for c in _GAS_DROP if c not in frame.columns]
    if missing:
        raise ValueError(f"gas: {path} lacks the columns {missing}; columns are {list(frame.columns)}")
    data = frame.drop(columns=list(_GAS_DROP)).to_numpy(dtype=np.float64)
    data = data[:, _drop_correlated(data, _GAS_MAX_CORRELATION)]
    return split(data, _VAL_FRACTION, _TEST_FRACTION)


def _min_value_count(column: np.ndarray) -> int:
    return int(np.count_nonzero(column == column.min()))


def _hepmass(root: Path) -> tuple[np.ndarray, ...]:
    files = [_require(root / "hepmass" / f"1000_{s}.csv", "hepmass") for s in ("train", "test")]
    train, test = (_check_matrix(read_csv(p), f"hepmass {p.name}") for p in files)
    train, test = train[train[:, 0] == 1, 1:], test[test[:, 0] == 1, 1:]
    if test.shape[1] == train.shape[1] + 1:
        test = test[:, :-1]
    if test.shape[1] != train.shape[1]:
        raise ValueError(f"hepmass: {train.shape[1]} training features but {test.shape[1]} test features")
    keep = [j for j in range(train.shape[1]) if _min_value_count(train[:, j]) <= _HEPMASS_MAX_MIN_COUNT]
    train, val, _ = split(train[:, keep], _VAL_FRACTION, 0.0)
    return train, val, test[:, keep]


def _miniboone(root: Path) -> tuple[np.ndarray, ...]:
    data = _check_matrix(np.load(_require(root / "miniboone" / "data.npy", "miniboone")), "miniboone")
    return split(data, _VAL_FRACTION, _TEST_FRACTION)


def _bsds300(root: Path) -> tuple[np.ndarray, ...]:
    path = _require(root / "BSDS300" / "BSDS300.hdf5", "bsds300")
    try:
        import h5py
    except ImportError as err:
        raise ImportError(f"bsds300: reading {path} needs h5py (pip install h5py)") from err
    with h5py.File(path, "r") as f:
        return tuple(_check_matrix(f[key][()], f"bsds300 {key}") for key in ("train", "validation", "test"))


_LOADERS: dict[str, Callable[[Path], tuple[np.ndarray, ...]]] = {
    "power": _power,
    "gas": _gas,
    "hepmass": _hepmass,
    "miniboone": _miniboone,
    "bsds300": _bsds300,
}

TABULAR: tuple[str, ...] = tuple(_LOADERS)
"""The names :func:`load_tabular` knows."""

_STANDARDIZED_BY_DEFAULT = frozenset(TABULAR) - {"bsds300"}


def load_tabular(name: str, root: PathLike, standardize: bool | None = None) -> TabularData:
    """Load UCI benchmark ``name`` (one of :data:`TABULAR`, case-insensitive) from ``root``.

    Cleaning, splits and standardisation are described in the module docstring. With
    ``standardize=None`` every set but bsds300 is standardised (the literature's choice).
    Raises FileNotFoundError naming the expected file when it is missing.
    """
    key = name.lower()
    if key not in _LOADERS:
        raise ValueError(f"unknown tabular dataset {name!r}; valid names: {', '.join(TABULAR)}")
    if standardize is None:
        standardize = key in _STANDARDIZED_BY_DEFAULT
    return finish(key, *_LOADERS[key](Path(root)), standardize=standardize)
