"""Training and evaluating on vector data: .npy files, a UCI set (POWER format), digits."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from impflow.config import PRESETS, ConfigError, RunConfig, resolve
from impflow.train import Trainer
from conftest import assert_resumes_exactly, eval_json as eval_report, run_cli as run

TINY = ["--batch-size", "64", "--eval-every", "5", "--log-every", "5", "--device", "cpu", "--quiet"]


@pytest.fixture(autouse=True)
def _no_plots(no_plots):
    """Only the training curve is drawn for non-2-D data; skip it here (matplotlib is slow)."""


@pytest.fixture
def array_file(tmp_path):
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(5, 5))
    path = tmp_path / "corr.npy"
    np.save(path, rng.normal(size=(300, 5)) @ mixing + 3.0)
    return path


@pytest.mark.parametrize(
    "model_args", [["--model", "impflow", "--blocks", "1", "--hidden", "8"], ["--model", "realnvp", "--blocks", "2"]]
)
def test_array_file_train_then_eval(tmp_path, capsys, array_file, model_args):
    run_dir = tmp_path / "run"
    code, out, err = run(capsys, "train", "--out", run_dir, "--data", array_file, "--steps", "10", *model_args, *TINY)
    assert code == 0, err
    assert json.loads((run_dir / "config.json").read_text())["dim"] == 5
    report = eval_report(capsys, run_dir)
    assert report["dim"] == 5 and report["n_test"] == 30  # the whole test split: int(0.1 * 300)
    assert report["entropy"] is None and math.isfinite(report["test_nll"])
    assert math.isfinite(report["gaussian_nll"]) and math.isfinite(report["gap_to_gaussian"])


def test_digits_bits_per_dim(tmp_path, capsys):
    run_dir = tmp_path / "digits"
    code, out, err = run(capsys, "train", "--out", run_dir, "--data", "digits", "--model", "realnvp",
                         "--steps", "10", "--eval-size", "200", *TINY)
    assert code == 0, err
    report = eval_report(capsys, run_dir)
    assert report["dim"] == 64
    assert report["dequantization_nats"] == pytest.approx(64 * math.log(17))
    bpd = report["bits_per_dim"]
    assert math.isfinite(bpd) and bpd == pytest.approx((report["test_nll"] + 64 * math.log(17)) / (64 * math.log(2)))
    assert math.isfinite(report["gaussian_bits_per_dim"])


def test_digits_batches_are_dequantized_afresh(tmp_path):
    trainer = Trainer(RunConfig(data="digits", model="linear", batch_size=16, device="cpu", quiet=True), tmp_path)
    a, b = trainer._batch(), trainer._batch()
    assert a.shape == (16, 64) and 0 <= a.min() and a.max() < 1
    assert not torch.equal(a, b)
    levels = (a * 17).floor()  # (x + u)/17 -> x
    assert torch.equal(levels, levels.round()) and levels.max() <= 16


def test_power_format_file_with_data_root(tmp_path, capsys):
    rng = np.random.default_rng(0)
    (tmp_path / "power").mkdir()
    np.save(tmp_path / "power" / "data.npy", rng.normal(size=(200, 8)) * np.arange(1, 9) + 10)
    run_dir = tmp_path / "run"
    code, out, err = run(capsys, "train", "--out", run_dir, "--data", "power", "--data-root", tmp_path,
                         "--blocks", "1", "--hidden", "8", "--steps", "10", *TINY)
    assert code == 0, err
    report = eval_report(capsys, run_dir)
    assert report["dim"] == 6 and report["n_test"] == 20 and report["data_root"] == str(tmp_path)
    assert math.isfinite(report["test_nll"])


@pytest.mark.parametrize("data", ["power", "missing.npy"])
def test_missing_data_file_is_one_line_exit_2(tmp_path, capsys, data):
    argv = ["train", "--out", tmp_path / "run", "--data", data, *TINY]
    if data == "power":
        argv += ["--data-root", tmp_path / "nowhere"]
    code, out, err = run(capsys, *argv)
    expected = tmp_path / "nowhere" / "power" / "data.npy" if data == "power" else "missing.npy"
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(expected) in lines[0] and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_config_errors():
    with pytest.raises(ConfigError, match="needs --data-root"):
        RunConfig(data="gas")
    with pytest.raises(ConfigError, match="unknown dataset 'nope'.*npy"):
        RunConfig(data="nope")
    with pytest.raises(ConfigError, match="tabular-smoke needs --data"):
        resolve("tabular-smoke")
    for name, ll in (("power", "0.30"), ("gas", "6.94"), ("hepmass", "-18.52"), ("miniboone", "-21.50"),
                     ("bsds300", "113.72")):
        text, settings = PRESETS[name]
        assert settings["data"] == name and settings["model"] == "impflow" and ll in text


def test_tabular_smoke_preset(tmp_path, capsys, array_file):
    code, out, err = run(capsys, "train", "--out", tmp_path / "run", "--preset", "tabular-smoke",
                         "--data", array_file, "--device", "cpu", "--quiet")
    assert code == 0, err
    assert eval_report(capsys, tmp_path / "run")["dim"] == 5
    # a preset run resumes without restating --preset (an absent flag is not preset=None)
    code, out, err = run(capsys, "train", "--out", tmp_path / "run", "--resume", "--steps", "24", "--quiet")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "last.json").read_text())["step"] == 24


def test_array_run_resumes_exactly(tmp_path, array_file):
    config = RunConfig(data=str(array_file), blocks=1, hidden=(8,), batch_size=32, steps=14, eval_every=5,
                       log_every=3, device="cpu", quiet=True)
    assert_resumes_exactly(config, tmp_path, until=7, compare_after=9)


def test_array_run_from_another_directory_samples_in_data_units(tmp_path, capsys, monkeypatch, array_file):
    """A relative --data is saved absolutely; samples come back in the file's units (the saved
    standardisation), without reading the data; eval adds the NLL in those units."""
    from impflow.data import from_array

    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "train", "--out", "run", "--data", "corr.npy", "--blocks", "1", "--hidden", "8",
                         "--steps", "5", *TINY)
    assert code == 0, err
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    run_dir = tmp_path / "run"
    stats = from_array(array_file)
    report = eval_report(capsys, run_dir)
    assert report["data"] == str(array_file)
    # the unit shift, checked against the best affine flow fitted to the raw file in its own units
    from impflow.theory import gaussian_nll

    raw = from_array(array_file, standardize=False)
    raw_gauss = gaussian_nll(raw.train.double(), raw.test.double())["test_nll"]
    assert report["test_nll_data_units"] - report["test_nll"] == pytest.approx(raw_gauss - report["gaussian_nll"], abs=1e-4)
    array_file.rename(tmp_path / "moved.npy")  # sampling needs only the run
    paths = {}
    for flag in ([], ["--standardized"]):
        paths[bool(flag)] = tmp_path / f"s{len(flag)}.npy"
        code, out, err = run(capsys, "sample", run_dir, "-n", "20", "-o", paths[bool(flag)], *flag)
        assert code == 0 and out.strip() == str(paths[bool(flag)]), err
    z, x = np.load(paths[True]), np.load(paths[False])
    assert x.dtype == np.float64  # a float32 grid could not resolve std << |mean|
    np.testing.assert_allclose(x, z * stats.std.numpy() + stats.mean.numpy(), rtol=1e-12)
    code, out, err = run(capsys, "sample", run_dir, "-n", "5", "-o", tmp_path / "s.csv")
    assert code == 2 and "name a .npy file" in err and not (tmp_path / "s.csv").exists()


def test_paths_are_saved_absolute_with_home_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert RunConfig(data="~/x.npy").data == str(tmp_path / "x.npy")
    assert RunConfig(data="sub/x.csv").data == str(tmp_path / "sub" / "x.csv")
    assert RunConfig(data="power", data_root="~/maf").data_root == str(tmp_path / "maf")
    assert RunConfig(data="moons").data == "moons"  # names are not paths
    with pytest.raises(ConfigError, match="seed must be non-negative"):
        RunConfig(seed=-1)


def test_non_finite_standardised_splits_are_refused_at_loading(tmp_path, capsys):
    """Values finite in the file can overflow float32 once standardised; the loader refuses them
    (so that a non-finite value in training can only come from the model)."""
    x = np.random.default_rng(0).normal(size=(300, 2))
    x[:, 1] *= 1e-30  # tiny spread: a test value of 1e10 standardises beyond float32
    perm = np.random.default_rng(0).permutation(300)  # from_array's shuffle: the last 30 are the test split
    x[perm[-1], 1] = 1e10
    np.save(tmp_path / "wide.npy", x)
    code, out, err = run(capsys, "train", "--out", tmp_path / "run", "--data", tmp_path / "wide.npy", *TINY)
    assert code == 2 and "rows of the standardised test split are NaN or infinite" in err
