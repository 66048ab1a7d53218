"""`impflow train --task classify`, image-layout density runs (digits as (1, 8, 8) images), the
evaluation log-det rule (exact up to 64-D, unbiased with its standard error above) and the
ResFlow/ImpFlow tabular preset pairs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import impflow
from impflow import checkpoint
from impflow.config import PRESETS, RunConfig, model_builder, model_kwargs, resolve
from impflow.data.images import Preprocess, bits_per_dim
from impflow.flow import Flow
from impflow.models import LipschitzClassifier
from impflow.train import Trainer
from impflow.train.runs import build_model, dataset, read_run
from conftest import assert_resumes_exactly, eval_json as report, run_cli as run

QUIET = ["--device", "cpu", "--quiet"]
CLASSIFY = ["--task", "classify", "--data", "digits", "--model", "impflow", "--width", "4", "--blocks", "1",
            "--batch-size", "32", "--eval-every", "3", "--log-every", "3", "--lr", "0.01", *QUIET]




# --------------------------------------------------------------------------- classify


def test_classify_round_trip(tmp_path, capsys, no_plots):
    run_dir = tmp_path / "cls"
    code, out, err = run(capsys, "train", "--out", run_dir, "--steps", "6", *CLASSIFY)
    assert code == 0, err
    assert "best val error" in out
    history = json.loads((run_dir / "history.json").read_text())
    assert [r["step"] for r in history] == [3, 6]
    assert all(0 <= r[k] <= 1 for r in history for k in ("val_error", "test_error"))

    rep = report(capsys, run_dir, "--which", "last")
    assert rep["task"] == "classify" and rep["n_test"] == 359 and rep["num_classes"] == 10
    assert rep["test_accuracy"] == pytest.approx(1 - rep["test_error"])
    assert rep["test_error_se"] == pytest.approx(math.sqrt(rep["test_error"] * (1 - rep["test_error"]) / 359))
    assert rep["test_error"] == pytest.approx(history[-1]["test_error"])  # eval = the training record
    model = impflow.load(run_dir, which="last")
    assert rep["params"] == sum(p.numel() for p in model.parameters())
    assert rep["model_kwargs"] == {"block": "impflow", "blocks": 1, "hidden": 4, "width": 4, "coeff": 0.9,
                                   "activation": "lipswish"}
    assert isinstance(model, LipschitzClassifier) and not model.training
    x = dataset(read_run(run_dir)[0], "test", 0)
    assert model(x[:5]).shape == (5, 10) and 0 <= x.min() and x.max() <= 1

    code, out, err = run(capsys, "train", "--out", run_dir, "--resume", "--steps", "9", "--quiet")
    assert code == 0, err
    assert checkpoint.pointer(run_dir, "last")["step"] == 9
    code, _, err = run(capsys, "sample", run_dir, "-n", "4")
    assert code == 2 and "classify run" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("kind, blocks", [("impflow", 1), ("resflow", 2)])
def test_classify_width_list_gives_stages(kind, blocks):
    # --width 4,8: one stage per width, and the per-stage block default of ResNet's basic block
    config = RunConfig.from_dict(dict(task="classify", data="digits", model=kind, width="4,8", device="cpu"))
    kwargs = model_kwargs(config)
    assert kwargs["stages"] == [4, 8] and kwargs["width"] is None and kwargs["blocks"] == blocks
    model = build_model(config, kwargs, {"shape": [1, 8, 8], "num_classes": 10})
    assert model.stage_blocks == [blocks, blocks] and len(model.downsample) == 1
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)
    single = model_kwargs(RunConfig.from_dict(dict(task="classify", data="digits", model=kind, width=[6])))
    assert single["width"] == single["hidden"] == 6 and "stages" not in single and single["blocks"] == 2 * blocks


def test_classify_resumes_exactly(tmp_path):
    config = RunConfig.from_dict(dict(task="classify", data="digits", model="resflow", width=4, blocks=2, steps=8,
                                      batch_size=16, eval_every=3, log_every=2, lr=0.01, device="cpu", quiet=True,
                                      dtype="float64", schedule="constant"))
    assert_resumes_exactly(config, tmp_path, until=5, compare_after=6)


# --------------------------------------------------------------------------- images


def test_digits_image_run_train_eval_sample_plot(tmp_path, capsys):
    run_dir = tmp_path / "img"
    code, out, err = run(capsys, "train", "--out", run_dir, "--data", "digits", "--model", "image-impflow",
                         "--blocks", "1", "--hidden", "4", "--steps", "4", "--batch-size", "16", "--eval-every", "2",
                         "--eval-size", "32", *QUIET)
    assert code == 0, err
    assert "samples.png" in out  # the end-of-training plots include the sample grid
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["data_spec"] == {"shape": [1, 8, 8], "image_shape": [1, 8, 8], "logit_alpha": 0.05}
    assert saved["dim"] == 64

    rep = report(capsys, run_dir)
    assert rep["logdet_eval"] == "exact" and "estimator_se" not in rep
    assert rep["dim"] == 64 and rep["shape"] == [1, 8, 8] and rep["n_test"] == 359
    assert rep["bits_per_dim"] == pytest.approx((rep["test_nll"] + 64 * math.log(17)) / (64 * math.log(2)))
    assert 0 < rep["bits_per_dim"] < 8
    # the best affine flow after the logit step (benchmarks/digits.py: 2.4414 on its own split) beats
    # the one on raw pixels
    assert 2.40 < rep["logit_gaussian_bits_per_dim"] < 2.48 < rep["gaussian_bits_per_dim"]

    npy = tmp_path / "s.npy"
    code, out, err = run(capsys, "sample", run_dir, "-n", "6", "-o", npy)
    assert code == 0, err
    samples = np.load(npy)
    margin = 0.05 / (1 - 2 * 0.05)  # the inverse logit of an alpha-squashed flow reaches this far beyond [0, 1]
    assert samples.shape == (6, 1, 8, 8) and samples.min() >= -margin and samples.max() <= 1 + margin
    assert npy.with_suffix(".png").is_file()

    (run_dir / "plots" / "samples.png").unlink()
    code, out, err = run(capsys, "plot", run_dir)
    assert code == 0 and (run_dir / "plots" / "samples.png").is_file() and "training_curve" in out


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_image_bits_per_dim_include_the_logit_jacobian(tmp_path, capsys, no_plots, dtype):
    """The report's bits/dim = the documented bound with the preprocessing log-det, computed here
    from the inner flow (without the logit) and impflow.data.images.bits_per_dim."""
    run_dir = tmp_path / "glow"
    code, _, err = run(capsys, "train", "--out", run_dir, "--data", "digits", "--model", "glow", "--layout", "image",
                       "--blocks", "1", "--hidden", "8", "--steps", "3", "--batch-size", "32", "--eval-every", "3",
                       "--eval-size", "32", "--dtype", dtype, *QUIET)
    assert code == 0, err
    rep = report(capsys, run_dir)
    assert rep["logdet_eval"] == "closed-form"
    flow = impflow.load(run_dir)
    logit, *rest = flow.transform
    inner = Flow(impflow.Compose(rest), base=flow.base, event_shape=flow.event_shape)
    x = dataset(read_run(run_dir)[0], "test", 0)
    assert x.dtype == getattr(torch, dtype)
    y, ladj = Preprocess(17, alpha=0.05)(x)
    with torch.no_grad():
        bpd = bits_per_dim(inner.log_prob(y), ladj, 64, 17).double().mean().item()
    assert rep["bits_per_dim"] == pytest.approx(bpd, rel=1e-5)
    with torch.no_grad():
        without = bits_per_dim(inner.log_prob(y), torch.zeros_like(ladj), 64, 17).double().mean().item()
    assert abs(without - bpd) > 0.1  # the logit term matters: leaving it out would show


def test_nsf_models_images_through_the_flattened_logits():
    config = RunConfig(data="digits", model="nsf", layout="image", blocks=1, hidden=(8,))
    flow = build_model(config)
    x = torch.rand(3, 1, 8, 8)
    assert flow.log_prob(x).shape == (3,)
    assert flow.sample(2).shape == (2, 1, 8, 8)
    assert torch.allclose(flow.transform.inverse(flow.transform(x)[0]), x, atol=1e-4)


# --------------------------------------------------------------------------- evaluation log-dets


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory):
    """A 70-D ImpFlow run (above the 64-D exact-evaluation limit)."""
    root = tmp_path_factory.mktemp("wide")
    rng = np.random.default_rng(0)
    np.save(root / "wide.npy", rng.normal(size=(300, 70)) @ rng.normal(size=(70, 70)) * 0.3)
    config = RunConfig(data=str(root / "wide.npy"), model="impflow", blocks=1, hidden=(8,), steps=2, batch_size=32,
                       eval_every=2, device="cpu", quiet=True, dtype="float64")
    assert Trainer(config, root / "run").fit().status == "done"
    return root / "run"


def test_above_64_dims_eval_uses_the_unbiased_estimator_with_its_se(wide_run, capsys):
    rep = report(capsys, wide_run, "--repeats", "3")
    assert rep["dim"] == 70 and rep["logdet_eval"] == "unbiased" and rep["estimator_passes"] == 3
    assert rep["estimator_se"] > 0 and rep["test_nll_se_data"] > 0
    assert rep["test_nll_se"] == pytest.approx(math.hypot(rep["test_nll_se_data"], rep["estimator_se"]))
    assert math.isfinite(rep["test_nll"])
    again = report(capsys, wide_run, "--repeats", "3")
    assert again["test_nll"] == rep["test_nll"]  # seeded: reproducible
    assert "--repeats 2" not in rep["logdet_eval_note"]
    once = report(capsys, wide_run, "--repeats", "1")
    assert once["estimator_se"] is None and "--repeats 2 or more" in once["logdet_eval_note"]
    history = json.loads((wide_run / "history.json").read_text())
    assert "val_nll" in history[-1] and "volume" not in history[-1]  # no exact per-block log-dets at 70-D


def test_unbiased_evaluation_agrees_with_exact(tmp_path, capsys, no_plots):
    rng = np.random.default_rng(1)
    np.save(tmp_path / "x.npy", rng.normal(size=(500, 4)) @ rng.normal(size=(4, 4)))
    code, _, err = run(capsys, "train", "--out", tmp_path / "run", "--data", tmp_path / "x.npy", "--model", "resflow",
                       "--blocks", "2", "--hidden", "16", "--steps", "20", "--batch-size", "64", "--eval-every", "10",
                       "--dtype", "float64", *QUIET)
    assert code == 0, err
    exact = report(capsys, tmp_path / "run")
    unbiased = report(capsys, tmp_path / "run", "--logdet", "unbiased", "--repeats", "8")
    assert exact["logdet_eval"] == "exact" and unbiased["logdet_eval"] == "unbiased"
    # the same test points: only the estimator's noise separates them
    assert abs(unbiased["test_nll"] - exact["test_nll"]) < 4 * unbiased["estimator_se"]
    assert unbiased["estimator_se"] < 0.5 * unbiased["test_nll_se_data"]


# --------------------------------------------------------------------------- presets and config


TABULAR_DIMS = {"power": 6, "gas": 8, "hepmass": 21, "miniboone": 43, "bsds300": 63, "tabular-smoke": 5}


@pytest.mark.parametrize("name", list(TABULAR_DIMS))
def test_resflow_presets_have_twice_the_blocks_and_equal_parameters(name):
    def build(preset):
        config, _ = resolve(preset, flags={"data_root": "unused"} if name != "tabular-smoke" else {"data": "x.npy"})
        flow = model_builder(config.model)(dim=TABULAR_DIMS[name], **model_kwargs(config))
        networks = sum(p.numel() for m in flow.modules() if isinstance(m, impflow.LipschitzMLP) for p in m.parameters())
        return config, sum(p.numel() for p in flow.parameters()), networks

    imp, n_imp, nets_imp = build(name)
    res, n_res, nets_res = build(f"{name}-resflow")
    assert (imp.model, res.model) == ("impflow", "resflow")
    assert res.blocks == 2 * imp.blocks and res.hidden == imp.hidden
    assert nets_res == nets_imp > 0  # the same networks; only the ActNorms between blocks differ
    # within 2% in total (the smoke preset's 16-wide networks: its one extra 5-D ActNorm is 2.6%)
    assert abs(n_res - n_imp) <= (0.02 if name != "tabular-smoke" else 0.03) * n_imp
    settings = {k: v for k, v in PRESETS[name][1].items() if k not in ("model", "blocks")}
    assert settings == {k: v for k, v in PRESETS[f"{name}-resflow"][1].items() if k not in ("model", "blocks")}


def test_preset_texts_quote_the_paper():
    for name, imp, res in (("power", "0.30", "0.26"), ("gas", "6.94", "6.20"), ("hepmass", "-18.52", "-18.91"),
                           ("miniboone", "-21.50", "-21.81"), ("bsds300", "113.72", "104.63")):
        for preset in (name, f"{name}-resflow"):
            text = PRESETS[preset][0]
            assert f"ImpFlow {imp} nats" in text and f"ResFlow {res} nats" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--task", "classify", "--data", "moons"], "--task classify needs image data"),
        (["--task", "classify", "--data", "digits", "--model", "glow"], "takes --model resflow or impflow"),
        (["--task", "classify", "--data", "digits", "--logdet", "exact"], "density runs only"),
        (["--task", "nope"], "unknown task 'nope'"),
        (["--data", "digits", "--model", "image-impflow", "--layout", "vector"], "needs image data in the image"),
        (["--data", "moons", "--layout", "image"], "layout applies to image data"),
        (["--data", "digits", "--layout", "image", "--logit-alpha", "0.7"], "logit_alpha must lie in (0, 0.5)"),
        (["--data", "digits", "--width", "8"], "width applies to --task classify only"),
        (["--data", "mnist"], "needs --data-root"),
        (["--data", "mnist", "--data-root", "{tmp}"], "mnist: expected"),
    ],
)
def test_bad_task_settings_are_one_line_exit_2(tmp_path, capsys, argv, message):
    code, _, err = run(capsys, "train", "--out", tmp_path / "r", *[a.format(tmp=tmp_path) for a in argv], *QUIET)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- mnist / cifar10 files


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _fake_mnist(root, n_train=40, n_test=12) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, size=(n, 28, 28)))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)


def _fake_cifar10(root, n=12) -> None:
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, size=(n, 3072)).astype(np.uint8), b"labels": list(np.arange(n) % 10)}
        (folder / name).write_bytes(pickle.dumps(batch))


@pytest.mark.parametrize("data", ["mnist", "cifar10"])
def test_classify_and_density_read_image_files_from_data_root(tmp_path, capsys, no_plots, data):
    (_fake_mnist if data == "mnist" else _fake_cifar10)(tmp_path)
    shape = [1, 28, 28] if data == "mnist" else [3, 32, 32]
    common = ["--data", data, "--data-root", tmp_path, "--steps", "2", "--batch-size", "4", "--eval-every", "2", *QUIET]
    code, _, err = run(capsys, "train", "--out", tmp_path / "cls", "--task", "classify", "--model", "resflow",
                       "--width", "4", "--blocks", "1", *common)
    assert code == 0, err
    rep = report(capsys, tmp_path / "cls")
    assert rep["shape"] == shape and rep["n_test"] == 12 and 0 <= rep["test_error"] <= 1
    if data == "cifar10":
        return  # a density run's report fits a 3072-D Gaussian baseline: seconds; mnist covers that path

    code, _, err = run(capsys, "train", "--out", tmp_path / "flow", "--model", "glow", "--blocks", "1", "--hidden", "4",
                       *common)
    assert code == 0, err
    rep = report(capsys, tmp_path / "flow")
    assert rep["shape"] == shape and rep["dim"] == math.prod(shape) and rep["logdet_eval"] == "closed-form"
    assert math.isfinite(rep["bits_per_dim"])
    assert json.loads((tmp_path / "flow" / "config.json").read_text())["data_spec"]["logit_alpha"] == 1e-6
