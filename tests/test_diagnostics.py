"""Diagnostics of seed 003 / DESIGN.md §4: the volume monitor during training, the PPCA curve,
the per-example linear oracle for images, and a linear flow reaching the Gaussian optimum."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import impflow
from impflow import plots, theory
from impflow.config import RunConfig
from impflow.logdet import exact_logdet
from impflow.train import Trainer, plot_run

TINY = dict(blocks=2, hidden=(8,), batch_size=64, eval_size=200, eval_every=3, log_every=3, steps=6,
            device="cpu", quiet=True)


@pytest.mark.parametrize("model", ["impflow", "resflow"])
def test_volume_monitor_records_and_plot(tmp_path, model):
    trainer = Trainer(RunConfig(model=model, **TINY), tmp_path, volume_points=100)
    assert trainer.fit().status == "done"
    evaluated = [r for r in trainer.history if "val_nll" in r]
    assert [r["step"] for r in evaluated] == [3, 6]
    assert all("volume" in r for r in evaluated)
    volume = evaluated[-1]["volume"]
    assert volume["n_points"] == 100 and volume["convergence_warnings"] == 0
    block = "ImplicitBlock" if model == "impflow" else "ResidualBlock"
    assert [v["type"] for v in volume["blocks"].values()] == ["ActNorm", block, "ActNorm", block, "ActNorm"]
    for name, v in volume["blocks"].items():
        assert math.isfinite(v["logdet_mean"]) and v["logdet_std"] >= 0
        if v["type"] == block:
            # estimates are lower bounds of the truth, so at most the certified bounds; and > 0
            assert 0 < v["lip"] <= v["lip_bound"] * (1 + 1e-5), name
            assert 0 < v["lip_inv"] <= v["lip_inv_bound"] * (1 + 1e-5), name
        else:
            assert v["logdet_std"] == pytest.approx(0.0, abs=1e-6) and "lip" not in v
    # the per-block log-dets add up to the whole flow's, on the same points
    x = trainer._val[:100]
    trainer.model.eval()
    with torch.no_grad(), exact_logdet():
        _, ladj = trainer.model.transform(x)
    assert volume["logdet_total_mean"] == pytest.approx(ladj.double().mean().item(), abs=1e-4)

    # no randomness consumed, no state changed: a second call gives the same numbers
    state = torch.get_rng_state()
    again = trainer._volume()
    assert torch.equal(state, torch.get_rng_state())
    assert again["blocks"] == volume["blocks"]

    png = plots.plot_volume(trainer.history, tmp_path / "v.png")
    assert png.stat().st_size > 1000
    paths = plot_run(tmp_path, which="last")
    assert paths["volume"] == tmp_path / "plots" / "diagnostics" / "volume.png" and paths["volume"].is_file()


@pytest.mark.parametrize("model", ["image-resflow", "image-impflow"])
def test_volume_monitor_opens_an_image_flow(tmp_path, model):
    """An image flow's blocks sit inside its multi-scale stack: the monitor reports every layer
    (Logit, ActNorm, the blocks, Squeeze), and their log-dets add up to the flow's."""
    config = RunConfig(model=model, data="digits", blocks=1, hidden=(4,), batch_size=16, eval_size=32,
                       eval_every=2, log_every=2, steps=2, device="cpu", quiet=True)
    trainer = Trainer(config, tmp_path, volume_points=16)
    assert trainer.fit().status == "done"
    volume = trainer.history[-1]["volume"]
    assert volume["convergence_warnings"] == 0
    types = [v["type"] for v in volume["blocks"].values()]
    block = "ImplicitBlock" if model == "image-impflow" else "ResidualBlock"
    assert types[0] == "Logit" and types.count(block) == 3 and {"ActNorm", "Squeeze"} <= set(types)
    parts = sum(v["logdet_mean"] for v in volume["blocks"].values())
    assert parts == pytest.approx(volume["logdet_total_mean"], rel=1e-5)
    assert abs(volume["logdet_total_mean"]) > 1  # the logit step alone changes the volume
    for name, v in volume["blocks"].items():
        if v["type"] == block:
            assert 0 < v["lip"] <= v["lip_bound"] * (1 + 1e-5), name
            assert 0 < v["lip_inv"] <= v["lip_inv_bound"] * (1 + 1e-5), name


def test_volume_monitor_off_and_plot_without_records(tmp_path):
    trainer = Trainer(RunConfig(**TINY | dict(steps=3, blocks=1)), tmp_path, volume_points=0)
    trainer.fit()
    assert all("volume" not in r for r in trainer.history)
    with pytest.raises(ValueError, match="no volume records"):
        plots.plot_volume(trainer.history, tmp_path / "v.png")


# --------------------------------------------------------------------------- per-example linear oracle


def _direct_oracle(img: torch.Tensor, s: int) -> float:
    """Σ_p −log N(x_p; 0, R) with x_p the s×s×C patch at p and R their mean outer product."""
    c, h, w = img.shape
    patches = [
        torch.stack([img[ch, i * s + a, j * s + b] for ch in range(c) for a in range(s) for b in range(s)])
        for i in range(h // s)
        for j in range(w // s)
    ]
    X = torch.stack(patches).double()
    R = X.T @ X / X.shape[0]
    mvn = torch.distributions.MultivariateNormal(torch.zeros(X.shape[1], dtype=torch.float64), covariance_matrix=R)
    return -mvn.log_prob(X).sum().item()


@pytest.mark.parametrize("channels,size,squeeze", [(1, 8, 2), (3, 8, 2), (2, 6, 1), (1, 12, 3)])
def test_linear_oracle_matches_direct_computation(channels, size, squeeze):
    g = torch.Generator().manual_seed(channels * 100 + size)
    mix = torch.randn(channels, channels, generator=g)
    images = torch.einsum("dc,nchw->ndhw", mix, torch.rand(4, channels, size, size, generator=g)) + 0.1
    out = theory.linear_oracle_nll(images, squeeze=squeeze, levels=256)
    direct = torch.tensor([_direct_oracle(im, squeeze) for im in images], dtype=torch.float64)
    torch.testing.assert_close(out["nll"], direct, rtol=1e-8, atol=1e-7)
    d = channels * size * size
    torch.testing.assert_close(out["bits_per_dim"], (direct - d * math.log(256)) / (d * math.log(2)))
    assert out["positions"] == (size // squeeze) ** 2 and out["channels"] == channels * squeeze**2
    assert out["mean_nll"] == pytest.approx(direct.mean().item())
    assert "ORACLE" in out["label"] and "not a model" in out["label"]
    # closed form: (P/2) Σ log(2πe λ_i(R))
    sq = theory.squeeze_images(images[:1].double(), squeeze).reshape(1, channels * squeeze**2, -1)[0]
    lam = torch.linalg.eigvalsh(sq @ sq.T / sq.shape[1])
    assert out["nll"][0].item() == pytest.approx(0.5 * sq.shape[1] * torch.log(2 * math.pi * math.e * lam).sum().item())


def test_linear_oracle_edge_cases():
    zero = torch.zeros(1, 1, 4, 4)
    out = theory.linear_oracle_nll(zero)
    assert torch.isfinite(out["nll"]).all() and out["n_floored"].item() == 4
    plain = theory.linear_oracle_nll(torch.rand(2, 1, 4, 4), levels=None)
    torch.testing.assert_close(plain["bits_per_dim"], plain["nll"] / (16 * math.log(2)))
    with pytest.raises(ValueError, match="divide"):
        theory.linear_oracle_nll(torch.rand(1, 1, 5, 4))
    with pytest.raises(ValueError, match="N, C, H, W"):
        theory.linear_oracle_nll(torch.rand(4, 16))


# --------------------------------------------------------------------------- PPCA curve


def _digits() -> torch.Tensor:
    datasets = pytest.importorskip("sklearn.datasets")
    x = torch.from_numpy(datasets.load_digits().data).double()  # (1797, 64), values 0..16
    g = torch.Generator().manual_seed(0)
    return x + torch.rand(x.shape, generator=g, dtype=torch.float64)  # dequantised: full rank


def _direct_ppca(x: torch.Tensor, q: int) -> float:
    """Mean −log N(x; x̄, W Wᵀ + σ² I) with the Tipping-Bishop ML W = U_q (Λ_q − σ² I)^{1/2}."""
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / x.shape[0]
    lam, U = torch.linalg.eigh(cov)
    lam, U = lam.flip(0), U.flip(1)
    sigma2 = lam[q:].mean()
    W = U[:, :q] * (lam[:q] - sigma2).sqrt()
    C = W @ W.T + sigma2 * torch.eye(x.shape[1], dtype=x.dtype)
    return -torch.distributions.MultivariateNormal(mean, covariance_matrix=C).log_prob(x).mean().item()


def test_ppca_curve_on_digits_against_direct_computation(tmp_path):
    x = _digits()
    curve = theory.ppca_curve(x)
    assert curve["dim"] == 64 and curve["q"] == list(range(64))
    nll = np.array(curve["nll"])
    assert (np.diff(nll) < 0).all()  # more components, better fit
    assert nll[-1] == pytest.approx(theory.gaussian_nll(x)["nll"], rel=1e-10)
    assert curve["gaussian_nll"] == pytest.approx(theory.gaussian_nll(x)["nll"], rel=1e-12)
    for q in (0, 5, 20, 63):
        assert curve["nll"][q] == pytest.approx(theory.ppca_nll(x, q), rel=1e-12)
        assert curve["nll"][q] == pytest.approx(_direct_ppca(x, q), rel=1e-8)
    assert curve["bits_per_dim"][5] == pytest.approx(curve["nll"][5] / (64 * math.log(2)))
    sub = theory.ppca_curve(x, qs=[0, 10])
    assert sub["nll"] == [curve["nll"][0], curve["nll"][10]]
    with pytest.raises(ValueError, match="q must satisfy"):
        theory.ppca_curve(x, qs=[64])
    png = plots.plot_ppca_curve(x, tmp_path / "ppca.png")
    assert png.stat().st_size > 1000


def test_ppca_curve_default_qs_for_large_d():
    x = torch.randn(300, 200, dtype=torch.float64)
    curve = theory.ppca_curve(x)
    assert curve["q"][0] == 0 and curve["q"][-1] == 199 and len(curve["q"]) <= 41
    assert curve["q"] == sorted(set(curve["q"]))


# --------------------------------------------------------------------------- best affine flow


def test_trained_linear_flow_reaches_gaussian_optimum():
    """An ActNorm + LU-linear flow is exactly a Gaussian, so its best training NLL is NLL*."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 5, generator=g, dtype=torch.float64)
    x = torch.randn(1500, 5, generator=g, dtype=torch.float64) @ A.T + torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0])
    x = x + 0.3 * torch.randn(1500, 5, generator=g, dtype=torch.float64) ** 3  # heavier tails: not Gaussian
    target = theory.gaussian_nll(x)["nll"]
    flow = impflow.models.linear(5).double()
    flow.log_prob(x)  # ActNorm's data-dependent initialisation
    opt = torch.optim.LBFGS(flow.parameters(), lr=1, max_iter=300, tolerance_grad=1e-10, tolerance_change=1e-13,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -flow.log_prob(x).mean()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        nll = -flow.log_prob(x).mean().item()
    assert nll >= target - 1e-9  # no affine flow beats the ML Gaussian
    assert nll - target < 0.01
