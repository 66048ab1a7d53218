import gzip
import math
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from impflow import Compose, Flow, StandardNormal
from impflow.data import IMAGES, ImageData, Preprocess, bits_per_dim, dequantize, load_images
from impflow.data.images import random_hflip, read_idx


@pytest.fixture(scope="module")
def digits() -> ImageData:
    return load_images("digits")


def test_digits_shapes_and_levels(digits):
    assert IMAGES == ("digits", "mnist", "cifar10")
    assert len(digits.train_images) + len(digits.test_images) == 1797
    assert digits.test_images.shape == (359, 1, 8, 8) and digits.shape == (1, 8, 8) and digits.dim == 64
    assert digits.train_images.dtype == torch.uint8 and int(digits.train_images.max()) == 16
    assert digits.levels == 17 and not digits.flip_train
    assert set(digits.train_labels.tolist()) == set(range(10))


def test_dequantization_stays_in_its_bin(digits):
    x, labels = digits.tensors("train", generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and x.shape == digits.train_images.shape
    assert torch.equal(labels, digits.train_labels)
    assert x.min() >= 0 and x.max() < 1
    assert torch.equal(torch.floor(x.double() * 17).to(torch.uint8), digits.train_images)
    mid, _ = digits.tensors("test", dequantize=False)
    assert torch.equal(mid, (digits.test_images.float() + 0.5) / 17)
    top = dequantize(torch.full((10_000,), 255), 256)
    assert top.min() >= 255 / 256 and top.max() < 1  # the float32 round-up to 1 is clamped

    x0, y0 = digits.dataset("test")[3]
    assert x0.shape == (1, 8, 8) and y0 == int(digits.test_labels[3])
    assert torch.equal(torch.floor(x0.double() * 17).to(torch.uint8), digits.test_images[3])


def test_random_hflip_flips_whole_images():
    x = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).reshape(2, 3, 2, 4).repeat(20, 1, 1, 1)
    y = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = (y == x.flip(-1)).flatten(1).all(1)
    assert torch.all(flipped | (y == x).flatten(1).all(1)) and 0 < int(flipped.sum()) < len(x)


def test_bits_per_dim_hand_computation():
    # 1 pixel, K = 4, a model constant on each bin with heights h (∫ = 1): P(bin k) = h_k / K
    h = torch.tensor([0.4, 0.8, 1.2, 1.6], dtype=torch.float64)
    bpd = bits_per_dim(torch.log(h), torch.zeros(4, dtype=torch.float64), dim=1, levels=4)
    torch.testing.assert_close(bpd, -torch.log2(h / 4))
    # general formula: −(log p + ladj − D ln K) / (D ln 2)
    got = bits_per_dim(torch.tensor([-100.0]), torch.tensor([20.0]), dim=64, levels=17)
    assert got.item() == pytest.approx((100 - 20 + 64 * math.log(17)) / (64 * math.log(2)))


@pytest.mark.parametrize("alpha", [None, 0.05, 1e-6])
def test_uniform_model_scores_log2_levels(alpha):
    """The uniform density on [0, 1)^D, seen in the logit space, gives exactly log₂ K."""
    pre = Preprocess(levels=256, alpha=alpha)
    x = dequantize(torch.randint(0, 256, (5, 3, 4, 4)), 256).double()

    def uniform_in_y(y: torch.Tensor) -> torch.Tensor:
        # density of y = logit(α + (1 − 2α)x) for x uniform: Π σ'(y) / (1 − 2α)
        if alpha is None:
            return y.new_zeros(len(y))
        log_sig_prime = -F.softplus(-y) - F.softplus(y)
        return log_sig_prime.flatten(1).sum(1) - y[0].numel() * math.log(1 - 2 * alpha)

    bpd = pre.bits_per_dim(uniform_in_y, x)
    torch.testing.assert_close(bpd, torch.full((5,), 8.0, dtype=torch.float64))


def test_preprocess_log_det_and_inverse(digits):
    pre = digits.preprocess()
    assert isinstance(pre, Preprocess) and pre.levels == 17
    x = digits.tensors("test")[0][:4].double().requires_grad_(True)
    y, ladj = pre(x)
    (grad,) = torch.autograd.grad(y.sum(), x)  # elementwise map: diagonal Jacobian
    torch.testing.assert_close(ladj, grad.abs().log().flatten(1).sum(1))
    torch.testing.assert_close(pre.inverse(y), x)
    # as a flow's first transform, ladj is inside log_prob: the same bits/dim
    base = StandardNormal(digits.shape)
    inside = bits_per_dim(Flow(Compose(pre), base).log_prob(x), torch.zeros(4), digits.dim, digits.levels)
    torch.testing.assert_close(inside, pre.bits_per_dim(base.log_prob, x))


# ----------------------------------------------------------------------------- MNIST (IDX)


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_mnist(folder, n_train: int = 6, n_test: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write_idx(folder / name, array)
    return arrays


@pytest.mark.parametrize("layout", [(), ("MNIST", "raw")])
def test_mnist_idx(tmp_path, layout):
    arrays = write_mnist(tmp_path.joinpath(*layout))
    d = load_images("mnist", tmp_path)
    assert d.train_images.shape == (6, 1, 28, 28) and d.test_images.shape == (4, 1, 28, 28)
    assert np.array_equal(d.train_images[:, 0].numpy(), arrays["train-images-idx3-ubyte.gz"])
    assert np.array_equal(d.test_labels.numpy(), arrays["t10k-labels-idx1-ubyte.gz"])
    assert d.levels == 256 and d.logit_alpha == 1e-6 and not d.flip_train


def test_mnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "train-images-idx3-ubyte")):
        load_images("mnist", tmp_path)
    (tmp_path / "bad").write_bytes(bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 1) + b"\0\0\0\0")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros(5))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "short")
    with pytest.raises(ValueError, match="root"):
        load_images("mnist")


# ----------------------------------------------------------------------------- CIFAR-10 (pickles)


def write_cifar(root, per_batch: int = 2) -> tuple[np.ndarray, list[int]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    all_data, all_labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": [b"x"] * per_batch}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        all_data.append(data)
        all_labels += labels
    return np.concatenate(all_data), all_labels


def test_cifar10_batches_and_flips(tmp_path):
    data, labels = write_cifar(tmp_path)
    d = load_images("cifar10", tmp_path)
    assert d.train_images.shape == (10, 3, 32, 32) and d.test_images.shape == (2, 3, 32, 32)
    # rows hold the red plane, then green, then blue, each row-major 32×32
    assert np.array_equal(d.train_images[3, 1].numpy(), data[3, 1024:2048].reshape(32, 32))
    assert d.train_labels.tolist() == labels[:10] and d.test_labels.tolist() == labels[10:]
    assert d.flip_train and d.levels == 256 and d.logit_alpha == 0.05

    x, _ = d.tensors("train", dequantize=False, generator=torch.Generator().manual_seed(1))
    mid = (d.train_images.float() + 0.5) / 256
    flipped = (x == mid.flip(-1)).flatten(1).all(1)
    assert torch.all(flipped | (x == mid).flatten(1).all(1))
    assert torch.equal(d.tensors("test", dequantize=False)[0], (d.test_images.float() + 0.5) / 256)
    assert d.dataset("train").hflip and not d.dataset("test").hflip
    assert not d.dataset("train", hflip=False).hflip
    with pytest.raises(ValueError, match="training split only"):
        d.dataset("test", hflip=True)


def test_cifar10_missing_batch(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "cifar-10-batches-py" / "data_batch_4")):
        load_images("cifar10", tmp_path)
