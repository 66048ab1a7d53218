"""Datasets: generated 2-D toy densities (:mod:`impflow.data.toy2d`), the UCI tabular
benchmarks (:mod:`impflow.data.tabular`), image sets with dequantisation and bits/dim
(:mod:`impflow.data.images`) and a user's own arrays (:func:`from_array`)."""

from . import toy2d
from .arrays import from_array
from .images import (
    IMAGES,
    ImageData,
    ImageDataset,
    Preprocess,
    bits_per_dim,
    dequantize,
    load_images,
)
from .tabular import TABULAR, TabularData, load_tabular

__all__ = [
    "toy2d",
    "from_array",
    "TABULAR",
    "TabularData",
    "load_tabular",
    "IMAGES",
    "ImageData",
    "ImageDataset",
    "Preprocess",
    "bits_per_dim",
    "dequantize",
    "load_images",
]
