import json
import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from impflow.theory import gaussian_nll, ppca_nll


def mixing(d: int, seed: int) -> torch.Tensor:
    return torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def correlated_data(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """n draws of N(arange(d), A Aᵀ), A = mixing(d, seed)."""
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(seed + 1000), dtype=torch.float64)
    return z @ mixing(d, seed).T + torch.arange(d, dtype=torch.float64)


def minimise(loss_fn, params: list[torch.Tensor]) -> float:
    opt = torch.optim.LBFGS(
        params, lr=1, max_iter=2000, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)
    return loss_fn().item()


def test_gaussian_optimum_matches_brute_force_affine_fit():
    x = correlated_data(40, 3)
    mean = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    raw = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)  # Cholesky factor, log-diagonal

    def nll():
        tril = torch.tril(raw, -1) + torch.diag(torch.exp(torch.diagonal(raw)))
        return -MultivariateNormal(mean, scale_tril=tril).log_prob(x).mean()

    brute = minimise(nll, [mean, raw])
    assert gaussian_nll(x)["nll"] == pytest.approx(brute, abs=1e-6)


def test_closed_form_and_held_out_nll():
    train, test = correlated_data(200, 4, seed=1), correlated_data(50, 4, seed=2)
    r = gaussian_nll(train, test)
    cov = torch.cov(train.T, correction=0)
    lam = torch.linalg.eigvalsh(cov)
    assert r["nll"] == pytest.approx(0.5 * torch.log(2 * math.pi * math.e * lam).sum().item(), abs=1e-10)
    per = -MultivariateNormal(train.mean(0), covariance_matrix=cov).log_prob(test)
    assert r["test_nll"] == pytest.approx(per.mean().item(), abs=1e-10)
    assert r["test_nll_se"] == pytest.approx(per.std().item() / math.sqrt(50), abs=1e-10)
    for key in ("nll", "test_nll", "test_nll_se"):
        assert r[f"{key}_bits"] == pytest.approx(r[key] / math.log(2), abs=1e-12)
    assert (r["dim"], r["n_train"], r["n_test"], r["n_floored"]) == (4, 200, 50, 0)
    json.dumps(r)  # plain numbers only


def test_held_out_nll_of_true_gaussian_is_its_entropy():
    d, n = 3, 20_000
    x = correlated_data(2 * n, d, seed=3)
    r = gaussian_nll(x[:n], x[n:])
    a = mixing(d, seed=3)
    entropy = 0.5 * torch.logdet(2 * math.pi * math.e * a @ a.T).item()
    assert abs(r["test_nll"] - entropy) < 4 * r["test_nll_se"]
    assert abs(r["nll"] - entropy) < 4 * r["test_nll_se"]


def test_preprocessing_log_det_makes_the_nll_of_the_raw_data():
    """An invertible affine preprocessing y = a·x + b cannot change the best affine flow: with its
    log-det (D·log a per example) the Gaussian of y scores x exactly as the Gaussian of x does."""
    x = correlated_data(400, 4, seed=5)
    direct = gaussian_nll(x[:300], x[300:])
    y = 3.0 * x - 1.0
    via = gaussian_nll(y[:300], y[300:], test_ladj=torch.full((100,), 4 * math.log(3.0), dtype=x.dtype))
    assert via["test_nll"] == pytest.approx(direct["test_nll"], rel=1e-10)
    assert via["test_nll_se"] == pytest.approx(direct["test_nll_se"], rel=1e-8)
    assert gaussian_nll(y[:300], y[300:])["test_nll"] == pytest.approx(direct["test_nll"] + 4 * math.log(3.0))


def test_images_are_flattened():
    x = correlated_data(30, 12, seed=4)
    assert gaussian_nll(x.reshape(30, 3, 2, 2))["nll"] == pytest.approx(gaussian_nll(x)["nll"], abs=1e-12)


@pytest.mark.parametrize("kind", ["constant", "collinear"])
def test_rank_deficient_data_stay_finite(kind):
    x = correlated_data(100, 3, seed=5)
    extra = torch.full((100, 1), 7.0, dtype=torch.float64) if kind == "constant" else x[:, :1] + x[:, 1:2]
    x = torch.cat([x, extra], dim=1)
    r = gaussian_nll(x, x)
    assert math.isfinite(r["nll"]) and r["n_floored"] == 1
    assert r["nll"] < gaussian_nll(x[:, :3])["nll"]  # a (near-)delta feature only lowers the NLL
    # the training NLL is that of the floored model (up to eigh round-off divided by the floor)
    assert r["test_nll"] == pytest.approx(r["nll"], abs=1e-6)
    assert math.isfinite(ppca_nll(x, 2))
    assert math.isfinite(gaussian_nll(torch.ones(5, 2))["nll"])


def test_ppca_matches_brute_force_fit():
    x, q = correlated_data(60, 4, seed=6), 1
    mean = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    w = torch.full((4, q), 0.5, dtype=torch.float64, requires_grad=True)
    log_s2 = torch.zeros((), dtype=torch.float64, requires_grad=True)

    def nll():
        cov = w @ w.T + torch.exp(log_s2) * torch.eye(4, dtype=torch.float64)
        return -MultivariateNormal(mean, covariance_matrix=cov).log_prob(x).mean()

    brute = minimise(nll, [mean, w, log_s2])
    assert ppca_nll(x, q) == pytest.approx(brute, abs=1e-6)


def test_ppca_is_nested_between_isotropic_and_full_gaussian():
    x = correlated_data(80, 5, seed=7)
    nlls = [ppca_nll(x, q) for q in range(5)]
    assert all(a > b for a, b in zip(nlls, nlls[1:]))
    assert nlls[-1] == pytest.approx(gaussian_nll(x)["nll"], abs=1e-10)
    lam = torch.linalg.eigvalsh(torch.cov(x.T, correction=0))
    assert nlls[0] == pytest.approx(2.5 * math.log(2 * math.pi * math.e * lam.mean().item()), abs=1e-10)


def test_bad_arguments():
    x = correlated_data(10, 3)
    for q in (-1, 3):
        with pytest.raises(ValueError, match="q must"):
            ppca_nll(x, q)
    with pytest.raises(ValueError, match="features"):
        gaussian_nll(x, correlated_data(10, 4))
    with pytest.raises(ValueError, match="ridge"):
        gaussian_nll(x, ridge=0.0)
    with pytest.raises(ValueError, match="expected"):
        gaussian_nll(torch.zeros(5))


def test_gaussian_nll_takes_arrays_and_refuses_non_finite_data():
    import numpy as np

    from impflow.transforms.base import NonFiniteError

    x = np.random.default_rng(0).normal(size=(50, 3))
    assert gaussian_nll(x)["nll"] == pytest.approx(gaussian_nll(torch.from_numpy(x))["nll"], abs=0)
    x[7, 1] = np.nan
    with pytest.raises(NonFiniteError, match=r"train contains NaN or Inf in 1 of 50 rows \(first bad rows: \[7\]\)"):
        gaussian_nll(x)
    with pytest.raises(NonFiniteError, match="test contains NaN"):
        gaussian_nll(torch.randn(50, 3), torch.from_numpy(x))
    y = torch.randn(50, 3)
    assert gaussian_nll(y.tolist(), y, test_ladj=np.zeros(50))["test_nll"] == pytest.approx(gaussian_nll(y, y)["test_nll"])
    with pytest.raises(NonFiniteError, match="test_ladj contains NaN"):
        gaussian_nll(y, y, test_ladj=torch.full((50,), float("nan")))
    with pytest.raises(ValueError, match=r"test_ladj has shape \(50, 1\); expected \(50,\)"):
        gaussian_nll(y, y, test_ladj=torch.zeros(50, 1))
