import numpy as np
import pytest
import torch

from impflow.data import from_array


def data(n: int = 100, d: int = 3) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, d)) * [1.0, 10.0, 0.1] + [0.0, 5.0, -3.0]


def test_split_sizes_shuffle_and_train_statistics():
    x = data()
    d = from_array(x, seed=1)
    assert d.name == "array" and d.dim == 3 and (len(d.train), len(d.val), len(d.test)) == (81, 9, 10)
    perm = np.random.default_rng(1).permutation(100)
    train = x[perm[:81]]
    np.testing.assert_allclose(d.mean.numpy(), train.mean(0), rtol=1e-12)
    np.testing.assert_allclose(d.std.numpy(), train.std(0), rtol=1e-12)
    expected_test = (x[perm[90:]] - train.mean(0)) / train.std(0)
    np.testing.assert_allclose(d.test.double().numpy(), expected_test, atol=1e-5)
    assert torch.equal(from_array(x, seed=1).train, d.train)
    assert not torch.equal(from_array(x, seed=2).train, d.train)


def test_ordered_split_and_raw_option():
    x = data()
    d = from_array(torch.from_numpy(x), val_fraction=0.2, test_fraction=0.3, seed=None, standardize=False)
    assert (len(d.train), len(d.val), len(d.test)) == (56, 14, 30)
    np.testing.assert_allclose(d.test.numpy(), x[70:].astype(np.float32))
    assert torch.equal(d.std, torch.ones(3, dtype=torch.float64))


def test_files_npy_and_csv(tmp_path):
    x = data()
    np.save(tmp_path / "mine.npy", x)
    np.savetxt(tmp_path / "plain.csv", x, delimiter=",")
    np.savetxt(tmp_path / "header.csv", x, delimiter=",", header="a,b,c", comments="")
    ref = from_array(x)
    for name in ("mine.npy", "plain.csv", "header.csv"):
        d = from_array(tmp_path / name)
        assert d.name == name.split(".")[0]
        np.testing.assert_allclose(d.train.numpy(), ref.train.numpy(), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        from_array(tmp_path / "missing.npy")
    (tmp_path / "x.txt").write_text("1,2\n")
    with pytest.raises(ValueError, match="unsupported"):
        from_array(tmp_path / "x.txt")


def test_non_finite_rows_are_refused(tmp_path):
    x = data()
    x[[4, 17], 1] = np.nan
    x[50, 0] = np.inf
    with pytest.raises(ValueError, match=r"3 of 100 rows .*\[4, 17, 50\]"):
        from_array(x)
    (tmp_path / "gaps.csv").write_text("a,b\n1,2\n3,\n5,6\n")
    with pytest.raises(ValueError, match=r"1 of 3 rows .*\[1\]"):
        from_array(tmp_path / "gaps.csv")


def test_constant_column_and_shapes():
    x = data()
    x[:, 2] = 0.1
    with pytest.warns(UserWarning, match=r"columns \[2\] are constant"):
        d = from_array(x)
    assert d.std[2] == 1.0 and d.train[:, 2].abs().max() < 1e-12 and torch.isfinite(d.test).all()
    assert from_array(np.arange(50.0)).dim == 1
    with pytest.raises(ValueError, match="shape"):
        from_array(np.zeros((4, 2, 2)))
    with pytest.raises(ValueError, match="numeric"):
        from_array(np.array([["a", "b"]]))
    with pytest.raises(ValueError, match="no rows"):
        from_array(np.zeros((0, 2)))
    with pytest.raises(ValueError, match="test_fraction"):
        from_array(x, test_fraction=1.0)


def test_unreadable_files_name_the_problem(tmp_path):
    (tmp_path / "bad.csv").write_text("a,b,c\n1,2,3\n4,five,6\n7,,9\n")
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "text.npy").write_text("hello\n")
    (tmp_path / "folder.npy").mkdir()
    for name, message in [("bad.csv", "line 3: 'five' is not a number"), ("empty.npy", "not a readable numeric .npy"),
                          ("text.npy", "not in the .npy format"), ("folder.npy", "is not a file")]:
        with pytest.raises(ValueError, match=message):
            from_array(tmp_path / name)
