import pytest
import torch

from impflow.nn import ACTIVATIONS, LipschitzMLP, LipSwish, Sine, SpectralLinear, lipschitz_bound, sync_spectral


def max_jacobian_norm(g, x):
    norms = []
    for xi in x:
        J = torch.autograd.functional.jacobian(lambda v: g(v.unsqueeze(0))[0], xi)
        norms.append(torch.linalg.matrix_norm(J, ord=2))
    return float(torch.stack(norms).max())


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_certified_bound_holds_after_aggressive_training(activation):
    """50 Adam steps at lr 0.05 pushing g to expand; the certified bound must stay < 1."""
    torch.manual_seed(1)
    g = LipschitzMLP(3, (64, 64), coeff=0.97, activation=activation).double()
    opt = torch.optim.Adam(g.parameters(), lr=0.05)
    x = torch.randn(256, 3, dtype=torch.float64)
    for _ in range(50):
        loss = -(g(x) - g(x.roll(1, 0))).pow(2).sum() / (x - x.roll(1, 0)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    bound = lipschitz_bound(g)
    assert bound < 1.0
    layers = [m for m in g.modules() if isinstance(m, SpectralLinear)]
    norm = lambda m: float(torch.linalg.matrix_norm(m.normalized_weight().detach(), ord=2))
    lag = sync_spectral(g)  # the check: exact top singular pairs replace the running estimates
    assert lag >= 1.0 - 1e-9
    assert all(norm(m) <= 0.97 * (1 + 1e-9) for m in layers)
    assert lipschitz_bound(g) <= 0.97**3 * (1 + 1e-9)
    empirical = max_jacobian_norm(g, x[:32])
    assert empirical <= bound + 1e-12
    assert empirical > 0.3  # training did push the network to expand


def test_bound_is_product_of_exact_layer_norms():
    g = LipschitzMLP(4, (8,), coeff=0.9).double()
    layers = [m for m in g.modules() if isinstance(m, SpectralLinear)]
    expected = 1.0
    for m in layers:
        expected *= float(torch.linalg.svdvals(m.normalized_weight().detach())[0])
    assert abs(lipschitz_bound(g) - expected) < 1e-12
    assert expected <= 0.9**2 * (1 + 1e-6)  # orthogonal init: singular values tie to float32 noise


def test_spectral_linear_enforces_coeff_and_leaves_small_weights():
    layer = SpectralLinear(20, 30, coeff=0.5).double()
    assert float(torch.linalg.matrix_norm(layer.normalized_weight().detach(), ord=2)) == pytest.approx(0.5, rel=1e-6)
    with torch.no_grad():
        layer.weight.mul_(1e-3)
    assert torch.allclose(layer.normalized_weight(), layer.weight)


def test_weights_fixed_within_a_step():
    """Repeated calls between optimiser steps see the same normalised weight."""
    layer = SpectralLinear(16, 16, n_power_iterations=1)
    w1 = layer.normalized_weight().detach().clone()
    w2 = layer.normalized_weight().detach().clone()
    assert torch.equal(w1, w2)
    with torch.no_grad():
        layer.weight.add_(0.1 * torch.randn_like(layer.weight))
    w3 = layer.normalized_weight().detach()
    assert not torch.equal(w1, w3)
    assert torch.equal(w3, layer.normalized_weight().detach())


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activations_are_1_lipschitz(name):
    act = ACTIVATIONS[name]().double()
    # LipSwish's β and Sine's ω are learnable: the bound must hold for every value
    raw = {LipSwish: "raw_beta", Sine: "raw_omega"}.get(type(act))
    scales = [0.01, 1.0, 5.0, 50.0] if raw else [None]
    x = torch.linspace(-20, 20, 40001, dtype=torch.float64, requires_grad=True)
    for scale in scales:
        if scale is not None:
            with torch.no_grad():
                getattr(act, raw).copy_(torch.log(torch.expm1(torch.tensor(scale))))
        (d,) = torch.autograd.grad(act(x).sum(), x)
        assert d.abs().max() <= 1.0 + 1e-12


def test_sine_frequency():
    x = torch.linspace(-3, 3, 101, dtype=torch.float64)
    assert torch.allclose(Sine(omega=1.0).double()(x), torch.sin(x), atol=1e-12)
    assert torch.allclose(Sine().double()(x), torch.sin(5 * x) / 5, atol=1e-6)  # ω₀ = 5 (stored in float32)
    with pytest.raises(ValueError, match="omega"):
        Sine(omega=0.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown activation"):
        LipschitzMLP(2, activation="relu6")
    with pytest.raises(ValueError, match="coeff"):
        LipschitzMLP(2, coeff=1.2)
    with pytest.raises(TypeError, match="not Lipschitz-constrained"):
        lipschitz_bound(torch.nn.Sequential(SpectralLinear(2, 2), torch.nn.Linear(2, 2)))


def test_sync_exact_reports_and_removes_estimate_lag():
    torch.manual_seed(3)
    layer = SpectralLinear(32, 32, coeff=0.9, n_power_iterations=1).double()
    with torch.no_grad():  # move the top singular direction somewhere the warm vector is not
        U, S, Vh = torch.linalg.svd(layer.weight)
        layer.weight.copy_(U @ torch.diag(torch.linspace(1, 3, 32, dtype=torch.float64).flip(0)) @ Vh.roll(5, 0))
    layer.max_power_iterations = 1
    lag = layer.sync_exact()
    assert lag > 1.0
    assert float(torch.linalg.matrix_norm(layer.normalized_weight().detach(), ord=2)) == pytest.approx(0.9, rel=1e-12)
    assert layer.sync_exact() == pytest.approx(1.0, rel=1e-12)


def test_sync_spectral_max_entries_skips_large_operators():
    """With ``max_entries`` only layers whose dense operator is at most that large are synced."""
    torch.manual_seed(3)
    small, large = SpectralLinear(2, 3, coeff=0.9).double(), SpectralLinear(20, 30, coeff=0.9).double()
    g = torch.nn.Sequential(small, large)
    for m in (small, large):  # running estimates from an unrelated start
        m.u.copy_(torch.nn.functional.normalize(torch.ones_like(m.u), dim=0))
        m.v.copy_(torch.nn.functional.normalize(torch.ones_like(m.v), dim=0))
    before = large.u.clone()
    sync_spectral(g, max_entries=small.u.numel() * small.v.numel())
    top = lambda m: torch.linalg.svd(m.weight.detach())[0][:, 0]
    assert torch.allclose(small.u.abs(), top(small).abs(), atol=1e-10)
    assert torch.equal(large.u, before)
    sync_spectral(g)
    assert torch.allclose(large.u.abs(), top(large).abs(), atol=1e-10)
