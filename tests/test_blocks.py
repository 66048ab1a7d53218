"""ResidualBlock and ImplicitBlock: round trips, log-dets, estimators, implicit gradients."""

import math

import pytest
import torch

import impflow
from impflow import ImplicitBlock, LogDetConfig, ResidualBlock, exact_logdet
from impflow.nn import LipschitzMLP
from conftest import jacobian_logdet

D = torch.float64


def make_block(kind, dim, seed, dtype=D, hidden=(32, 32), logdet="exact", coeff=0.97):
    """``kind``: "residual", "implicit", or "implicit-actnorm" (an initialised ActNorm inside)."""
    torch.manual_seed(seed)
    mlp = lambda: LipschitzMLP(dim, hidden, coeff=coeff).to(dtype)
    if kind == "residual":
        return ResidualBlock(mlp(), logdet=logdet)
    g_x, g_z = mlp(), mlp()
    mid = None
    if kind == "implicit-actnorm":
        mid = impflow.ActNorm(dim).to(dtype)
        with torch.no_grad():
            mid.bias.normal_(0, 0.5)
            mid.log_scale.normal_(0, 0.5)
            mid.initialized.fill_(True)
    return ImplicitBlock(g_x, g_z, logdet=logdet, mid=mid)


def inputs(dim, seed, n=16, dtype=D):
    g = torch.Generator().manual_seed(seed + 100)
    return 2 * torch.randn(n, dim, generator=g, dtype=dtype)


@pytest.mark.parametrize("kind", ["residual", "implicit", "implicit-actnorm"])
@pytest.mark.parametrize("dim", [1, 2, 5, 64])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_round_trip(kind, dim, dtype, tol):
    for seed in range(3):
        block = make_block(kind, dim, seed, dtype)
        x = inputs(dim, seed, dtype=dtype)
        with torch.no_grad():
            z, _ = block(x)
            x_rec = block.inverse(z)
            z_rec, _ = block(x_rec)
        assert (x_rec - x).abs().max() < tol
        assert (z_rec - z).abs().max() < tol
        assert (z - x).abs().max() > 1e-3  # the block is not the identity


@pytest.mark.parametrize("kind", ["residual", "implicit", "implicit-actnorm"])
@pytest.mark.parametrize("dim", [1, 2, 5])
def test_exact_logdet_matches_autograd_jacobian(kind, dim):
    for seed in range(3):
        block = make_block(kind, dim, seed)
        x = inputs(dim, seed, n=6)
        _, ladj = block(x)
        ref = jacobian_logdet(lambda v: block(v)[0], x)
        assert (ladj - ref).abs().max() < 1e-9
        x_inv, ladj_inv = block.inverse_and_log_det(x)
        ref_inv = jacobian_logdet(lambda v: block.inverse(v), x)
        assert (ladj_inv - ref_inv).abs().max() < 1e-9


@pytest.mark.parametrize("kind", ["residual", "implicit"])
@pytest.mark.parametrize("dim", [5, 64])
@pytest.mark.parametrize("roulette", ["geometric", "poisson"])
@pytest.mark.filterwarnings("ignore:the Poisson roulette")  # unbiased all the same
def test_unbiased_estimator_mean_within_4_standard_errors(kind, dim, roulette):
    block = make_block(kind, dim, seed=7, hidden=(32,), logdet=LogDetConfig("unbiased", roulette=roulette))
    n, reps, draws = 4, 8, 400
    x = inputs(dim, 7, n=n)
    with torch.no_grad(), exact_logdet():
        _, exact = block(x)
    # each call draws one truncation N for its batch: average the `reps` probes of a call, so
    # the `draws` call-level estimates are independent
    with torch.no_grad():
        est = torch.stack([block(x.repeat(reps, 1))[1].view(reps, n).mean(0) for _ in range(draws)])
    mean, se = est.mean(0), est.std(0) / math.sqrt(draws)
    assert ((mean - exact).abs() < 4 * se).all(), (mean - exact, se)
    assert (se > 0).all()


@pytest.mark.parametrize("kind", ["residual", "implicit"])
@pytest.mark.parametrize("mode", ["unbiased", "neumann"])
def test_stochastic_logdet_gradient_is_unbiased(kind, mode):
    """E[∂ estimate/∂(x, θ)] = ∂ exact/∂(x, θ) for the series-with-graph and the Neumann gradient.

    For the implicit block this includes the path through the solved z = z(x, θ) into log det(I + J_gz(z)).
    """
    dim = 4
    block = make_block(kind, dim, seed=3, hidden=(16,), logdet=mode)
    x = inputs(dim, 3, n=8).requires_grad_(True)
    params = [x, *block.parameters()]

    def flat_grad(ld):
        grads = torch.autograd.grad(ld.sum(), params, allow_unused=True)
        return torch.cat([torch.zeros_like(p).flatten() if g is None else g.flatten() for p, g in zip(params, grads)])

    with exact_logdet():
        ref = flat_grad(block(x)[1])
    draws = 500
    S = torch.stack([flat_grad(block(x)[1]) for _ in range(draws)])
    keep = ref.abs() > 0  # the last layer's bias does not enter log det
    S, ref = S[:, keep], ref[keep]
    mean, se = S.mean(0), S.std(0) / math.sqrt(draws)
    z = ((mean - ref).abs() / se.clamp_min(1e-12))
    assert (z < 4.5).float().mean() > 0.99, z.max()


def test_neumann_value_is_the_series_estimate():
    block = make_block("residual", 3, seed=4, hidden=(16,), logdet="neumann")
    x = inputs(3, 4, n=5)
    torch.manual_seed(11)
    a = block(x)[1]
    torch.manual_seed(11)
    block.logdet = LogDetConfig("unbiased")
    with torch.no_grad():
        b = block(x)[1]
    assert torch.allclose(a.detach(), b, atol=1e-12)


def small_impflow(seed, dim=2):
    torch.manual_seed(seed)
    flow = impflow.models.impflow(dim, blocks=2, hidden=(8,), n_power_iterations=0).double()
    with torch.no_grad():
        for m in flow.modules():
            if isinstance(m, impflow.ActNorm):
                m.bias.normal_(0, 0.3)
                m.log_scale.normal_(0, 0.3)
                m.initialized.fill_(True)
    return flow


def test_gradcheck_log_prob_inputs_and_parameters_implicit():
    """The implicit backward against central finite differences (inputs and every parameter)."""
    flow = small_impflow(0)
    x = inputs(2, 0, n=3).requires_grad_()
    torch.autograd.gradcheck(lambda v: flow.log_prob(v), (x,), eps=1e-6, atol=1e-6)
    assert_parameter_gradients_match_fd(flow, lambda: flow.log_prob(x.detach()).sum())


def assert_parameter_gradients_match_fd(module, loss, eps=1e-6):
    """Autograd ∂loss/∂θ against central differences at 3 random entries of every parameter."""
    named = list(module.named_parameters())
    grads = torch.autograd.grad(loss(), [p for _, p in named])
    for (name, p), g in zip(named, grads):
        for i in torch.randint(p.numel(), (min(3, p.numel()),)).tolist():
            with torch.no_grad():
                old = p.view(-1)[i].item()
                p.view(-1)[i] = old + eps
                up = loss().item()
                p.view(-1)[i] = old - eps
                down = loss().item()
                p.view(-1)[i] = old
            fd = (up - down) / (2 * eps)
            assert abs(fd - g.view(-1)[i].item()) < 1e-5 * (1 + abs(fd)), (name, i, fd, g.view(-1)[i].item())


def test_gradients_of_implicit_block_with_inner_actnorm_match_finite_differences():
    """z + g_z(z) = ActNorm(x + g_x(x)): gradients of a log-density through the solve and both log-dets."""
    block = make_block("implicit-actnorm", 3, seed=4, hidden=(8,))
    for m in block.modules():
        if hasattr(m, "max_power_iterations"):  # the spectral-norm vectors stay fixed under the perturbations
            m.n_power_iterations = m.max_power_iterations = 0
    x = inputs(3, 4, n=4)

    def loss():
        z, ladj = block(x)
        return (-0.5 * z.pow(2).sum(1) + ladj).sum()

    assert_parameter_gradients_match_fd(block, loss)
    assert any(n.startswith("mid.") for n, _ in block.named_parameters())


def test_implicit_gradients_match_unrolled_fixed_point():
    """Gradients of log p through the implicit backward = backprop through 300 unrolled iterations."""
    torch.manual_seed(5)
    block = make_block("implicit", 3, seed=5, hidden=(16,), coeff=0.8)
    x = inputs(3, 5, n=6).requires_grad_()
    params = [x, *block.parameters()]
    z, ladj = block(x)
    lp = (-0.5 * z.pow(2).sum(1) + ladj).sum()
    grads = torch.autograd.grad(lp, params)

    gx, gz = block.g_x, block.g_z
    y = x + gx(x)
    zu = y
    for _ in range(300):
        zu = y - gz(zu)
    ld = jacobian_logdet_graph(gx, x) - jacobian_logdet_graph(gz, zu)
    ref = torch.autograd.grad((-0.5 * zu.pow(2).sum(1) + ld).sum(), params)
    for a, b in zip(grads, ref):
        assert (a - b).abs().max() < 1e-7


def jacobian_logdet_graph(g, x):
    J = torch.stack([torch.autograd.functional.jacobian(g, xi.unsqueeze(0), create_graph=True)[0, :, 0] for xi in x])
    return torch.linalg.slogdet(torch.eye(x.shape[1], dtype=x.dtype) + J)[1]


@pytest.mark.parametrize("builder", [impflow.models.resflow, impflow.models.impflow])
def test_2d_density_integrates_to_one(builder):
    torch.manual_seed(2)
    flow = builder(2, blocks=2, hidden=(32,)).double().eval()
    with torch.no_grad():
        for m in flow.modules():
            if isinstance(m, impflow.ActNorm):
                m.log_scale.normal_(0, 0.3)
                m.bias.normal_(0, 0.5)
    n, lim = 241, 9.0
    t = torch.linspace(-lim, lim, n, dtype=D)
    xx, yy = torch.meshgrid(t, t, indexing="ij")
    grid = torch.stack([xx.flatten(), yy.flatten()], 1)
    with torch.no_grad():
        p = flow.log_prob(grid).exp()
    h = (2 * lim / (n - 1)) ** 2
    assert abs(float(p.sum() * h) - 1) < 0.01


@pytest.mark.parametrize("kind", ["residual", "implicit"])
def test_bad_input_errors(kind):
    block = make_block(kind, 3, 0)
    with pytest.raises(ValueError, match=r"expected \(batch, 3\)"):
        block(torch.randn(4, 2, dtype=D))
    with pytest.raises(ValueError, match="NaN or Inf in 1 of 4 rows"):
        x = torch.randn(4, 3, dtype=D)
        x[2, 1] = float("nan")
        block(x)
    with pytest.raises(ValueError, match="NaN or Inf"):
        block.inverse(torch.full((2, 3), float("inf"), dtype=D))
    with pytest.raises(TypeError, match="floating dtype"):
        block(torch.ones(4, 3, dtype=torch.long))


def test_flow_bad_input_errors():
    flow = impflow.models.impflow(2, blocks=1, hidden=(8,))
    with pytest.raises(ValueError, match=r"expected \(batch, 2\)"):
        flow.log_prob(torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"expected \(batch, 2\)"):
        flow.log_prob(torch.randn(2))
    with pytest.raises(TypeError, match="floating dtype"):
        flow.log_prob(torch.zeros(5, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        flow.log_prob([[0.0, 1.0]])


def test_solver_statistics_available_after_calls():
    block = make_block("implicit", 4, 0)
    x = inputs(4, 0)
    z, _ = block(x)
    assert block.forward_solve.forward.converged == x.shape[0]
    (-z.pow(2).sum()).backward()
    block.inverse(z.detach())
    assert block.inverse_solve.forward.iterations >= 1
    assert block.inverse_solve.forward.max_residual < 1e-9
