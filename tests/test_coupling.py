"""Coupling layers, masks and elementwise transformers (bijection checks: tests/contract.py)."""

import pytest
import torch
from conftest import jacobian_logdet
from contract import check_bijection, check_gradients, perturb

from impflow.nn.conditioners import MLP
from impflow.transforms.coupling import (
    AffineTransformer,
    Coupling,
    alternating_mask,
    channel_mask,
    checkerboard_mask,
    half_mask,
)

IMAGE = (4, 4, 4)  # (C, H, W)


TRANSFORMERS = ["affine", "additive", "spline"]


def vector_coupling(transformer, mask=None, **kwargs):
    return Coupling(half_mask(5) if mask is None else mask, transformer, hidden=16, **kwargs)


@pytest.mark.parametrize("transformer", TRANSFORMERS)
@pytest.mark.parametrize("mask", [half_mask(5), half_mask(5, 1), alternating_mask(5, 1)])
def test_vector_coupling_float64(transformer, mask):
    t = perturb(vector_coupling(transformer, mask)).double()
    x = 1.5 * torch.randn(6, 5, dtype=torch.float64)
    check_bijection(t, x)
    z, _ = t(x)
    assert torch.equal(z[:, mask], x[:, mask])  # the conditioning part passes through


def test_piecewise_linear_coupling():
    t = perturb(vector_coupling("piecewise_linear", bins=5)).double()
    x = torch.rand(6, 5, dtype=torch.float64)
    check_bijection(t, x)
    x[:, t.mask] += 3  # only the transformed part must lie in [0, 1]
    check_bijection(t, x)
    x[:, ~t.mask] += 3
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        t(x)


@pytest.mark.parametrize("transformer", TRANSFORMERS + ["piecewise_linear"])
def test_coupling_float32_and_gradients(transformer):
    t = perturb(vector_coupling(transformer))
    x = torch.rand(8, 5)
    check_bijection(t, x, tol=1e-4, brute_force=False)
    check_gradients(t, x)


@pytest.mark.parametrize(
    "mask", [make(IMAGE, parity) for make in (checkerboard_mask, channel_mask) for parity in (0, 1)]
)
@pytest.mark.parametrize("transformer", ["affine", "spline"])
def test_image_coupling(mask, transformer):
    t = perturb(Coupling(mask, transformer, hidden=8), std=0.1).double()
    x = torch.randn(3, *IMAGE, dtype=torch.float64)
    check_bijection(t, x)
    check_gradients(t, x)
    assert torch.equal(t(x)[0][:, mask], x[:, mask])


def test_custom_conditioner():
    """Vectors: the conditioner maps the d_a kept features to d_b·P outputs."""
    t = perturb(Coupling(half_mask(4), "affine", conditioner=MLP(2, 2 * 2, hidden=(8,)))).double()
    check_bijection(t, torch.randn(3, 4, dtype=torch.float64))
    bad = Coupling(half_mask(4), "affine", conditioner=MLP(2, 4 * 2, hidden=(8,)))
    with pytest.raises(ValueError, match="outputs"):
        bad(torch.randn(3, 4))


@pytest.mark.parametrize("mask", [half_mask(7), half_mask(7, 1), alternating_mask(7), alternating_mask(7, 1)])
def test_conditioner_sees_only_the_kept_part(mask):
    """z_b depends on x_a and x_b, z_a only on x_a; the default conditioner is d_a -> d_b·P."""
    t = perturb(Coupling(mask, "spline", hidden=8, bins=4)).double()
    d_a, d_b = int(mask.sum()), int((~mask).sum())
    assert t.conditioner.net[0].in_features == d_a
    assert t.conditioner.net[-1].out_features == d_b * t.transformer.num_params
    x = torch.randn(1, 7, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: t(v)[0], x)[0, :, 0]  # (7, 7)
    a, b = mask, ~mask
    assert torch.equal(jac[a][:, a], torch.eye(d_a, dtype=torch.float64))
    assert torch.equal(jac[a][:, b], torch.zeros(d_a, d_b, dtype=torch.float64))
    assert (jac[b][:, a].abs() > 0).any()  # the transformed part is conditioned on the kept part
    off_diag = jac[b][:, b] - torch.diag(torch.diagonal(jac[b][:, b]))
    assert torch.equal(off_diag, torch.zeros_like(off_diag))  # elementwise in x_b


def test_index_buffers_follow_the_module_and_are_not_saved():
    t = Coupling(checkerboard_mask(IMAGE), "affine", hidden=8).double()
    assert t.mask_float.dtype == torch.float64 and t.mask.dtype == torch.bool
    assert set(t.state_dict()) - {k for k in t.state_dict() if k.startswith("conditioner.")} == {"mask"}
    v = Coupling(half_mask(5))
    assert v.idx_a.tolist() == [0, 1, 2] and v.idx_b.tolist() == [3, 4]


def test_zero_init_is_identity():
    cases = [(vector_coupling("affine"), torch.randn(4, 5)), (Coupling(channel_mask(IMAGE)), torch.randn(2, *IMAGE))]
    for t, x in cases:
        z, ladj = t(x)
        assert torch.equal(z, x) and torch.equal(ladj, torch.zeros(x.shape[0]))


@pytest.mark.parametrize("image", [False, True])
def test_random_init_is_not_identity(image):
    """identity_init=False: the last conditioner layer starts random (no perturbation needed)."""
    mask, x = (channel_mask(IMAGE), torch.randn(2, *IMAGE, dtype=torch.float64)) if image else (
        half_mask(5), torch.randn(4, 5, dtype=torch.float64))
    t = Coupling(mask, hidden=8, identity_init=False).double()
    last = t.conditioner.net[-1]
    assert last.weight.abs().min() > 0 and last.bias.abs().min() > 0
    check_bijection(t, x)
    check_gradients(t, x)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_affine_coupling_expands_and_contracts(sign):
    """One layer reaches scales far from 1 both ways: |dz_b/dx_b| > 2 (expansion) or < 1/2."""
    t = vector_coupling("affine").double()
    t.conditioner.net[-1].bias.data.view(-1, 2)[:, 1] = sign * 2.0  # raw log-scales of x_b
    x = torch.randn(3, 5, dtype=torch.float64)
    z, ladj = t(x)
    transformed = ~t.mask
    scale = z[:, transformed] / x[:, transformed]  # shift is 0: z_b = s · x_b
    assert (scale > 2).all() if sign > 0 else (scale < 0.5).all()
    assert torch.allclose(ladj, jacobian_logdet(lambda v: t(v)[0], x))


@pytest.mark.parametrize("shift_first", [False, True])
def test_affine_forms(shift_first):
    """Default y = x·e^s + μ (RealNVP's); shift_first y = (x + μ)·e^s; both exact bijections."""
    a = AffineTransformer(scale_bound=3.0, shift_first=shift_first)
    x = torch.randn(6, 3, dtype=torch.float64)
    params = torch.randn(6, 3, 2, dtype=torch.float64)
    mu, s = params[..., 0], 3.0 * torch.tanh(params[..., 1] / 3.0)
    y, log_scale = a(x, params)
    expected = (x + mu) * s.exp() if shift_first else x * s.exp() + mu
    assert torch.allclose(y, expected) and torch.allclose(log_scale, s)
    x_back, log_scale_inv = a.inverse(y, params)
    assert torch.allclose(x_back, x) and torch.allclose(log_scale_inv, -s)
    t = perturb(vector_coupling("affine", shift_first=shift_first)).double()
    assert t.transformer.shift_first == shift_first
    check_bijection(t, torch.randn(4, 5, dtype=torch.float64))


def test_affine_scale_bound_is_smooth():
    a = AffineTransformer(scale_bound=3.0)
    raw = torch.linspace(-15, 15, 101, dtype=torch.float64)
    params = torch.stack([torch.zeros_like(raw), raw], dim=-1)
    _, log_scale = a(torch.ones_like(raw), params)
    assert log_scale.abs().max() < 3.0 and log_scale.max() > 2.9
    assert (log_scale.diff() > 0).all()  # strictly monotone in the raw output: no flat clamp


def test_masks():
    assert half_mask(5).tolist() == [True, True, True, False, False]
    assert (~half_mask(5)).tolist() == half_mask(5, 1).tolist()
    assert alternating_mask(4).tolist() == [True, False, True, False]
    cb = checkerboard_mask((2, 2, 2))
    assert cb[0].tolist() == [[True, False], [False, True]] and torch.equal(cb[0], cb[1])
    ch = channel_mask((4, 2, 2), 1)
    assert not ch[:2].any() and ch[2:].all()


def test_bad_inputs():
    with pytest.raises(ValueError, match="mask"):
        Coupling(torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="transformer"):
        Coupling(half_mask(4), "quadratic")
    with pytest.raises(ValueError, match="shape"):
        vector_coupling("affine")(torch.randn(2, 4))
