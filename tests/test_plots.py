import contextlib

import numpy as np
import pytest
import torch

from impflow import Flow
from impflow.data import toy2d
from impflow.plots import (
    density_grid,
    plot_density,
    plot_samples,
    plot_training_curve,
    plot_true_density,
)
from impflow.transforms.normalization import ActNorm

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def gaussian_flow() -> Flow:
    """x ~ N(-b, diag(exp(-2s))) through ActNorm: an asymmetric density with a known log p."""
    flow = Flow(ActNorm(2), event_shape=2)
    with torch.no_grad():
        flow.transform.bias.copy_(torch.tensor([0.7, -0.4]))
        flow.transform.log_scale.copy_(torch.tensor([0.3, -0.2]))
    flow.transform.initialized.fill_(True)
    return flow.eval()


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_density_grid_integrates_to_one_and_is_oriented():
    flow = gaussian_flow()
    xx, yy, logp = density_grid(flow, bounds=(-8, 8), n=301)
    assert xx.shape == yy.shape == logp.shape == (301, 301)
    assert xx[0, 1] > xx[0, 0] and yy[1, 0] > yy[0, 0]  # columns are x, rows are y
    mass = np.trapezoid(np.trapezoid(np.exp(logp), xx[0], axis=1), yy[:, 0])
    assert abs(mass - 1) < 0.01
    for i, j in [(0, 0), (10, 250), (200, 40), (150, 151)]:
        expected = flow.log_prob(torch.tensor([[xx[i, j], yy[i, j]]], dtype=torch.float32)).item()
        assert logp[i, j] == pytest.approx(expected, abs=1e-5)


def test_density_grid_chunks_context_and_mode():
    flow = Flow(ActNorm(2), event_shape=2)  # training mode, ActNorm not yet initialised
    entered = []

    @contextlib.contextmanager
    def context():
        entered.append(torch.is_grad_enabled())
        yield

    _, _, whole = density_grid(flow, n=20)
    _, _, chunked = density_grid(flow, n=20, chunk_size=7, context=context)
    np.testing.assert_array_equal(whole, chunked)
    assert entered == [False]  # entered once, inside no_grad
    assert flow.training and not bool(flow.transform.initialized)  # eval for the grid, mode restored


def test_plot_density_and_true_density(tmp_path):
    assert_png(plot_density(gaussian_flow(), tmp_path / "model.png", bounds=(-5, 5), n=50, title="ActNorm"))
    assert_png(plot_true_density("checkerboard", tmp_path / "sub" / "true.png", n=50))
    with pytest.raises(ValueError, match="no exact density"):
        plot_true_density("moons", tmp_path / "moons.png")


def test_plot_samples(tmp_path):
    data = toy2d.sample("8gaussians", 500, seed=0)
    path = plot_samples(gaussian_flow().sample(500).detach(), data.numpy(), tmp_path / "samples.png")
    assert path == tmp_path / "samples.png"
    assert_png(path)
    with pytest.raises(ValueError, match=r"expected \(N, 2\)"):
        plot_samples(torch.zeros(5, 3), data, tmp_path / "bad.png")


def test_plot_training_curve(tmp_path):
    history = [{"step": s, "loss": 5.0 / (1 + s), "lr": 1e-3} for s in range(0, 100, 5)]
    for rec in history[::4]:
        rec["val_nll"] = rec["loss"] + 0.1
    assert_png(plot_training_curve(history, tmp_path / "curve.png", reference={"entropy": 0.5}))
    assert_png(plot_training_curve([{"loss": 1.0}, {"loss": 0.5}], tmp_path / "no_step.png"))
    with pytest.raises(ValueError, match="lr"):
        plot_training_curve([{"step": 0, "lr": 1e-3}], tmp_path / "empty.png")
