"""Elementwise flows: the shared transform contract (tests/contract.py), the plain spline and
piecewise-linear functions, and layer specifics."""

import math

import pytest
import torch
from contract import LayerContract

from impflow.transforms.elementwise import (
    LeakyReLU,
    Logit,
    PiecewiseLinear,
    RationalQuadraticSpline,
    Sigmoid,
    piecewise_linear,
    rational_quadratic_spline,
)

D = 4
BOUND = 2.0
SEEDS = [0, 1, 2]
PHI = torch.tensor([0.2, 0.1, 0.4, 0.05, 0.25], dtype=torch.float64)

LAYERS = {
    "leaky_relu": lambda: LeakyReLU(0.3),
    "leaky_relu_fixed": lambda: LeakyReLU(0.3, learnable=False),
    "piecewise_linear": lambda: PiecewiseLinear(D, bins=5),
    "spline": lambda: RationalQuadraticSpline(D, bins=6, bound=BOUND),
    "sigmoid": lambda: Sigmoid(),
    "logit": lambda: Logit(0.05),
    "sigmoid_image": lambda: Sigmoid(),
    "logit_image": lambda: Logit(0.05),
}
UNIT_DOMAIN = {"piecewise_linear", "logit", "logit_image"}  # inputs in [0, 1]
LATENT_UNIT = {"piecewise_linear", "sigmoid", "sigmoid_image"}  # outputs in (0, 1)


def make(name, seed):
    """The layer in float64 with every parameter perturbed away from its (trivial) init."""
    torch.manual_seed(seed)
    layer = LAYERS[name]().double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p))
    return layer


def inputs(name, dtype=torch.float64, batch=4, latent=False):
    """Points in the layer's domain (or its codomain with ``latent``); the spline's straddle ±B."""
    shape = (batch, 2, 2, 2) if name.endswith("image") else (batch, D)
    if name in (LATENT_UNIT if latent else UNIT_DOMAIN):
        return torch.rand(shape, dtype=dtype).clamp(1e-3, 1 - 1e-3)
    return 1.5 * BOUND * torch.randn(shape, dtype=dtype)


def spline_params(shape, K, derivatives=None):
    derivatives = K - 1 if derivatives is None else derivatives
    return (
        torch.randn(*shape, K, dtype=torch.float64),
        torch.randn(*shape, K, dtype=torch.float64),
        torch.randn(*shape, derivatives, dtype=torch.float64),
    )


# ----------------------------------------------------------------------------- modules


class TestElementwiseContract(LayerContract):
    """Round trip, log-dets of both directions vs autograd Jacobians, gradients, float32."""

    @pytest.fixture(params=list(LAYERS))
    def name(self, request):
        return request.param

    def make(self, name, seed):
        return make(name, seed)

    def inputs(self, name, dtype=torch.float64, batch=4, latent=False):
        return inputs(name, dtype, batch, latent)


@pytest.mark.parametrize("name", ["piecewise_linear", "spline"])
def test_identity_at_init(name):
    x = inputs(name, dtype=torch.float32)
    layer = LAYERS[name]()
    z, ladj = layer(x)
    assert (z - x).abs().max() < 1e-5 and ladj.abs().max() < 1e-5
    x_back, ladj_inv = layer.inverse_and_log_det(x)  # linear bins: the quadratic degenerates
    assert (x_back - x).abs().max() < 1e-5 and ladj_inv.abs().max() < 1e-5


@pytest.mark.parametrize("name", ["piecewise_linear", "spline"])
def test_wrong_shape_is_a_clear_error(name):
    layer = make(name, 0)
    with pytest.raises(ValueError, match="expected"):
        layer(torch.rand(3, D + 1, dtype=torch.float64))


def test_leaky_relu_logdet_counts_negative_entries():
    layer = LeakyReLU(0.25).double()
    x = torch.tensor([[-1.0, 2.0, -3.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    z, ladj = layer(x)
    assert torch.allclose(z[0], torch.tensor([-0.25, 2.0, -0.75], dtype=torch.float64), atol=1e-15)
    assert torch.allclose(ladj, torch.tensor([2 * math.log(0.25), 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="positive"):
        LeakyReLU(0.0)


def test_logit_squashes_pixel_extremes():
    layer = Logit(0.05)
    x = torch.tensor([[0.0, 1.0, 0.5]], dtype=torch.float64)
    z, ladj = layer(x)
    expected = [[math.log(0.05 / 0.95), math.log(0.95 / 0.05), 0.0]]
    assert torch.allclose(z, torch.tensor(expected, dtype=torch.float64))
    assert torch.isfinite(ladj).all()
    with pytest.raises(ValueError, match="Logit"):
        layer(torch.tensor([[1.5]]))
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        Sigmoid().inverse(torch.tensor([[1.0]]))


# ----------------------------------------------------------------------------- piecewise-linear


def test_piecewise_linear_demo_bin_edges_are_cumulative_phi():
    layer = PiecewiseLinear.from_probabilities(PHI)
    edges = torch.linspace(0, 1, 6, dtype=torch.float64)[:, None]
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), PHI.cumsum(0)])
    assert (layer(edges)[0].squeeze(1) - cumulative).abs().max() < 1e-12
    assert (layer.inverse(cumulative[:, None]) - edges).abs().max() < 1e-12


def test_piecewise_linear_demo_density_and_inverse():
    layer = PiecewiseLinear.from_probabilities(PHI)
    n = 100_000
    x = ((torch.arange(n, dtype=torch.float64) + 0.5) / n)[:, None]  # midpoints of a fine grid
    z, ladj = layer(x)
    density = ladj.exp()  # p(x) = p_U(f(x)) · f'(x) with a uniform base
    assert abs(density.sum().item() / n - 1) < 1e-6
    slopes = 5 * PHI
    assert torch.allclose(density, slopes.repeat_interleave(n // 5))
    assert (layer.inverse(z) - x).abs().max() < 1e-12
    u = torch.linspace(0, 1, 1001, dtype=torch.float64)[:, None]
    assert (layer(layer.inverse(u))[0] - u).abs().max() < 1e-12


def test_piecewise_linear_demo_tutorial_snippet():
    """docs/tutorial.md section 1, its python block run as written: f'(x) at 0.1, 0.5, 0.95 is
    Kφ_b = 1.0, 2.0, 1.25, z = f(x), and the uniform-base samples fall in the bins with masses φ."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "tutorial.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", text, re.S)
    scope: dict = {}
    torch.manual_seed(0)
    exec(block, scope)
    torch.testing.assert_close(scope["log_p"].exp(), torch.tensor([1.0, 2.0, 1.25], dtype=torch.float64))
    torch.testing.assert_close(scope["z"].squeeze(1), torch.tensor([0.1, 0.5, 0.9375], dtype=torch.float64))
    counts = torch.bincount((5 * scope["samples"].squeeze(1)).long().clamp(max=4), minlength=5) / 100_000
    assert (counts - PHI).abs().max() < 5e-3


def test_piecewise_linear_demo_samples_follow_phi():
    layer = PiecewiseLinear.from_probabilities(PHI)
    x = layer.inverse(torch.rand(200_000, 1, dtype=torch.float64))  # x = f⁻¹(u), u ~ U[0, 1]
    counts = torch.bincount((5 * x.squeeze(1)).long().clamp(max=4), minlength=5) / x.shape[0]
    assert (counts - PHI).abs().max() < 5e-3


def test_piecewise_linear_function_per_sample_parameters():
    x = torch.rand(6, 3, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(6, 3, 7, dtype=torch.float64)
    y, logabsdet = piecewise_linear(x, logits)
    (dy,) = torch.autograd.grad(y.sum(), x)
    assert (dy.log() - logabsdet).abs().max() < 1e-12
    x_back, logabsdet_inv = piecewise_linear(y, logits, inverse=True)
    assert (x_back - x).abs().max() < 1e-12
    assert (logabsdet_inv + logabsdet).abs().max() < 1e-12


def test_piecewise_linear_rejects_inputs_outside_unit_interval():
    logits = torch.zeros(5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        piecewise_linear(torch.tensor([[0.5, 1.01]]), logits)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        PiecewiseLinear(1).inverse(torch.tensor([[-0.1]]))
    with pytest.raises(ValueError, match="sum to 1"):
        PiecewiseLinear.from_probabilities([0.5, 0.6])


# ----------------------------------------------------------------------------- rational-quadratic spline


@pytest.mark.parametrize("derivatives", ["interior", "all"])
@pytest.mark.parametrize("seed", SEEDS)
def test_spline_function_per_sample_parameters(seed, derivatives):
    torch.manual_seed(seed)
    K = 5
    x = (1.5 * BOUND * torch.randn(64, 3, dtype=torch.float64)).requires_grad_()
    params = spline_params(x.shape, K, K - 1 if derivatives == "interior" else K + 1)
    y, logabsdet = rational_quadratic_spline(x, *params, bound=BOUND)
    (dy,) = torch.autograd.grad(y.sum(), x)
    assert (dy.log() - logabsdet).abs().max() < 1e-10
    x_back, logabsdet_inv = rational_quadratic_spline(y, *params, inverse=True, bound=BOUND)
    assert (x_back - x).abs().max() < 1e-10
    assert (logabsdet_inv + logabsdet).abs().max() < 1e-10
    outside = x.abs() > BOUND
    assert outside.any() and (~outside).any()
    assert torch.equal(y[outside], x[outside])
    assert torch.equal(logabsdet[outside], torch.zeros_like(y[outside]))
    assert (y[~outside].abs() <= BOUND).all()


def test_spline_is_monotone_and_continuous_with_linear_tails():
    params = spline_params((1,), 6)
    x = torch.linspace(-2 * BOUND, 2 * BOUND, 20_001, dtype=torch.float64)[:, None]
    y, logabsdet = rational_quadratic_spline(x, *params, bound=BOUND)
    steps = y.diff(dim=0)
    assert (steps > 0).all()
    assert steps.max() < 1e-2  # no jumps
    edges = torch.tensor([[-BOUND], [BOUND]], dtype=torch.float64)
    y_edges, logabsdet_edges = rational_quadratic_spline(edges, *params, bound=BOUND)
    assert (y_edges - edges).abs().max() < 1e-12  # knots at ±B are fixed
    assert logabsdet_edges.abs().max() < 1e-12  # derivative 1 at ±B: the tails join smoothly


def test_spline_knots_map_onto_height_knots():
    w, h, d = spline_params((1,), 4)
    xs = -BOUND + 2 * BOUND * torch.softmax(w, -1).cumsum(-1)[..., :-1]
    ys = -BOUND + 2 * BOUND * torch.softmax(h, -1).cumsum(-1)[..., :-1]
    y, _ = rational_quadratic_spline(xs.T, w, h, d, bound=BOUND, min_bin_width=0.0, min_bin_height=0.0)
    assert (y - ys.T).abs().max() < 1e-12


def test_spline_bad_parameters_are_clear_errors():
    x = torch.zeros(2, 3)
    w, h, d = (t.float() for t in spline_params((2, 3), 4))
    with pytest.raises(ValueError, match="K − 1"):
        rational_quadratic_spline(x, w, h, w)
    with pytest.raises(ValueError, match="heights"):
        rational_quadratic_spline(x, w, h[..., :3], d)
    with pytest.raises(ValueError, match="too large"):
        rational_quadratic_spline(x, w, h, d, min_bin_width=0.3)
    with pytest.raises(ValueError, match="unnormalized_widths"):
        rational_quadratic_spline(x, w[:1, :2], h, d)


def test_unit_interval_error_names_nan():
    layer = PiecewiseLinear.from_probabilities(PHI)
    x = torch.tensor([[0.3], [float("nan")], [1.5]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"got values in \[0.3, 1.5\] and 1 NaN \(2 outside\)"):
        layer(x)
    with pytest.raises(ValueError, match=r"got 1 NaN \(1 outside\)"):
        layer(x[1:2])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: PiecewiseLinear(2, bins=0), "bins must be a positive int"),
        (lambda: PiecewiseLinear(0), "features must be a positive int"),
        (lambda: RationalQuadraticSpline(2, bins=0), "bins must be a positive int"),
        (lambda: RationalQuadraticSpline(2, bound=-1.0), "bound must be positive"),
        (lambda: RationalQuadraticSpline(2, bins=4, min_bin_width=0.25), "min_bin_width must lie in"),
        (lambda: RationalQuadraticSpline(2, min_derivative=1.0), "min_derivative must lie in"),
        (lambda: PiecewiseLinear.from_probabilities(PHI.expand(2, 5), features=3), "features=3 but φ has 2 rows"),
        (lambda: PiecewiseLinear.from_probabilities(PHI.expand(2, 2, 5)), r"shape \(K,\) or \(features, K\)"),
    ],
)
def test_bad_constructor_arguments_are_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_numpy_and_torch_integers_are_accepted_as_sizes():
    import numpy as np

    assert PiecewiseLinear(np.int64(2), bins=torch.tensor(3)).logits.shape == (2, 3)
    assert RationalQuadraticSpline(2, bins=np.int64(4)).bins == 4


def test_from_probabilities_features():
    assert PiecewiseLinear.from_probabilities(PHI, features=3).logits.shape == (3, 5)
    assert PiecewiseLinear.from_probabilities(PHI.expand(2, 5)).logits.shape == (2, 5)
    assert PiecewiseLinear.from_probabilities(PHI.expand(2, 5), features=2).logits.shape == (2, 5)
