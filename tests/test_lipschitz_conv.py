"""SpectralConv2d, LipschitzConvNet and lipschitz_bound on them: operator norms checked on dense matrices."""

import pytest
import torch

from impflow.nn import SpectralLinear
from impflow.nn.lipschitz import lipschitz_bound
from impflow.nn.lipschitz_conv import LipschitzConvNet, SpectralConv2d

D = torch.float64


def dense_norm(layer: SpectralConv2d) -> float:
    with torch.no_grad():
        return float(torch.linalg.matrix_norm(layer.operator_matrix(), ord=2))


def train_to_expand(module, x, steps=30, lr=0.05):
    """Adam steps pushing the module's output differences (hence its norm) up."""
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    for _ in range(steps):
        loss = -(module(x) - module(x.roll(1, 0))).pow(2).sum() / (x - x.roll(1, 0)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_operator_norm_bounded_after_aggressive_training(kernel):
    """After 30 Adam steps at lr 0.05 the normalised *operator* (dense matrix) has norm ≤ coeff.

    The warm-started power iteration can lag σ by a few per cent right after large steps;
    ``sync_exact`` (the trainer's periodic check) makes the bound hold exactly and attained
    (the estimate is the operator norm, not the reshaped kernel's).
    """
    layer = SpectralConv2d(2, 6, kernel, (2, 4, 4), coeff=0.9).to(D)
    train_to_expand(layer, torch.randn(64, 2, 4, 4, dtype=D))
    assert dense_norm(layer) <= 0.9 * 1.05
    assert layer.sync_exact() >= 1.0 - 1e-9
    assert dense_norm(layer) <= 0.9 * (1 + 1e-6)
    assert dense_norm(layer) >= 0.9 * (1 - 1e-6)  # training pushed the raw norm above coeff
    kernel_norm = float(torch.linalg.matrix_norm(layer.normalized_weight().detach().flatten(1), ord=2))
    if kernel > 1:
        assert abs(kernel_norm - 0.9) > 1e-3  # the kernel matrix's norm is a different number


def test_sigma_converges_to_dense_operator_norm_at_construction():
    layer = SpectralConv2d(3, 5, 3, (3, 5, 4), coeff=10.0).to(D)  # coeff above σ: W̃ = W
    layer.power_iteration(n=2000)
    W = layer.operator_matrix().detach()
    assert torch.equal(layer.normalized_weight(), layer.weight)
    assert float(layer.sigma().detach()) == pytest.approx(float(torch.linalg.matrix_norm(W, ord=2)), rel=1e-9)
    x = torch.randn(2, 3, 5, 4, dtype=D)
    bias = layer.bias.view(1, -1, 1, 1)
    assert torch.allclose(layer(x) - bias, (x.flatten(1) @ W.T).view(2, 5, 5, 4))


def test_weights_fixed_within_a_step_and_refreshed_after_an_update():
    layer = SpectralConv2d(2, 4, 3, (2, 4, 4), n_power_iterations=1)
    w1 = layer.normalized_weight().detach().clone()
    assert torch.equal(w1, layer.normalized_weight().detach())
    u = layer.u.clone()
    with torch.no_grad():
        layer.weight.add_(0.1 * torch.randn_like(layer.weight))
    w2 = layer.normalized_weight().detach()
    assert not torch.equal(layer.u, u)
    assert torch.equal(w2, layer.normalized_weight().detach())


def test_certified_bound_holds_after_aggressive_training():
    g = LipschitzConvNet(2, 8, (2, 4, 4), coeff=0.9).to(D)
    x = torch.randn(64, 2, 4, 4, dtype=D)
    train_to_expand(g, x)
    bound = lipschitz_bound(g)
    assert bound < 1.0
    norms = []
    for xi in x[:16]:
        J = torch.autograd.functional.jacobian(lambda v: g(v.unsqueeze(0)).flatten(), xi).flatten(1)
        norms.append(float(torch.linalg.matrix_norm(J, ord=2)))
    assert max(norms) <= bound + 1e-12
    assert max(norms) > 0.3  # training did push g to expand


def test_bound_is_product_of_exact_norms_over_convs_and_linears():
    conv = SpectralConv2d(1, 2, 3, (1, 3, 3), coeff=0.8)
    lin = SpectralLinear(18, 4, coeff=0.7)
    net = torch.nn.Sequential(conv, torch.nn.Tanh(), torch.nn.Flatten(), lin).to(D)
    expected = dense_norm(conv) * float(torch.linalg.matrix_norm(lin.normalized_weight().detach(), ord=2))
    assert lipschitz_bound(net) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(TypeError, match="not Lipschitz-constrained"):
        lipschitz_bound(torch.nn.Sequential(conv, torch.nn.Conv2d(2, 2, 1)))
    with pytest.raises(TypeError, match="no spectrally normalised"):
        lipschitz_bound(torch.nn.Tanh())


def test_conv_net_shapes_and_bad_arguments():
    g = LipschitzConvNet(3, 8, (3, 4, 6), kernels=(3, 1, 3))
    assert g.event_shape == (3, 4, 6)
    assert g(torch.randn(2, 3, 4, 6)).shape == (2, 3, 4, 6)
    with pytest.raises(ValueError, match="normalised for inputs"):
        g(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="odd"):
        SpectralConv2d(1, 1, 2, (1, 4, 4))
    with pytest.raises(ValueError, match="input_shape"):
        LipschitzConvNet(3, 8, (2, 4, 4))
    with pytest.raises(ValueError, match="coeff"):
        LipschitzConvNet(3, 8, (3, 4, 4), coeff=1.0)
    with pytest.raises(ValueError, match="unknown activation"):
        LipschitzConvNet(3, 8, (3, 4, 4), activation="relu")


@pytest.mark.parametrize("kernel", [1, 3])
def test_operator_norm_is_the_dense_operators(kernel):
    """A 1×1 convolution's norm is taken from its (C', C) matrix (I_HW ⊗ W̃); it must equal the
    dense operator's, as the SVD of the dense matrix gives for other kernels."""
    conv = SpectralConv2d(3, 5, kernel, (3, 4, 4), coeff=10.0).to(D)
    with torch.no_grad():
        conv.weight.mul_(3)
    assert conv.operator_norm() == pytest.approx(dense_norm(conv), rel=1e-12)
