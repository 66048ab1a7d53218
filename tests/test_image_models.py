"""Image residual/implicit blocks with LipschitzConvNet, and the multi-scale image_resflow/image_impflow."""

import functools

import pytest
import torch

import impflow.logdet

from impflow import Flow, ImplicitBlock, ResidualBlock
from impflow.models.image import default_image_logdet, image_impflow, image_resflow
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


def count_forward_jacobians(monkeypatch) -> list[int]:
    """A list that gets a 1 for every forward-mode Jacobian that completes."""
    done: list[int] = []
    real = impflow.logdet.forward_jacobian

    def counted(g, x):
        out = real(g, x)
        done.append(1)
        return out

    monkeypatch.setattr(impflow.logdet, "forward_jacobian", counted)
    return done


def reverse_mode_only(monkeypatch):
    """Make the forward-mode Jacobian unavailable, as for a g with an op that has no jvp rule."""
    def refuse(g, x):
        raise NotImplementedError("no forward-mode rule")
    monkeypatch.setattr(impflow.logdet, "forward_jacobian", refuse)


@pytest.mark.parametrize("kind", ["residual", "implicit"])
def test_exact_training_jacobian_runs_forward_mode_with_reverse_mode_gradients(kind, monkeypatch):
    """Differentiable exact log-dets of images come from batched jvps; their gradients (x and
    parameters) equal those of the batched-vjp Jacobian, which remains the fallback."""
    torch.manual_seed(1)
    block = conv_block(kind)

    def grads():
        x = torch.randn(3, 2, 4, 4, dtype=D, generator=torch.Generator().manual_seed(2), requires_grad=True)
        z, ladj = block(x)
        (ladj.sum() + (z * z).sum()).backward()
        out = [x.grad] + [p.grad.clone() for p in block.parameters()]
        block.zero_grad()
        return ladj.detach(), out

    calls = count_forward_jacobians(monkeypatch)
    ladj_fwd, g_fwd = grads()
    assert calls == [1] * (1 if kind == "residual" else 2)
    reverse_mode_only(monkeypatch)
    with pytest.warns(RuntimeWarning, match="reverse mode"):
        ladj_rev, g_rev = grads()
    assert (ladj_fwd - ladj_rev).abs().max() < 1e-12
    for a, b in zip(g_fwd, g_rev):
        assert (a - b).abs().max() < 1e-10 * (1 + b.abs().max())


@pytest.mark.parametrize("elements", [1, 100, 10**9])  # one direction per call, a few, all at once
def test_jacobians_in_chunks_of_directions(elements, monkeypatch):
    """Both batched Jacobians give the same J (and gradients) whatever the chunking of directions."""
    g = LipschitzConvNet(2, 8, (2, 4, 4), coeff=0.97).to(D)
    x = torch.randn(3, 2, 4, 4, dtype=D, requires_grad=True)
    monkeypatch.setattr(impflow.logdet, "CPU_CHUNK_ELEMENTS", elements)
    gx, J = impflow.logdet.forward_jacobian(g, x)
    J_rev = impflow.logdet.jacobian(g(x), x, create_graph=True)
    ref = torch.stack([torch.autograd.functional.jacobian(lambda v: g(v[None])[0], xi).reshape(32, 32) for xi in x])
    assert torch.allclose(gx, g(x)) and (J - ref).abs().max() < 1e-12 and (J_rev - ref).abs().max() < 1e-12
    (grad_fwd,) = torch.autograd.grad(J.square().sum(), x)
    (grad_rev,) = torch.autograd.grad(J_rev.square().sum(), x)
    assert torch.allclose(grad_fwd, grad_rev, rtol=1e-10, atol=1e-12)


def test_exact_image_logdet_gradient_matches_finite_differences():
    block = conv_block("residual", shape=(1, 2, 2))
    x = torch.randn(2, 1, 2, 2, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: block(v)[1], (x,))


def test_exact_image_training_is_the_same_in_both_modes(monkeypatch):
    """Three Adam steps of an exact-log-det image ImpFlow (float64): the forward-mode Jacobian
    (spectral power iterations running inside it) gives the losses and spectral vectors of the
    batched-vjp one."""
    def train():
        torch.manual_seed(0)
        flow = image_impflow((1, 8, 8), logdet="exact", logit_alpha=0.05, **SMALL).to(D)
        opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
        x = images(16)
        losses = []
        for _ in range(3):
            loss = -flow.log_prob(x).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return torch.tensor(losses), [b.clone() for n, b in flow.named_buffers() if n.endswith((".u", ".v"))]

    calls = count_forward_jacobians(monkeypatch)
    losses_fwd, vec_fwd = train()
    assert len(calls) == 3 * 2 * 3  # every step (weights changed, power iterations pending) in forward mode
    reverse_mode_only(monkeypatch)
    with pytest.warns(RuntimeWarning, match="reverse mode"):
        losses_rev, vec_rev = train()
    assert (losses_fwd - losses_rev).abs().max() < 1e-9
    assert losses_fwd[-1] < losses_fwd[0] - 0.1
    assert len(vec_fwd) > 0 and all((a - b).abs().max() < 1e-9 for a, b in zip(vec_fwd, vec_rev))


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
