"""Jacobian-based Lipschitz estimates and the certified block bounds."""

import pytest
import torch

from impflow import Compose, ImplicitBlock, LipschitzMLP, ResidualBlock
from impflow.nn.lipschitz import SpectralLinear
from impflow.theory import (
    block_jacobian,
    block_lipschitz_bounds,
    estimate_lipschitz,
    jacobian_spectral_norms,
)


def _linear(diag: list[float]) -> SpectralLinear:
    """g(x) = diag(d) x as a SpectralLinear (‖W‖₂ < coeff, so it is not rescaled)."""
    g = SpectralLinear(len(diag), len(diag), coeff=0.99).double()
    with torch.no_grad():
        g.weight.copy_(torch.diag(torch.tensor(diag, dtype=torch.float64)))
        g.bias.zero_()
    return g


def test_bounds_are_attained_by_linear_blocks():
    x = torch.randn(8, 2, dtype=torch.float64)
    res = ResidualBlock(_linear([0.5, -0.5]), event_shape=(2,))
    b = block_lipschitz_bounds(res)
    assert b == pytest.approx({"forward": 1.5, "inverse": 2.0})  # 1 + c, 1/(1 − c)
    assert estimate_lipschitz(res.map, x) == pytest.approx(1.5)
    assert estimate_lipschitz(res.inverse, x) == pytest.approx(2.0)
    # z = (I + W_z)⁻¹(I + W_x) x = diag(1.5/0.2, 0.5/1.8) x
    imp = ImplicitBlock(_linear([0.5, -0.5]), _linear([-0.8, 0.8]), event_shape=(2,))
    b = block_lipschitz_bounds(imp)
    assert b == pytest.approx({"forward": 1.5 / 0.2, "inverse": 1.8 / 0.5})
    assert estimate_lipschitz(lambda t: imp(t)[0], x) == pytest.approx(7.5)
    assert estimate_lipschitz(imp.inverse, x) == pytest.approx(3.6)
    both = block_lipschitz_bounds(Compose(res, imp))
    assert both == pytest.approx({"forward": 1.5 * 7.5, "inverse": 2.0 * 3.6})


@pytest.mark.parametrize("seed", [0, 1])
def test_estimates_below_certified_bounds_for_random_blocks(seed):
    torch.manual_seed(seed)
    mlp = lambda: LipschitzMLP(2, (32, 32), coeff=0.95).double()  # noqa: E731
    x = 2 * torch.randn(256, 2, dtype=torch.float64)
    for block in (ResidualBlock(mlp()), ImplicitBlock(mlp(), mlp())):
        b = block_lipschitz_bounds(block)
        z = block(x)[0].detach()
        assert estimate_lipschitz(lambda t: block(t)[0], x) <= b["forward"]
        assert estimate_lipschitz(block.inverse, z) <= b["inverse"]


def test_estimate_matches_finite_differences_in_1d():
    torch.manual_seed(0)
    block = ImplicitBlock(LipschitzMLP(1, (32,), coeff=0.99).double(), LipschitzMLP(1, (32,), coeff=0.99).double())
    x = torch.linspace(-3, 3, 4001, dtype=torch.float64).unsqueeze(1)
    f = lambda t: block(t)[0]  # noqa: E731  (derivative through the implicit backward)
    norms = jacobian_spectral_norms(f, x)
    with torch.no_grad():
        fd = (f(x).diff(dim=0) / x.diff(dim=0)).abs().flatten()
    assert norms.shape == (4001,)
    assert float(fd.max()) == pytest.approx(float(norms.max()), rel=1e-3)
    assert torch.allclose(fd, (norms[1:] + norms[:-1]) / 2, rtol=1e-3)


def test_inverse_norms_from_the_forward_singular_values():
    """‖J_{f⁻¹}(f(x))‖₂ = 1/σ_min(J_f(x)): the volume monitor's lip_inv without inverse solves."""
    torch.manual_seed(3)
    mlp = lambda: LipschitzMLP(3, (16,), coeff=0.9).double()  # noqa: E731
    x = torch.randn(32, 3, dtype=torch.float64)
    for block in (ResidualBlock(mlp()), ImplicitBlock(mlp(), mlp())):
        sv = torch.linalg.svdvals(block_jacobian(block, x))
        assert torch.allclose(sv[:, 0], jacobian_spectral_norms(block.map, x))
        with torch.no_grad():
            z = block.map(x)
        assert torch.allclose(1 / sv[:, -1], jacobian_spectral_norms(block.inverse, z), rtol=1e-7)


def test_block_jacobian_matches_autograd_through_the_block():
    """Residual, implicit and implicit-with-ActNorm blocks, on vectors and images (float64): the
    Jacobian assembled from the networks' equals autograd through the block's map, with the
    block's output solved for or given."""
    from impflow import ActNorm
    from impflow.nn.lipschitz_conv import LipschitzConvNet

    torch.manual_seed(4)
    mlp = lambda: LipschitzMLP(3, (16,), coeff=0.9).double()  # noqa: E731
    conv = lambda: LipschitzConvNet(2, 4, (2, 2, 2), coeff=0.9).double()  # noqa: E731
    anorm = ActNorm(3).double()
    with torch.no_grad():
        anorm(torch.randn(64, 3, dtype=torch.float64))  # data-dependent init: a non-trivial scale
    cases = [(ResidualBlock(mlp()), (5, 3)), (ImplicitBlock(mlp(), mlp()), (5, 3)),
             (ImplicitBlock(mlp(), mlp(), mid=anorm), (5, 3)),
             (ResidualBlock(conv()), (4, 2, 2, 2)), (ImplicitBlock(conv(), conv()), (4, 2, 2, 2))]
    for block, shape in cases:
        x = torch.randn(shape, dtype=torch.float64)
        ref = torch.stack([torch.autograd.functional.jacobian(lambda v: block.map(v[None])[0], xi).reshape(
            xi.numel(), xi.numel()) for xi in x])
        assert (block_jacobian(block, x) - ref).abs().max() < 1e-8, type(block).__name__
        with torch.no_grad():  # the output, where the caller has it, replaces the solve
            z = block.map(x)
        assert (block_jacobian(block, x, z) - ref).abs().max() < 1e-8, type(block).__name__
    with pytest.raises(TypeError, match="ResidualBlock or an ImplicitBlock"):
        block_jacobian(anorm, torch.randn(2, 3, dtype=torch.float64))
