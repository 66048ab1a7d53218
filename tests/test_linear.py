"""Linear flows: the shared transform contract (tests/contract.py) and layer specifics."""

import pytest
import torch
from contract import LayerContract

from impflow.transforms.linear import (
    Diagonal,
    FullLinear,
    InvertibleConv1x1,
    LULinear,
    Orthogonal,
    Permutation,
    Triangular,
)

D = 5

VECTOR_LAYERS = {
    "diagonal": lambda: Diagonal(D),
    "diagonal_bias": lambda: Diagonal(D, bias=True),
    "triangular_lower": lambda: Triangular(D),
    "triangular_upper": lambda: Triangular(D, lower=False),
    "orthogonal": lambda: Orthogonal(D),
    "orthogonal_3": lambda: Orthogonal(D, n_reflections=3),
    "full": lambda: FullLinear(D),
    "lu": lambda: LULinear(D),
    "lu_from_weight": lambda: LULinear(D, weight=torch.randn(D, D)),
    "permutation_random": lambda: Permutation(D, seed=3),
    "permutation_reverse": lambda: Permutation(D, kind="reverse"),
    "permutation_explicit": lambda: Permutation(D, kind=[2, 0, 4, 1, 3]),
}
IMAGE_LAYERS = {
    "conv1x1": lambda: InvertibleConv1x1(2),
    "conv1x1_lu": lambda: InvertibleConv1x1(2, lu=True),
}
ALL_LAYERS = {**VECTOR_LAYERS, **IMAGE_LAYERS}


def make(name, seed):
    """The layer in float64 with every parameter perturbed away from its (often trivial) init."""
    torch.manual_seed(seed)
    layer = ALL_LAYERS[name]().double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


def inputs(name, dtype=torch.float64, batch=4):
    shape = (batch, 2, 3, 3) if name in IMAGE_LAYERS else (batch, D)
    return torch.randn(shape, dtype=dtype)


class TestLinearContract(LayerContract):
    """Round trip, log-dets of both directions vs autograd Jacobians, gradients, float32."""

    @pytest.fixture(params=list(ALL_LAYERS))
    def name(self, request):
        return request.param

    def make(self, name, seed):
        return make(name, seed)

    def inputs(self, name, dtype=torch.float64, batch=4, latent=False):
        return inputs(name, dtype, batch)


@pytest.mark.parametrize("name", ALL_LAYERS)
def test_wrong_shape_is_a_clear_error(name):
    layer = make(name, 0)
    bad = torch.randn(4, D + 1) if name in VECTOR_LAYERS else torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="expected"):
        layer(bad.double())
    with pytest.raises(ValueError, match="expected"):
        layer.inverse(bad.double())


def test_identity_at_init():
    x = torch.randn(4, D)
    for layer in (Diagonal(D, bias=True), Triangular(D), LULinear(D)):
        z, ladj = layer(x)
        assert torch.equal(z, x) and torch.equal(ladj, torch.zeros(4))


def test_lu_linear_reproduces_given_weight():
    W = torch.randn(D, D, dtype=torch.float64)
    layer = LULinear(D, bias=False, weight=W).double()
    x = torch.randn(4, D, dtype=torch.float64)
    z, ladj = layer(x)
    assert (z - x @ W.T).abs().max() < 1e-12
    assert (ladj - torch.linalg.slogdet(W)[1]).abs().max() < 1e-12


def test_lu_linear_weight_of_the_wrong_size_is_a_clear_error():
    with pytest.raises(ValueError, match=r"LULinear\(2\) needs a \(2, 2\) weight, got \(3, 3\)"):
        LULinear(2, weight=torch.eye(3))


def test_orthogonal_preserves_norms():
    layer = make("orthogonal", 0)
    x = inputs("orthogonal")
    assert (layer(x)[0].norm(dim=1) - x.norm(dim=1)).abs().max() < 1e-12


def test_permutation_kinds():
    x = torch.arange(D, dtype=torch.float64).expand(2, D)
    assert layer_out(Permutation(D, kind="reverse"), x) == [4, 3, 2, 1, 0]
    assert layer_out(Permutation(D, kind=[2, 0, 4, 1, 3]), x) == [2, 0, 4, 1, 3]
    assert torch.equal(Permutation(D, seed=7).perm, Permutation(D, seed=7).perm)
    with pytest.raises(ValueError, match="permutation"):
        Permutation(D, kind=[0, 0, 1, 2, 3])
    with pytest.raises(ValueError, match="kind"):
        Permutation(D, kind="shuffle")


def layer_out(layer, x):
    return layer(x)[0][0].long().tolist()


def test_conv1x1_matches_conv2d():
    layer = make("conv1x1_lu", 0)
    x = inputs("conv1x1_lu")
    W = layer.linear._matvec(torch.eye(2, dtype=torch.float64)).T  # columns W e_j
    ref = torch.nn.functional.conv2d(x, W.view(2, 2, 1, 1))
    assert (layer(x)[0] - ref).abs().max() < 1e-12
