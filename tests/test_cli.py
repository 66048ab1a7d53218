"""The ``impflow`` command, run in-process through ``impflow.cli.main`` (and once as a subprocess)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest

import impflow
from impflow import Flow, checkpoint
from impflow.cli import main
from impflow.train import Trainer
from conftest import run_cli as run

TINY = ["--blocks", "1", "--hidden", "16", "--batch-size", "64", "--eval-size", "256",
        "--eval-every", "10", "--log-every", "5", "--device", "cpu", "--quiet"]
PLOTS = {"density", "samples", "training_curve", "true_density"}


def test_round_trip(tmp_path, capsys, request):
    run_dir = tmp_path / "run"
    code, out, err = run(capsys, "train", "--out", run_dir, "--steps", "20", *TINY)
    assert code == 0, err
    assert f"trained {run_dir} to step 20" in out
    for name in ("config.json", "history.json", "last.json", "best.json"):
        assert (run_dir / name).is_file()
    assert {p.stem for p in (run_dir / "plots").glob("*.png")} == PLOTS

    code, out, err = run(capsys, "eval", run_dir, "-n", "500")
    report = json.loads(out)
    assert code == 0 and report["n_test"] == 500 and report["step"] in (10, 20)
    for key in ("test_nll", "test_nll_se", "test_nll_bits", "test_nll_se_bits", "entropy", "entropy_bits",
                "gaussian_nll", "gap_to_entropy", "gap_to_gaussian", "gap_to_gaussian_bits", "params",
                "eval_seconds", "train_seconds"):
        assert report[key] is not None, key
    assert report["entropy_bits"] == pytest.approx(5.0)
    assert report["gap_to_entropy"] == pytest.approx(report["test_nll"] - report["entropy"])
    assert report["solver"]["solves"] == 1 and report["solver"]["unconverged"] == 0

    samples = tmp_path / "x.npy"
    code, out, _ = run(capsys, "sample", run_dir, "-n", "50", "-o", samples, "--seed", "3")
    assert code == 0 and out.strip() == str(samples)
    assert np.load(samples).shape == (50, 2)

    for png in (run_dir / "plots").glob("*.png"):
        png.unlink()
    code, out, _ = run(capsys, "plot", run_dir)
    assert code == 0
    assert all((run_dir / "plots" / f"{name}.png").is_file() and f"{name}.png" in out for name in PLOTS)

    request.getfixturevalue("no_plots")  # drawn above already
    code, out, err = run(capsys, "train", "--out", run_dir, "--resume", "--steps", "30", "--quiet")
    assert code == 0, err
    assert checkpoint.pointer(run_dir, "last")["step"] == 30
    history = json.loads((run_dir / "history.json").read_text())
    assert [r["step"] for r in history] == [5, 10, 15, 20, 25, 30]
    assert json.loads((run_dir / "config.json").read_text())["config"]["steps"] == 30


def test_module_help_subprocess():
    proc = subprocess.run([sys.executable, "-m", "impflow", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert all(cmd in proc.stdout for cmd in ("train", "eval", "sample", "plot", "demo"))


def test_train_help_documents_presets(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "paper-fig3:" in out and "demo:" in out and "--threads" in out


def test_config_file_and_flag_precedence(tmp_path, capsys, no_plots):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("steps: 4\neval-every: 2\nbatch_size: 32\nhidden: [8]\nblocks: 1\ndata: 8gaussians\n")
    code, _, err = run(capsys, "train", "--out", tmp_path / "run", "--config", cfg, "--steps", "6",
                       "--device", "cpu", "--quiet", "--eval-size", "64")
    assert code == 0, err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["config"]["steps"] == 6 and saved["config"]["data"] == "8gaussians"
    assert saved["model_kwargs"]["hidden"] == [8]


def test_demo_prints_eval_and_plots_and_reruns(tmp_path, capsys, request):
    out_dir = tmp_path / "demo"
    args = ["demo", "--out", out_dir, "--steps", "4", "--eval-every", "2", "--blocks", "1", "--hidden", "8",
            "--batch-size", "32", "--eval-size", "64", "--device", "cpu", "--quiet"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    report = json.loads(out[out.index("{"):out.index("plots:")])
    assert report["model"] == "impflow" and report["data"] == "checkerboard"
    assert "plots:" in out and "density.png" in out
    assert json.loads((out_dir / "config.json").read_text())["config"]["preset"] == "demo"
    request.getfixturevalue("no_plots")
    code, out, err = run(capsys, *args)  # a second `make demo` finds the run finished
    assert code == 0, err


@pytest.mark.parametrize("source", ["flag", "yaml"])
def test_actnorm_switch(tmp_path, capsys, no_plots, source):
    """--actnorm false (or `actnorm: false` in YAML) builds the flow without ActNorm layers."""
    args = ["--actnorm", "false"]
    if source == "yaml":
        (tmp_path / "run.yaml").write_text("actnorm: false\n")
        args = ["--config", tmp_path / "run.yaml"]
    code, _, err = run(capsys, "train", "--out", tmp_path / "run", "--model", "resflow", "--steps", "2",
                       "--eval-every", "2", *args, *TINY)
    assert code == 0, err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model_kwargs"]["actnorm"] is False
    kinds = {type(t).__name__ for t in impflow.load(tmp_path / "run").transform}
    assert "ResidualBlock" in kinds and "ActNorm" not in kinds


@pytest.mark.parametrize("model, flag", [("resflow", ["--actnorm-every", "2"]), ("impflow", ["--inner-actnorm", "true"])])
def test_actnorm_placement_flags(tmp_path, capsys, no_plots, model, flag):
    """--actnorm-every 2 (ResFlow) and --inner-actnorm true (ImpFlow) reach the builder and the saved run."""
    code, _, err = run(capsys, "train", "--out", tmp_path / "run", "--model", model, "--steps", "2",
                       "--eval-every", "2", *flag, *TINY[2:], "--blocks", "2")
    assert code == 0, err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["model_kwargs"]
    assert saved["actnorm_every" if model == "resflow" else "inner_actnorm"] in (2, True)
    flow = impflow.load(tmp_path / "run")
    assert sum(isinstance(m, impflow.ActNorm) for m in flow.modules()) == (2 if model == "resflow" else 5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--out", "{tmp}/r", "--data", "nope"], "unknown dataset 'nope'"),
        (["train", "--out", "{tmp}/r", "--model", "nope"], "unknown model 'nope'"),
        (["train", "--out", "{tmp}/r", "--hidden", "a,b"], "expected comma-separated integers"),
        (["train", "--out", "{tmp}/r", "--preset", "nope"], "invalid choice"),
        (["train", "--out", "{tmp}/r", "--config", "{tmp}/missing.yaml"], "cannot read config file"),
        (["train", "--out", "{tmp}/missing", "--resume"], "does not exist"),
        (["eval", "{tmp}/missing"], "run directory"),
        (["sample", "{tmp}/missing", "-n", "5"], "run directory"),
        (["plot", "{tmp}"], "no config.json"),
        (["train", "--out", "{run}", *TINY], "already holds a run"),
        (["train", "--out", "{run}", "--resume", "--blocks", "2"], "--resume cannot change it"),
        (["train", "--out", "{tmp}/r", "--actnorm", "maybe"], "expected true or false"),
        (["train", "--out", "{tmp}/r", "--model", "maf", "--actnorm", "false"], "has no setting 'actnorm'"),
        (["train", "--out", "{tmp}/r", "--model", "impflow", "--actnorm-every", "2"], "has no setting 'actnorm_every'"),
        (["train", "--out", "{tmp}/r", "--actnorm-every", "0"], "actnorm_every must be at least 1"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, request, argv, message):
    existing = request.getfixturevalue("tiny_run") if "{run}" in argv else None
    code, out, err = run(capsys, *[a.format(tmp=tmp_path, run=existing) for a in argv])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err


def test_incompatible_checkpoint_is_one_line_exit_2(tiny_run, capsys):
    config = json.loads((tiny_run / "config.json").read_text())
    config["model_kwargs"]["hidden"] = [32]
    (tiny_run / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "eval", tiny_run)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "does not fit the model" in err


def test_nan_loss_exit_1_keeps_checkpoint(tmp_path, capsys, monkeypatch, no_plots):
    original = Flow.log_prob
    calls = {"n": 0}

    def poisoned(self, x):
        calls["n"] += self.training
        return original(self, x) * (float("nan") if self.training and calls["n"] == 12 else 1.0)

    monkeypatch.setattr(Flow, "log_prob", poisoned)
    code, _, err = run(capsys, "train", "--out", tmp_path, "--steps", "20", *TINY)
    assert code == 1
    assert err.strip().splitlines() == [err.strip()]
    assert "stopped at step 12: the training loss is nan" in err and "last good checkpoint (step 10)" in err
    assert checkpoint.pointer(tmp_path, "last")["step"] == 10


def test_ctrl_c_exit_130_saves(tmp_path, capsys, monkeypatch):
    step = Trainer._train_step

    def interrupted(self):
        loss = step(self)
        if self.step == 4:
            signal.raise_signal(signal.SIGINT)
        return loss

    monkeypatch.setattr(Trainer, "_train_step", interrupted)
    code, _, err = run(capsys, "train", "--out", tmp_path, "--steps", "20", *TINY)
    assert code == 130 and "interrupted at step 4" in err and "--resume" in err
    assert checkpoint.pointer(tmp_path, "last")["step"] == 4


@pytest.fixture
def tiny_run(tmp_path, capsys, no_plots):
    path = tmp_path / "tiny"
    assert main(["train", "--out", str(path), "--steps", "10", *TINY]) == 0
    capsys.readouterr()
    return path
