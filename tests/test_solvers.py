import warnings

import pytest
import torch

from impflow.solvers import (
    ConvergenceError,
    ConvergenceWarning,
    SolverConfig,
    find_root,
    resolve_method,
    solve_residual,
)

D = torch.float64


def linear_system(B=8, n=6, strength=0.9, seed=0):
    """F(x) = A x - b per row with A = I + M, M symmetric with eigenvalues spread over
    [−strength, strength] (so x ← x − F(x) contracts at rate ``strength``)."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(B, n, n, generator=g, dtype=D))[0]
    lam = torch.linspace(-strength, strength, n, dtype=D)
    M = Q @ torch.diag_embed(lam.expand(B, n)) @ Q.transpose(1, 2)
    A = torch.eye(n, dtype=D) + M
    b = torch.randn(B, n, generator=g, dtype=D)

    def F(x, idx):
        Ai, bi = (A, b) if idx is None else (A[idx], b[idx])
        return torch.bmm(Ai, x.unsqueeze(-1)).squeeze(-1) - bi

    return F, A, b


@pytest.mark.parametrize("method", ["broyden", "fixed_point"])
def test_linear_system_solved_to_tolerance(method):
    F, A, b = linear_system(strength=0.5)
    x, stats = find_root(F, torch.zeros_like(b), SolverConfig(method=method, tol=1e-12, max_iter=500))
    exact = torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1)
    assert stats.converged == stats.batch
    assert (x - exact).abs().max() < 1e-10
    assert F(x, None).norm(dim=1).max() <= 1e-12


def test_broyden_beats_fixed_point_on_slow_contraction():
    F, _, b = linear_system(strength=0.98)
    _, sb = find_root(F, torch.zeros_like(b), SolverConfig(method="broyden", tol=1e-10, max_iter=200))
    _, sf = find_root(F, torch.zeros_like(b), SolverConfig(method="fixed_point", tol=1e-10, max_iter=5000))
    assert sb.converged == sf.converged == sb.batch
    assert 3 * sb.evaluations < sf.evaluations


def test_per_sample_stopping_does_not_hold_easy_rows():
    """One hard row (contraction 0.999) must not keep the easy rows iterating."""
    B, n = 6, 3
    rate = torch.full((B,), 0.01, dtype=D)
    rate[0] = 0.999
    y = torch.ones(B, n, dtype=D)
    seen = torch.zeros(B, dtype=torch.long)

    def F(x, idx):  # fixed-point map x ← y − rate·x, as F(x) = x + rate x − y
        i = torch.arange(B) if idx is None else idx
        seen[i] += 1
        return x + rate[i, None] * x - y[i]

    x, stats = find_root(F, torch.zeros(B, n, dtype=D), SolverConfig(method="fixed_point", tol=1e-10, max_iter=50000))
    assert stats.converged == B
    assert seen[1:].max() < 10 < seen[0]
    assert stats.mean_iterations < stats.iterations
    assert torch.allclose(x, y / (1 + rate[:, None]), atol=1e-9)


def test_nan_row_is_reported_and_does_not_leak():
    F0, A, b = linear_system(strength=0.5)

    def F(x, idx):
        f = F0(x, idx)
        rows = torch.arange(x.shape[0]) if idx is None else idx
        return torch.where((rows == 0)[:, None], torch.full_like(f, float("nan")), f)

    with pytest.warns(ConvergenceWarning, match="1 of 8 samples"):
        x, stats = find_root(
            F, torch.zeros_like(b), SolverConfig(method="broyden", tol=1e-12, max_iter=30, fallback_iter=5)
        )
    assert stats.converged == 7
    assert torch.isfinite(x[1:]).all()
    exact = torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1)
    assert (x[1:] - exact[1:]).abs().max() < 1e-10


def test_non_convergence_raises_with_worst_residual():
    F, _, b = linear_system(strength=0.99)
    cfg = SolverConfig(method="fixed_point", tol=1e-12, max_iter=3, on_failure="raise")
    with pytest.raises(ConvergenceError, match=r"after 3 iterations; worst ‖F‖ = [0-9.e+-]+"):
        find_root(F, torch.zeros_like(b), cfg)


@pytest.mark.parametrize("method", ["auto", "broyden", "fixed_point"])
def test_tolerance_below_float32_resolution_is_still_met(method):
    F64, _, b = linear_system(strength=0.7)

    def F(x, idx):
        return F64(x.double(), idx).float()

    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        cfg = SolverConfig(method=method, tol=1e-12)
        x, stats = find_root(F, torch.zeros_like(b).float(), cfg, scale=b.float().norm(dim=1))
    assert stats.converged == stats.batch


def small_g(n, seed, strength=0.8):
    g = torch.Generator().manual_seed(seed)
    W1 = torch.randn(16, n, generator=g, dtype=D)
    W2 = torch.randn(n, 16, generator=g, dtype=D)
    W1 = (W1 / torch.linalg.matrix_norm(W1, ord=2)).requires_grad_()
    W2 = (strength * W2 / torch.linalg.matrix_norm(W2, ord=2)).requires_grad_()
    return (lambda z: torch.tanh(z @ W1.T) @ W2.T), [W1, W2]


@pytest.mark.parametrize("direct", [False, True])
def test_implicit_backward_gradcheck(direct):
    """Gradients of L(z*(y, θ)) by the implicit function theorem match finite differences."""
    n = 3
    g, params = small_g(n, 1)
    y0 = torch.randn(4, n, dtype=D, requires_grad=True)

    def f(y, W1, W2):
        gg = lambda z: torch.tanh(z @ W1.T) @ W2.T
        z, info = solve_residual(gg, y, SolverConfig(tol=1e-13))
        if direct:
            from impflow.logdet import jacobian

            zl = z.detach().requires_grad_()
            info.jacobian = jacobian(gg(zl), zl, create_graph=False)
        return (z * torch.linspace(-1, 2, n, dtype=D)).sum(1) + z.pow(2).sum(1)

    assert torch.autograd.gradcheck(f, (y0, *params), eps=1e-6, atol=1e-7)


def test_implicit_backward_matches_unrolled_fixed_point():
    n = 4
    g, params = small_g(n, 2, strength=0.7)
    y = torch.randn(5, n, dtype=D, requires_grad=True)
    w = torch.randn(5, n, dtype=D)

    z, info = solve_residual(g, y, SolverConfig(tol=1e-14))
    grads = torch.autograd.grad((z * w).sum(), [y, *params])
    assert info.backward is not None and info.backward.converged == 5

    zu = y
    for _ in range(300):
        zu = y - g(zu)
    ref = torch.autograd.grad((zu * w).sum(), [y, *params])
    for a, b in zip(grads, ref):
        assert (a - b).abs().max() < 1e-7


def test_solver_config_validation():
    with pytest.raises(ValueError, match="unknown solver method 'newton'; use 'auto', 'broyden' or 'fixed_point'"):
        SolverConfig(method="newton")
    with pytest.raises(ValueError, match="unknown solver method"):
        SolverConfig(method="Broyden")
    with pytest.raises(ValueError, match="on_failure"):
        SolverConfig(on_failure="explode")


def mlp_problem(B, n, dtype, strength=0.9, seed=3):
    """F(z) = z + g(z) − y with g a tanh MLP of Lipschitz constant ``strength``; rows of y at
    scales 0.1 … 10 so that the per-sample stopping matters."""
    gen = torch.Generator().manual_seed(seed)
    W1 = torch.randn(32, n, generator=gen, dtype=D)
    W2 = torch.randn(n, 32, generator=gen, dtype=D)
    W1 = W1 / torch.linalg.matrix_norm(W1, ord=2)
    W2 = strength * W2 / torch.linalg.matrix_norm(W2, ord=2)
    b1 = torch.randn(32, generator=gen, dtype=D)
    W1, W2, b1 = W1.to(dtype), W2.to(dtype), b1.to(dtype)
    y = (torch.randn(B, n, generator=gen, dtype=D) * torch.logspace(-1, 1, B, dtype=D)[:, None]).to(dtype)

    def g(z):
        return torch.tanh(z @ W1.T + b1) @ W2.T

    def F(z, idx):
        return z + g(z) - (y if idx is None else y[idx])

    return F, g, y


def test_auto_resolves_by_size_and_shape():
    """The documented rule: Broyden for vector rows of at most AUTO_BROYDEN_MAX_DIM entries in
    any dtype, fixed point (with the adaptive hand-over) for longer or image-shaped rows;
    explicit methods pass through."""
    from impflow.solvers import AUTO_BROYDEN_MAX_DIM as small

    for dtype in (torch.float16, torch.float32, torch.float64):
        assert resolve_method("auto", torch.zeros(3, 2, dtype=dtype)) == "broyden"
        assert resolve_method("auto", torch.zeros(3, small, dtype=dtype), (small,)) == "broyden"
        assert resolve_method("auto", torch.zeros(3, small + 1, dtype=dtype)) == "fixed_point"
        assert resolve_method("auto", torch.zeros(3, 16, dtype=dtype), (1, 4, 4)) == "fixed_point"
        assert resolve_method("auto", torch.zeros(3, 1024, dtype=dtype), (16, 8, 8)) == "fixed_point"
        for m in ("broyden", "fixed_point"):
            assert resolve_method(m, torch.zeros(3, 2, dtype=dtype)) == m
            assert resolve_method(m, torch.zeros(3, 1024, dtype=dtype), (16, 8, 8)) == m
    with pytest.raises(ValueError, match="unknown solver method"):
        resolve_method("newton", torch.zeros(3, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_auto_hands_slow_contractions_to_broyden(dtype):
    """n = 24 > AUTO_BROYDEN_MAX_DIM: auto starts with fixed point. A strongly contracting problem
    stays with it; one contracting at rate 0.9 goes to Broyden after the probe and needs far
    fewer evaluations than fixed point alone."""
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    F_fast, _, b = linear_system(n=24, strength=0.3)
    F_slow, _, _ = linear_system(n=24, strength=0.9)

    def cast(F):
        return lambda x, idx: F(x.double(), idx).to(dtype)

    x0 = torch.zeros_like(b, dtype=dtype)
    _, fast = find_root(cast(F_fast), x0, SolverConfig(tol=tol))
    assert fast.method == "fixed_point" and fast.converged == fast.batch
    _, slow = find_root(cast(F_slow), x0, SolverConfig(tol=tol, on_failure="raise"))
    _, fp = find_root(cast(F_slow), x0, SolverConfig(method="fixed_point", tol=tol, max_iter=5000))
    assert slow.method == "fixed_point+broyden" and slow.converged == slow.batch
    assert fp.converged == fp.batch
    assert 2 * slow.evaluations < fp.evaluations


@pytest.mark.parametrize(
    "dtype,n,expected",
    [(torch.float64, 5, "broyden"), (torch.float32, 5, "broyden"), (torch.float32, 40, "fixed_point")],
)
def test_default_config_is_auto_and_stats_name_the_resolved_method(dtype, n, expected):
    assert SolverConfig().method == "auto"
    F, _, y = mlp_problem(16, n, dtype, strength=0.5)
    _, stats = find_root(F, y.clone(), SolverConfig(), scale=y.norm(dim=1))
    assert stats.method == expected
    assert stats.converged == stats.batch


@pytest.mark.parametrize("method", ["broyden", "fixed_point", "auto"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-8), (torch.float32, 1e-5)])
def test_every_method_meets_the_tolerance_per_sample(method, dtype, tol):
    """Every row's own residual (recomputed independently of the solver) is below tol, for
    rows whose right-hand sides span two orders of magnitude."""
    F, g, y = mlp_problem(40, 12, dtype, strength=0.95)
    z, stats = find_root(F, y.clone(), SolverConfig(method=method, tol=tol, on_failure="raise"))
    assert z.dtype == dtype
    assert stats.converged == stats.batch == 40
    res = (z + g(z) - y).norm(dim=1)
    assert (res <= tol).all(), res.max()
    assert stats.max_residual <= tol
    # the per-sample stop: not every row needed the maximal number of iterations
    assert stats.mean_iterations < stats.iterations


@pytest.mark.parametrize("method", ["broyden", "fixed_point"])
def test_rows_converging_at_different_times_keep_their_own_solutions(method):
    """Rows retire from the iteration as they converge; the rows that stay must keep being
    solved for their own right-hand side (checks the bookkeeping of the compact active set)."""
    F, g, y = mlp_problem(50, 7, torch.float64, strength=0.9, seed=5)
    z, stats = find_root(F, y.clone(), SolverConfig(method=method, tol=1e-11, on_failure="raise"))
    ref = y.clone()
    for _ in range(2000):  # plain fixed-point iteration of the whole batch, to convergence
        ref = y - g(ref)
    assert (z - ref).abs().max() < 1e-9
    assert stats.iterations > stats.mean_iterations


def test_auto_switches_sooner_for_image_shaped_rows():
    """A solve that fixed point finishes in ~17 iterations: vector rows stay with fixed point,
    the same rows declared image-shaped (event_shape (C, H, W)) go to Broyden after the probe."""
    F, _, b = linear_system(n=24, strength=0.4)
    x0 = torch.zeros_like(b)
    _, vec = find_root(F, x0, SolverConfig(tol=1e-6))
    _, img = find_root(F, x0, SolverConfig(tol=1e-6), event_shape=(6, 2, 2))
    _, fp = find_root(F, x0, SolverConfig(method="fixed_point", tol=1e-6))
    assert vec.method == "fixed_point" and vec.evaluations == fp.evaluations
    assert img.method == "fixed_point+broyden" and img.evaluations < fp.evaluations
    assert vec.converged == img.converged == vec.batch
