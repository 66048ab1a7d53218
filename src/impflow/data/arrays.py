"""A user's own data set: any (N, D) array or ``.npy`` / ``.csv`` file, split and standardised."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .tabular import PathLike, TabularData, finish, read_csv, split

__all__ = ["from_array"]


def _load(source: np.ndarray | torch.Tensor | PathLike) -> tuple[np.ndarray, str]:
    if isinstance(source, torch.Tensor):
        return source.detach().cpu().numpy(), "array"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.exists() and not path.is_file():
            raise ValueError(f"data file {path} is not a file")
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
        suffix = path.suffix.lower()
        if suffix == ".npy":
            try:
                return np.load(path, allow_pickle=False), path.stem
            except (ValueError, EOFError) as e:  # empty, truncated, text, or an object array
                why = "not in the .npy format, or an object array" if "pickle" in str(e) else " ".join(str(e).split())
                raise ValueError(f"{path} is not a readable numeric .npy array ({why})") from None
        if suffix == ".csv":
            return read_csv(path), path.stem
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use .npy or .csv")
    return np.asarray(source), "array"


def from_array(
    array_or_path: np.ndarray | torch.Tensor | PathLike,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int | None = 0,
    standardize: bool = True,
) -> TabularData:
    """Split and standardise a user's data set: the way to fit a flow to one's own data.

    Args:
        array_or_path: a numpy array or tensor of shape (N, D) (or (N,), read as D = 1), or
            the path of a ``.npy`` file or a comma-separated ``.csv`` (one optional header
            line; empty fields count as missing).
        val_fraction: validation share of what remains after the test split
            (N_val = int(val_fraction·(N − N_test)), MAF's convention).
        test_fraction: test share, N_test = int(test_fraction·N).
        seed: the rows are shuffled by ``np.random.default_rng(seed)`` before splitting;
            None keeps their order (test = last rows, as the MAF loaders do).
        standardize: map every split by z = (x − μ)/σ with the training split's mean and
            population σ; a column constant on the training split keeps σ = 1 (warning).

    Returns:
        :class:`TabularData` with float32 splits and the float64 statistics, named after
        the file stem (or "array").

    Raises:
        ValueError: for a non-numeric array, more than two dimensions, or any row with a
            NaN or infinite entry. Such rows are refused rather than silently dropped,
            since dropping changes the data set; drop them yourself, e.g.
            ``x[np.isfinite(x).all(axis=1)]``, if that is what you want.
    """
    data, name = _load(array_or_path)
    if data.dtype.kind not in "biuf":
        raise ValueError(f"{name}: expected a real numeric array, got dtype {data.dtype}")
    data = data.astype(np.float64)
    if data.ndim == 1:
        data = data[:, None]
    if data.ndim != 2:
        raise ValueError(f"{name}: expected shape (N, D) or (N,), got {data.shape}")
    bad = np.flatnonzero(~np.isfinite(data).all(axis=1))
    if bad.size:
        raise ValueError(
            f"{name}: {bad.size} of {len(data)} rows contain NaN or infinite values (first rows: "
            f"{bad[:5].tolist()}); remove or impute them, e.g. x[np.isfinite(x).all(axis=1)]"
        )
    if seed is not None:
        data = data[np.random.default_rng(seed).permutation(len(data))]
    return finish(name, *split(data, val_fraction, test_fraction), standardize=standardize)
