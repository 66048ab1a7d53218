import pytest
import torch
from contract import check_bijection, check_gradients, perturb

from impflow.transforms.dlf import DynamicLinear

D = 7
IMAGE = (4, 4, 4)


def dlt(*args, **kwargs):
    return perturb(DynamicLinear(*args, hidden=8, **kwargs), std=0.2).double()


@pytest.mark.parametrize("partitions", [2, 3, D])
@pytest.mark.parametrize("inverse_variant", [False, True])
@pytest.mark.parametrize("shift_first", [True, False])
def test_vector(partitions, inverse_variant, shift_first):
    t = dlt(D, partitions, inverse_variant=inverse_variant, shift_first=shift_first)
    assert t.transformer.shift_first == shift_first
    assert sum(t.sizes) == D and max(t.sizes) - min(t.sizes) <= 1
    x = 1.5 * torch.randn(5, D, dtype=torch.float64)
    check_bijection(t, x)
    check_gradients(t, x)


@pytest.mark.parametrize("inverse_variant", [False, True])
def test_image(inverse_variant):
    t = dlt(IMAGE[0], 3, image=True, inverse_variant=inverse_variant)
    x = torch.randn(3, *IMAGE, dtype=torch.float64)
    check_bijection(t, x)
    check_gradients(t, x)


@pytest.mark.parametrize("image", [False, True])
def test_context(image):
    shape = IMAGE if image else (D,)
    t = dlt(shape[0], 3, image=image, context_features=2)
    x = torch.randn(3, *shape, dtype=torch.float64)
    context = torch.randn(3, 2, dtype=torch.float64)
    check_bijection(t, x, context=context)
    check_gradients(t, x, context=context)
    assert not torch.allclose(t(x, context=context)[0], t(x, context=-context)[0])
    with pytest.raises(ValueError, match="context"):
        t(x)
    with pytest.raises(ValueError, match="context"):
        dlt(shape[0], 3, image=image)(x, context=context)


def test_structure():
    """Standard DLT: y_k depends on x_{k−1} and x_k only, y_1 = s_1 ⊙ (x_1 + μ_1) with a
    constant diagonal Jacobian; the inverse variant's y_k depends on every x_j, j ≤ k."""
    sizes = [3, 2, 2]
    blocks = torch.arange(D).split(sizes)
    x = torch.randn(D, dtype=torch.float64)
    for variant in (False, True):
        t = dlt(D, 3, inverse_variant=variant)
        J = torch.autograd.functional.jacobian(lambda v: t(v[None])[0][0], x)
        for k, rows in enumerate(blocks):
            for j, cols in enumerate(blocks):
                dependent = bool(J[rows][:, cols].abs().sum() > 0)
                expected = j <= k if variant else j in (k - 1, k)
                assert dependent == expected, (variant, k, j)
        first = J[blocks[0]][:, blocks[0]]
        assert torch.allclose(first, torch.diag(torch.exp(t.transformer._shift_log_scale(t.first)[1])))


def test_zero_init_identity_and_errors():
    t = DynamicLinear(D, 3, hidden=8)
    x = torch.randn(4, D)
    z, ladj = t(x)
    assert torch.equal(z, x) and torch.equal(ladj, torch.zeros(4))
    with pytest.raises(ValueError, match="partitions"):
        DynamicLinear(3, partitions=4)
    with pytest.raises(ValueError, match="shape"):
        t(torch.randn(4, D, 2, 2))


def test_float32_round_trip():
    t = perturb(DynamicLinear(IMAGE[0], 2, hidden=8, image=True), std=0.2)
    check_bijection(t, torch.randn(3, *IMAGE), tol=1e-4, brute_force=False)
