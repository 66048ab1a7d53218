import sys

import numpy as np
import pytest
import torch

from impflow.data import TABULAR, TabularData, load_tabular

SPLIT_200 = (162, 18, 20)  # N = 200: test int(0.1·200), val int(0.1·180)


def standardised(a: np.ndarray, train: np.ndarray) -> np.ndarray:
    return (a - train.mean(0)) / train.std(0)


def check_standardised_by_train(d: TabularData, raw_train: np.ndarray) -> None:
    """The statistics are the training split's; every split is mapped with them."""
    np.testing.assert_allclose(d.mean.numpy(), raw_train.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(d.std.numpy(), raw_train.std(0), rtol=1e-12)
    np.testing.assert_allclose(d.train.double().numpy(), standardised(raw_train, raw_train), atol=1e-5)
    assert d.train.dtype == d.val.dtype == d.test.dtype == torch.float32


def test_names():
    assert TABULAR == ("power", "gas", "hepmass", "miniboone", "bsds300")
    with pytest.raises(ValueError, match="valid names"):
        load_tabular("nope", ".")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("power", "power/data.npy"),
        ("gas", "gas/ethylene_CO.pickle"),
        ("hepmass", "hepmass/1000_train.csv"),
        ("miniboone", "miniboone/data.npy"),
        ("bsds300", "BSDS300/BSDS300.hdf5"),
    ],
)
def test_missing_file_names_expected_path(tmp_path, name, expected):
    with pytest.raises(FileNotFoundError) as err:
        load_tabular(name, tmp_path)
    assert str(tmp_path / expected) in str(err.value) and "zenodo.org/record/1161203" in str(err.value)


def maf_power_reference(raw: np.ndarray) -> np.ndarray:
    """MAF's power.py steps, restated: shuffle, delete columns 3 and 1, jitter."""
    rng = np.random.RandomState(42)
    data = raw.copy()
    rng.shuffle(data)
    data = np.delete(np.delete(data, 3, axis=1), 1, axis=1)
    n = len(data)
    voltage, gap, sm = 0.01 * rng.rand(n, 1), 0.001 * rng.rand(n, 1), rng.rand(n, 3)
    return data + np.hstack((gap, voltage, sm, np.zeros((n, 1))))


def test_power_matches_maf_and_standardises_with_train_only(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(200, 8)) * np.arange(1, 9) + 10
    (tmp_path / "power").mkdir()
    np.save(tmp_path / "power" / "data.npy", raw)
    d = load_tabular("power", tmp_path)
    assert d.name == "power" and d.dim == 6
    assert (len(d.train), len(d.val), len(d.test)) == SPLIT_200
    ref = maf_power_reference(raw)
    check_standardised_by_train(d, ref[:162])
    np.testing.assert_allclose(d.test.double().numpy() * d.std.numpy() + d.mean.numpy(), ref[180:], atol=1e-4)
    assert not np.allclose(d.mean.numpy(), ref.mean(0))  # not the full data's statistics

    np.save(tmp_path / "power" / "data.npy", raw[:, :7])
    with pytest.raises(ValueError, match="expected \\(N, 8\\)"):
        load_tabular("power", tmp_path)


def write_gas(tmp_path, pd) -> np.ndarray:
    rng = np.random.default_rng(1)
    s = rng.normal(size=(200, 4))
    sensors = np.column_stack(
        [s[:, 0], s[:, 1], 2 * s[:, 0] + 0.01 * s[:, 2], s[:, 2], -s[:, 1], s[:, 2] + 0.01 * s[:, 3]]
    )
    frame = pd.DataFrame(sensors, columns=[f"s{i}" for i in range(6)])
    frame.insert(0, "Time", np.arange(200.0))
    frame["Meth"], frame["Eth"] = rng.uniform(size=200), rng.uniform(size=200)
    (tmp_path / "gas").mkdir()
    frame.to_pickle(tmp_path / "gas" / "ethylene_CO.pickle")
    return sensors


def test_gas_drops_labels_and_correlated_columns(tmp_path):
    pd = pytest.importorskip("pandas")
    sensors = write_gas(tmp_path, pd)
    d = load_tabular("gas", tmp_path)
    # s0 ~ s2 and s3 ~ s5 (corr > 0.98): the first of each pair goes; s4 = −s1 is kept.
    kept = sensors[:, [1, 2, 4, 5]]
    assert d.dim == 4 and (len(d.train), len(d.val), len(d.test)) == SPLIT_200
    check_standardised_by_train(d, kept[:162])
    np.testing.assert_allclose(d.test.double().numpy(), standardised(kept[180:], kept[:162]), atol=1e-5)


def test_gas_without_pandas_says_so(tmp_path, monkeypatch):
    pd = pytest.importorskip("pandas")
    write_gas(tmp_path, pd)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pandas"):
        load_tabular("gas", tmp_path)


def write_hepmass_csv(path, labels: np.ndarray, features: np.ndarray, extra_column: bool) -> None:
    names = ",".join(["# label", *(f"f{i}" for i in range(features.shape[1] - 1)), "mass"])
    rows = np.column_stack([labels, features] + ([np.zeros(len(labels))] if extra_column else []))
    np.savetxt(path, rows, delimiter=",", header=names, comments="", fmt="%.17g")


def hepmass_features(rng, n: int) -> np.ndarray:
    f = rng.normal(size=(n, 6))
    f[:, 1] = rng.integers(0, 3, n)  # discrete: its minimum repeats → dropped
    f[:10, 5] = 7.0  # a repeated value that is not the minimum: MAF's rule keeps it
    f[:, 3] = np.where(rng.uniform(size=n) < 0.5, -9.0, f[:, 3])  # minimum repeated → dropped
    return np.column_stack([f, np.full(n, 1000.0)])  # constant mass → dropped


@pytest.mark.parametrize("extra_test_column", [False, True])
def test_hepmass_positive_class_and_feature_removal(tmp_path, extra_test_column):
    rng = np.random.default_rng(2)
    (tmp_path / "hepmass").mkdir()
    train_labels, test_labels = np.tile([1.0, 0.0, 1.0], 40), np.tile([0.0, 1.0], 25)
    train_f, test_f = hepmass_features(rng, 120), hepmass_features(rng, 50)
    test_f[test_labels == 0] += 100  # negatives must not enter
    write_hepmass_csv(tmp_path / "hepmass" / "1000_train.csv", train_labels, train_f, False)
    write_hepmass_csv(tmp_path / "hepmass" / "1000_test.csv", test_labels, test_f, extra_test_column)
    d = load_tabular("hepmass", tmp_path)
    kept = [0, 2, 4, 5]
    pos = train_f[train_labels == 1][:, kept]  # 80 rows: validation is the last int(8.0) = 8
    assert d.dim == 4 and (len(d.train), len(d.val), len(d.test)) == (72, 8, 25)
    check_standardised_by_train(d, pos[:72])
    expected_test = standardised(test_f[test_labels == 1][:, kept], pos[:72])
    np.testing.assert_allclose(d.test.double().numpy(), expected_test, atol=1e-5)


def test_miniboone_ordered_split_no_test_leakage(tmp_path):
    rng = np.random.default_rng(3)
    raw = rng.normal(size=(200, 43))
    raw[180:] += 100.0  # a shifted test block: train statistics must not see it
    (tmp_path / "miniboone").mkdir()
    np.save(tmp_path / "miniboone" / "data.npy", raw)
    d = load_tabular("miniboone", tmp_path)
    assert d.dim == 43 and (len(d.train), len(d.val), len(d.test)) == SPLIT_200
    check_standardised_by_train(d, raw[:162])
    np.testing.assert_allclose(d.val.double().numpy(), standardised(raw[162:180], raw[:162]), atol=1e-5)
    assert d.test.mean() > 50  # shifted by ~100/σ: standardised with the train mean only


def test_bsds300_file_splits_raw_by_default(tmp_path):
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(4)
    parts = {key: rng.normal(size=(n, 63)) for key, n in (("train", 30), ("validation", 5), ("test", 7))}
    (tmp_path / "BSDS300").mkdir()
    with h5py.File(tmp_path / "BSDS300" / "BSDS300.hdf5", "w") as f:
        for key, value in parts.items():
            f.create_dataset(key, data=value)
    d = load_tabular("BSDS300", tmp_path)
    assert d.dim == 63 and (len(d.train), len(d.val), len(d.test)) == (30, 5, 7)
    assert torch.all(d.mean == 0) and torch.all(d.std == 1)
    np.testing.assert_allclose(d.test.numpy(), parts["test"].astype(np.float32))
    check_standardised_by_train(load_tabular("bsds300", tmp_path, standardize=True), parts["train"])
