"""Image residual/implicit blocks with LipschitzConvNet, and the multi-scale image_resflow/image_impflow."""

import functools

import pytest
import torch

import impflow.logdet

from impflow import Flow, ImplicitBlock, ResidualBlock
from impflow.models.image import default_image_logdet, image_impflow, image_resflow
from impflow.nn.lipschitz import LipschitzMLP
from impflow.nn.lipschitz_conv import LipschitzConvNet
from conftest import jacobian_logdet

D = torch.float64
BUILDERS = {"resflow": image_resflow, "impflow": image_impflow,
            "impflow-inner-actnorm": functools.partial(image_impflow, inner_actnorm=True)}
SMALL = dict(blocks_per_scale=(1, 1, 1), hidden=8)  # behaviour tests; parity uses the paper's counts


def conv_block(kind, shape=(2, 4, 4)):
    net = lambda: LipschitzConvNet(shape[0], 8, shape, coeff=0.97).to(D)
    return ResidualBlock(net()) if kind == "residual" else ImplicitBlock(net(), net())


@pytest.mark.parametrize("kind", ["residual", "implicit"])
def test_conv_block_round_trip_and_exact_logdet(kind):
    block = conv_block(kind)
    x = 2 * torch.randn(4, 2, 4, 4, dtype=D)
    with torch.no_grad():
        z, _ = block(x)
        x_rec = block.inverse(z)
    assert (x_rec - x).abs().max() < 1e-8
    assert (z - x).abs().max() > 1e-3
    _, ladj = block(x)
    assert (ladj - jacobian_logdet(lambda v: block(v)[0], x)).abs().max() < 1e-8
    _, ladj_inv = block.inverse_and_log_det(x)
    assert (ladj_inv - jacobian_logdet(block.inverse, x)).abs().max() < 1e-8


@pytest.mark.parametrize("elements", [1, 100, 10**9])  # one direction per call, a few, all at once
def test_jacobians_of_vectors_in_chunks_and_of_images(elements, monkeypatch):
    """J and its gradient equal brute-force autograd's: vectors with the batched vjps in any
    chunking, images with one vjp per coordinate."""
    monkeypatch.setattr(impflow.logdet, "CPU_CHUNK_ELEMENTS", elements)
    torch.manual_seed(0)
    cases = [(LipschitzMLP(6, (16,), coeff=0.97).to(D), torch.randn(5, 6, dtype=D, requires_grad=True)),
             (LipschitzConvNet(2, 8, (2, 4, 4), coeff=0.97).to(D),
              torch.randn(3, 2, 4, 4, dtype=D, requires_grad=True))]
    for g, x in cases:
        n = x[0].numel()
        J = impflow.logdet.jacobian(g(x), x, create_graph=True)
        ref = torch.stack([torch.autograd.functional.jacobian(lambda v: g(v[None])[0], xi, create_graph=True)
                           .reshape(n, n) for xi in x])
        assert (J - ref).abs().max() < 1e-12
        (grad,) = torch.autograd.grad(J.square().sum(), x)
        (grad_ref,) = torch.autograd.grad(ref.square().sum(), x)
        assert torch.allclose(grad, grad_ref, rtol=1e-10, atol=1e-12)


def test_exact_image_logdet_gradient_matches_finite_differences():
    block = conv_block("residual", shape=(1, 2, 2))
    x = torch.randn(2, 1, 2, 2, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: block(v)[1], (x,))


def images(n=8, shape=(1, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g)


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("factor_out", [False, True])
def test_digits_sized_flow(name, factor_out):
    """(1, 8, 8), exact log-dets: training step, round trip, sampling consistent with log_prob."""
    flow = BUILDERS[name]((1, 8, 8), factor_out=factor_out, logit_alpha=0.05, logdet="exact", **SMALL)
    assert isinstance(flow, Flow) and flow.event_shape == (1, 8, 8)
    x = images()
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    loss = -flow.log_prob(x).mean()  # first pass initialises the ActNorms
    opt.zero_grad()
    loss.backward()
    for pname, p in flow.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    opt.step()
    flow.eval()
    with torch.no_grad():
        lp = flow.log_prob(x)
        assert torch.isfinite(lp).all()
        z, _ = flow.transform(x)
        assert z.shape == x.shape
        assert (flow.transform.inverse(z) - x).abs().max() < 1e-5
        s, lp_s = flow.sample_and_log_prob(6)
        assert s.shape == (6, 1, 8, 8) and ((s > -0.06) & (s < 1.06)).all()  # Logit⁻¹ range, α = 0.05
        assert (flow.log_prob(s) - lp_s).abs().max() < 1e-3 * lp_s.abs().max()
        assert flow.sample(3).shape == (3, 1, 8, 8)


def test_parameter_parity_impflow_222_vs_resflow_444():
    res = sum(p.numel() for p in image_resflow((1, 8, 8), (4, 4, 4), hidden=16).parameters())
    imp = sum(p.numel() for p in image_impflow((1, 8, 8), (2, 2, 2), hidden=16).parameters())
    assert abs(imp - res) / res < 0.01
    inner = image_impflow((1, 8, 8), (2, 2, 2), hidden=16, inner_actnorm=True)
    assert sum(p.numel() for p in inner.parameters()) == res  # one ActNorm per ResFlow ActNorm
    pairs = image_resflow((1, 8, 8), (4, 4, 4), hidden=16, actnorm_every=2)
    assert sum(p.numel() for p in pairs.parameters()) == sum(p.numel() for p in image_impflow(
        (1, 8, 8), (2, 2, 2), hidden=16).parameters())  # ActNorms where ImpFlow has its
    layers = [type(t).__name__ for t in pairs.transform.blocks[0]]
    assert layers[:7] == ["ActNorm", "ResidualBlock", "ResidualBlock", "ActNorm", "ResidualBlock", "ResidualBlock",
                          "ActNorm"]
    with pytest.raises(ValueError, match="actnorm_every"):
        image_resflow((1, 8, 8), 2, hidden=4, actnorm_every=0)


def test_layout_and_defaults():
    flow = image_resflow((1, 8, 8), 2, hidden=4, factor_out=True)
    blocks = [m for m in flow.modules() if isinstance(m, ResidualBlock)]
    assert [b.event_shape for b in blocks] == [(1, 8, 8)] * 2 + [(2, 4, 4)] * 2 + [(4, 2, 2)] * 2
    assert {b.logdet.mode for b in blocks} == {"neumann"}  # training; evaluation is exact up to 64-D
    assert default_image_logdet((1, 4, 4)) == "exact"
    assert default_image_logdet((1, 4, 5)) == "neumann"
    flow = image_impflow((1, 8, 8), (1, 1), hidden=4)
    assert [b.g_x.event_shape for b in flow.modules() if isinstance(b, ImplicitBlock)] == [(1, 8, 8), (4, 4, 4)]
    with pytest.raises(ValueError, match="divisible"):
        image_resflow((1, 6, 6), (1, 1, 1))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        image_resflow((8, 8), 1)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_colour_flow_with_neumann_logdet(name):
    """(3, 8, 8) = 192 dims: the Neumann-gradient estimator by default; finite log-probs and gradients."""
    flow = BUILDERS[name]((3, 8, 8), blocks_per_scale=(1, 1), hidden=8)
    assert {b.logdet.mode for b in flow.modules() if isinstance(b, ResidualBlock)} == {"neumann"}
    x = torch.randn(4, 3, 8, 8)
    lp = flow.log_prob(x)
    assert torch.isfinite(lp).all()
    (-lp.mean()).backward()
    for pname, p in flow.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    with torch.no_grad():
        z, _ = flow.transform(x)
        assert (flow.transform.inverse(z) - x).abs().max() < 1e-4
