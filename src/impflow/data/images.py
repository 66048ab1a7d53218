"""Image data sets with uniform dequantisation, logit preprocessing and bits/dim accounting.

Sources (nothing is downloaded):

- ``digits``: scikit-learn's 8×8 handwritten digits (1797 images, 17 grey levels 0..16,
  shipped inside scikit-learn); a seeded 80/20 train/test split.
- ``mnist``: the four IDX files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``) directly
  under ``root`` or under ``root/MNIST/raw`` (torchvision's layout); 256 levels.
- ``cifar10``: the python pickle batches ``root/cifar-10-batches-py/data_batch_1..5`` and
  ``test_batch`` (dicts with b'data' (N, 3072) uint8 and b'labels'); 256 levels. Pickles
  can run code when loaded: only use files from a trusted source.

Images are held as integer levels, uint8 (N, C, H, W). With K levels and x_int ∈
{0, …, K−1}^D (D = C·H·W), uniform dequantisation gives x = (x_int + u)/K ∈ [0, 1)^D with
u ~ U[0, 1)^D, drawn afresh each time an image is served.

Bits per dimension, including every Jacobian. The flow models y = T(x) (here T is the logit
map of :class:`Preprocess`, ladj = log|det ∂y/∂x|) with density p_Y, so the density on
[0, 1)^D is p_X(x) = p_Y(T(x))·exp(ladj), and x_int + u ∈ [0, K)^D has density
K^{−D} p_X((x_int + u)/K). The discrete model P(x_int) = ∫_{[0,1)^D} K^{−D} p_X((x_int+u)/K) du
obeys, by Jensen's inequality,

    log P(x_int) ≥ E_u[log p_Y(y) + ladj] − D log K,

hence the reported upper bound (one u per image, averaged over the data)

    bits/dim = −(log p_Y(y) + ladj − D ln K) / (D ln 2).

A uniform model on [0, 1)^D scores exactly log₂ K (8 bits for 256 levels), where the bound
is tight.
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..transforms.base import Transform
from ..transforms.elementwise import Logit
from .tabular import PathLike

__all__ = [
    "IMAGES",
    "LEVELS",
    "LOGIT_ALPHA",
    "ImageData",
    "ImageDataset",
    "Preprocess",
    "bits_per_dim",
    "dequantize",
    "random_hflip",
    "read_idx",
    "load_digits",
    "load_mnist",
    "load_cifar10",
    "load_images",
]

IMAGES: tuple[str, ...] = ("digits", "mnist", "cifar10")
"""The names :func:`load_images` knows."""

LEVELS: dict[str, int] = {"digits": 17, "mnist": 256, "cifar10": 256}
"""K, the number of grey (or colour) levels per pixel."""

LOGIT_ALPHA: dict[str, float] = {"digits": 0.05, "mnist": 1e-6, "cifar10": 0.05}
"""Default α of the logit preprocessing: Residual Flows' (and ImpFlow's) 1e-6 for MNIST and
0.05 for CIFAR-10; 0.05 for digits (our choice: with 17 levels a bin is 1/17 wide)."""

_DIGITS_TEST_FRACTION = 0.2
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_UBYTE = 0x08
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_SHAPE = (3, 32, 32)
_SPLITS = ("train", "test")
_BELOW_ONE = float(np.nextafter(np.float32(1), np.float32(0)))


# ----------------------------------------------------------------------------- batch operations


def dequantize(x_int: Tensor, levels: int, generator: torch.Generator | None = None) -> Tensor:
    """(x_int + u)/K with u ~ U[0, 1) elementwise: float32, same shape, every entry in [0, 1).

    x_int holds integer levels 0..K−1 (any integer or float dtype). Entries that round up to
    1 in float32 are set to the largest float32 below 1, so a logit stays finite.
    """
    u = torch.rand(x_int.shape, generator=generator, device=x_int.device)
    return ((x_int.to(torch.float32) + u) / levels).clamp(max=_BELOW_ONE)


def random_hflip(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Flip each image of x (B, C, H, W) left-right with probability ½, independently."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip.view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)


def bits_per_dim(log_prob: Tensor, ladj: Tensor, dim: int, levels: int) -> Tensor:
    """−(log p_Y(y) + ladj − D ln K)/(D ln 2), per image (see the module docstring).

    Args:
        log_prob: (B,) log-density in nats of the preprocessed images y under the model.
        ladj: (B,) log|det ∂y/∂x| of the preprocessing from dequantised x ∈ [0, 1)^D.
        dim: D, the number of pixel values per image (C·H·W).
        levels: K, the number of levels per pixel value.
    """
    return -(log_prob + ladj - dim * math.log(levels)) / (dim * math.log(2.0))


class Preprocess(Transform):
    """Dequantised images x ∈ [0, 1)^D → y = logit(α + (1 − 2α)x), with its log-det.

    ``forward(x) -> (y, ladj)``, ladj (B,) = Σ [log(1 − 2α) − log s − log(1 − s)] with
    s = α + (1 − 2α)x (see :class:`~impflow.transforms.elementwise.Logit`); with
    ``alpha=None`` the map is the identity (ladj = 0). ``inverse(y) -> x``. Use it either
    before a flow of y (then pass both terms to :func:`bits_per_dim`, or call
    :meth:`bits_per_dim`) or as the flow's first transform (then ladj is inside
    ``flow.log_prob(x)`` and :func:`bits_per_dim` takes ladj = 0).
    """

    def __init__(self, levels: int, alpha: float | None = 0.05) -> None:
        super().__init__()
        self.levels = levels
        self.logit = None if alpha is None else Logit(alpha)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.logit is None:
            return x, x.new_zeros(x.shape[0])
        return self.logit(x)

    def inverse(self, y: Tensor) -> Tensor:
        return y if self.logit is None else self.logit.inverse(y)

    def bits_per_dim(self, log_prob_fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """Bits/dim (B,) of dequantised images x (B, C, H, W) under a model of y.

        ``log_prob_fn`` maps preprocessed y to its log-density (B,) in nats, e.g.
        ``flow.log_prob``; the preprocessing log-det and the K^D scaling are included.
        """
        y, ladj = self(x)
        return bits_per_dim(log_prob_fn(y), ladj, x[0].numel(), self.levels)


# ----------------------------------------------------------------------------- containers


class ImageDataset(Dataset):
    """Integer images served as (x, label): x float32 (C, H, W) in [0, 1), label an int.

    ``dequantize``: x = (x_int + u)/K with fresh u each access (else the bin midpoints
    (x_int + ½)/K, for deterministic evaluation or display). ``hflip``: flip left-right with
    probability ½ (training augmentation). Randomness uses the global torch RNG, which
    :class:`torch.utils.data.DataLoader` seeds per worker.
    """

    def __init__(
        self, images: Tensor, labels: Tensor, levels: int, dequantize: bool = True, hflip: bool = False
    ) -> None:
        if images.dim() != 4 or len(images) != len(labels):
            raise ValueError(
                f"expected images (N, C, H, W) and labels (N,), got {tuple(images.shape)} and "
                f"{tuple(labels.shape)}"
            )
        self.images, self.labels, self.levels = images, labels, levels
        self.dequantize, self.hflip = dequantize, hflip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x = _to_unit(self.images[i : i + 1], self.levels, self.dequantize, self.hflip, None)
        return x[0], int(self.labels[i])


def _to_unit(
    images: Tensor, levels: int, dequant: bool, hflip: bool, generator: torch.Generator | None
) -> Tensor:
    x = dequantize(images, levels, generator) if dequant else (images.to(torch.float32) + 0.5) / levels
    return random_hflip(x, generator) if hflip else x


@dataclass(frozen=True)
class ImageData:
    """Train and test images as integer levels with their labels.

    ``*_images``: uint8 (N, C, H, W) with values 0..levels−1; ``*_labels``: int64 (N,).
    ``flip_train``: whether the training split is augmented with horizontal flips by
    default (CIFAR-10 only). ``logit_alpha``: the default α of :meth:`preprocess`.
    """

    name: str
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    levels: int
    flip_train: bool
    logit_alpha: float

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.train_images.shape[1:])

    @property
    def dim(self) -> int:
        """D = C·H·W."""
        return math.prod(self.shape)

    def _split(self, split: str, hflip: bool | None) -> tuple[Tensor, Tensor, bool]:
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        if hflip and split != "train":
            raise ValueError("horizontal flips augment the training split only")
        flip = self.flip_train and split == "train" if hflip is None else hflip
        return getattr(self, f"{split}_images"), getattr(self, f"{split}_labels"), flip

    def tensors(
        self,
        split: str = "train",
        dequantize: bool = True,
        hflip: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(x, labels) for the whole split: x float32 (N, C, H, W) in [0, 1), dequantised
        once with ``generator`` (midpoints if not ``dequantize``); ``hflip=None`` flips the
        training split when :attr:`flip_train`."""
        images, labels, flip = self._split(split, hflip)
        return _to_unit(images, self.levels, dequantize, flip, generator), labels

    def dataset(
        self, split: str = "train", dequantize: bool = True, hflip: bool | None = None
    ) -> ImageDataset:
        """A :class:`ImageDataset` of the split, fresh noise (and flips) on every access."""
        images, labels, flip = self._split(split, hflip)
        return ImageDataset(images, labels, self.levels, dequantize=dequantize, hflip=flip)

    def preprocess(self, alpha: float | None = None) -> Preprocess:
        """The logit :class:`Preprocess` for this data set (α = :attr:`logit_alpha` unless given;
        for the identity map use ``Preprocess(levels, alpha=None)``)."""
        return Preprocess(self.levels, self.logit_alpha if alpha is None else alpha)


_Split = tuple[np.ndarray, np.ndarray]  # (images (N, C, H, W), labels (N,))


def _image_data(name: str, train: _Split, test: _Split) -> ImageData:
    def images(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.uint8))

    def labels(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))

    return ImageData(
        name,
        images(train[0]),
        labels(train[1]),
        images(test[0]),
        labels(test[1]),
        levels=LEVELS[name],
        flip_train=name == "cifar10",
        logit_alpha=LOGIT_ALPHA[name],
    )


# ----------------------------------------------------------------------------- loaders


def load_digits(test_fraction: float = _DIGITS_TEST_FRACTION, seed: int = 0) -> ImageData:
    """scikit-learn's digits as (N, 1, 8, 8), levels 0..16; int(test_fraction·1797) images,
    chosen by ``np.random.default_rng(seed)``, form the test split."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as err:
        raise ImportError("the digits data set ships with scikit-learn: pip install scikit-learn") from err
    digits = sk_digits()
    images = np.rint(digits.images).astype(np.uint8)[:, None]
    order = np.random.default_rng(seed).permutation(len(images))
    n_test = int(test_fraction * len(images))
    test, train = order[:n_test], order[n_test:]
    return _image_data("digits", (images[train], digits.target[train]), (images[test], digits.target[test]))


def read_idx(path: PathLike) -> np.ndarray:
    """An unsigned-byte IDX array (the MNIST format; gzip-compressed if the name ends in .gz).

    Header: two zero bytes, the type code 0x08 (unsigned byte), the number of dimensions n,
    then n big-endian uint32 sizes; magic 0x00000803 for images (N, H, W), 0x00000801 for
    labels (N,).
    """
    path = Path(path)
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:3] != bytes([0, 0, _IDX_UBYTE]):
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(bytearray(raw), dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(dims):
        raise ValueError(f"{path}: header says {dims} = {math.prod(dims)} bytes, file holds {data.size}")
    return data.reshape(dims)


def _find_mnist(root: Path, name: str) -> Path:
    for folder in (root, root / "MNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"mnist: expected {root / name}[.gz] (or {root / 'MNIST' / 'raw' / name}[.gz]); the four IDX "
        "files come from http://yann.lecun.com/exdb/mnist/ (or any mirror) and are read as is"
    )


def load_mnist(root: PathLike) -> ImageData:
    """MNIST from its IDX files under ``root``: (N, 1, 28, 28), levels 0..255, the standard
    60 000 / 10 000 train/test split."""
    root = Path(root)
    splits = []
    for split in _SPLITS:
        image_file, label_file = (_find_mnist(root, n) for n in _MNIST_FILES[split])
        images, labels = read_idx(image_file), read_idx(label_file)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"mnist: {image_file} has shape {images.shape}, {label_file} {labels.shape}")
        splits.append((images[:, None], labels))
    return _image_data("mnist", *splits)


def _cifar_batch(path: Path) -> _Split:
    if not path.is_file():
        raise FileNotFoundError(
            f"cifar10: expected {path}; unpack cifar-10-python.tar.gz from "
            "https://www.cs.toronto.edu/~kriz/cifar.html under root"
        )
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"cifar10: {path} is not a CIFAR-10 python batch (a dict with b'data', b'labels')")
    return np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, *_CIFAR_SHAPE), np.asarray(batch[b"labels"])


def load_cifar10(root: PathLike) -> ImageData:
    """CIFAR-10 from the python batches under ``root/cifar-10-batches-py``: (N, 3, 32, 32),
    levels 0..255, train = data_batch_1..5 (50 000), test = test_batch (10 000)."""
    folder = Path(root) / _CIFAR_DIR
    train = [_cifar_batch(folder / name) for name in _CIFAR_TRAIN]
    train_split = (np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train]))
    return _image_data("cifar10", train_split, _cifar_batch(folder / "test_batch"))


def load_images(name: str, root: PathLike | None = None) -> ImageData:
    """Load image data set ``name`` (one of :data:`IMAGES`) with its default split; ``root``
    is required for mnist and cifar10 (digits ships with scikit-learn)."""
    if name == "digits":
        return load_digits()
    if name not in IMAGES:
        raise ValueError(f"unknown image dataset {name!r}; valid names: {', '.join(IMAGES)}")
    if root is None:
        raise ValueError(f"{name} is read from files: pass root (--data-root)")
    return load_mnist(root) if name == "mnist" else load_cifar10(root)
