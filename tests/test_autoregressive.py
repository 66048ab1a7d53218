import pytest
import torch
from contract import check_bijection, check_gradients, perturb

from impflow.nn.made import MADE
from impflow.transforms.autoregressive import InverseAutoregressive, MaskedAutoregressive

D = 5


@pytest.mark.parametrize("order", [None, [4, 2, 0, 1, 3]])
@pytest.mark.parametrize("hidden", [(16, 16), 3])
def test_made_is_autoregressive(order, hidden):
    """∂ params_i / ∂ x_j ≠ 0 only if j precedes i in the order (and is nonzero somewhere)."""
    made = perturb(MADE(D, params_per_dim=3, hidden=hidden, order=order)).double()
    x = torch.randn(D, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda v: made(v[None])[0], x)  # (D, 3, D)
    assert J.shape == (D, 3, D)
    rank = torch.empty(D, dtype=torch.long)
    rank[torch.arange(D) if order is None else torch.tensor(order)] = torch.arange(D)
    allowed = rank[None, :] < rank[:, None]  # allowed[i, j]: j before i
    dependence = J.abs().sum(1) > 0
    assert not (dependence & ~allowed).any()
    if hidden == (16, 16):
        assert dependence.sum() > allowed.sum() // 2  # the masks do not cut everything


def test_made_zero_init_and_one_dim():
    assert torch.equal(MADE(D)(torch.randn(4, D)), torch.zeros(4, D, 2))
    made = perturb(MADE(1, params_per_dim=2))
    out = made(torch.randn(3, 1))
    assert torch.equal(out, out[:1].expand(3, 1, 2))  # a constant: depends on no input
    with pytest.raises(ValueError, match="permutation"):
        MADE(3, order=[0, 0, 1])


@pytest.mark.parametrize("transformer", ["affine", "additive", "spline"])
@pytest.mark.parametrize("order", [None, list(range(D))[::-1]])
def test_maf_float64(transformer, order):
    t = perturb(MaskedAutoregressive(D, transformer, hidden=(16, 16), order=order)).double()
    check_bijection(t, 1.5 * torch.randn(6, D, dtype=torch.float64))


@pytest.mark.parametrize("transformer", ["affine", "spline"])
def test_maf_float32_and_gradients(transformer):
    t = perturb(MaskedAutoregressive(D, transformer, hidden=16))
    x = torch.randn(8, D)
    check_bijection(t, x, tol=1e-4, brute_force=False)
    check_gradients(t, x)


def test_iaf_is_maf_reversed():
    iaf = perturb(InverseAutoregressive(D, transformer="affine", hidden=(16, 16))).double()
    x = torch.randn(6, D, dtype=torch.float64)
    check_bijection(iaf, x)
    z, ladj = iaf(x)
    x_back, ladj_maf = iaf.transform(z)  # sampling x from z is one MAF pass
    assert torch.allclose(x_back, x, atol=1e-10) and torch.allclose(ladj_maf, -ladj, atol=1e-10)
    check_gradients(iaf, x)


def test_maf_shape_error():
    with pytest.raises(ValueError, match="shape"):
        MaskedAutoregressive(D)(torch.randn(2, D + 1))
