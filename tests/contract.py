"""The contract every :class:`~impflow.transforms.base.Transform` must keep, as reusable checks.

A transform t maps x to ``(z, ladj) = t(x)`` with ladj = log|det ∂z/∂x| per sample, and
``t.inverse_and_log_det(z) -> (x, log|det ∂x/∂z|)``. The checks here, used by the test files
of the layers (linear, elementwise, coupling, autoregressive, DLF, reshape) and the classic
models:

* :func:`check_round_trip` — f⁻¹(f(x)) = x, and f(f⁻¹(u)) = u on latent points;
* :func:`check_logdet` — the forward ladj against the autograd Jacobian of ``t`` at x, and
  the inverse ladj against the autograd Jacobian of ``t.inverse`` at z, with
  ``inverse_and_log_det`` consistent with ``inverse`` and with −ladj of the forward map;
* :func:`check_gradients` — the NLL-like loss ½‖z‖² − ladj reaches every parameter;
* :func:`check_gradcheck` — the gradients of (z, ladj) with respect to the input and every
  parameter match finite differences (float64);
* :func:`check_float32` — a float32 copy runs in float32, round-trips, and agrees with float64;
* :func:`check_bijection` — round trip, inverse consistency and (optionally) both Jacobians.

:class:`LayerContract` turns them into a parametrised test class: subclass it as ``Test…``
with a ``name`` fixture over the layers and ``make`` / ``inputs`` methods.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import jacobian_logdet

__all__ = [
    "perturb",
    "check_nontrivial",
    "check_round_trip",
    "check_logdet",
    "check_gradients",
    "check_gradcheck",
    "check_float32",
    "check_bijection",
    "LayerContract",
]


def perturb(module: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    """Add noise to every parameter, so zero-initialised last layers make no trivial identity."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn_like(p))
    return module


def _rows(kwargs: dict, i: int) -> dict:
    """Row i of every batched keyword argument (e.g. ``context=``)."""
    return {k: c[i : i + 1] for k, c in kwargs.items()}


def check_nontrivial(t, x, **kwargs) -> None:
    """The transform moves x: a test on the identity would prove nothing."""
    z, _ = t(x, **kwargs)
    assert (z - x).abs().max() > 1e-3, "the transform is (nearly) the identity: test is trivial"


def check_round_trip(t, x, u=None, tol: float = 1e-9, **kwargs) -> None:
    """f⁻¹(f(x)) = x and, with latent points u, f(f⁻¹(u)) = u; shapes and dtypes kept."""
    z, ladj = t(x, **kwargs)
    assert z.shape == x.shape and z.dtype == x.dtype
    assert ladj.shape == (x.shape[0],) and ladj.dtype == x.dtype
    assert (t.inverse(z, **kwargs) - x).abs().max() < tol
    if u is not None:
        assert (t(t.inverse(u, **kwargs), **kwargs)[0] - u).abs().max() < tol


def check_logdet(t, x, tol: float = 1e-9, brute_force: bool = True, **kwargs) -> None:
    """Forward and inverse log-dets: each against the autograd Jacobian of its own direction
    (``brute_force``; float64), and the inverse's = −forward's at corresponding points."""
    z, ladj = t(x, **kwargs)
    x_back, ladj_inv = t.inverse_and_log_det(z, **kwargs)
    assert (x_back - x).abs().max() < tol
    assert (x_back - t.inverse(z, **kwargs)).abs().max() < tol
    assert (ladj_inv + ladj).abs().max() < tol * 10
    if not brute_force:
        return
    n = x.shape[0]
    forward = torch.cat([jacobian_logdet(lambda v: t(v, **_rows(kwargs, i))[0], x[i : i + 1]) for i in range(n)])
    assert (ladj - forward).abs().max() < tol
    inverse = torch.cat(
        [jacobian_logdet(lambda v: (t.inverse(v, **_rows(kwargs, i)), None), z[i : i + 1]) for i in range(n)]
    )
    assert (ladj_inv - inverse).abs().max() < tol


def check_gradients(t, x, **kwargs) -> None:
    """The loss ½‖z‖² − ladj reaches every parameter of t with a nonzero gradient."""
    z, ladj = t(x, **kwargs)
    (0.5 * z.pow(2).sum() - ladj.sum()).backward()
    for name, p in t.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def check_gradcheck(t, x) -> None:
    """∂(z, ladj)/∂(x, θ) by autograd equals finite differences (float64 t and x)."""
    names = [n for n, _ in t.named_parameters()]

    def outputs(v, *params):  # one tensor: gradcheck skips outputs that do not require grad
        z, ladj = torch.func.functional_call(t, dict(zip(names, params)), (v,))
        return torch.cat([z.flatten(), ladj])

    params = [p.detach().clone().requires_grad_() for p in t.parameters()]
    assert torch.autograd.gradcheck(outputs, [x.detach().clone().requires_grad_(), *params])


def check_float32(t64, x64, tol: float = 1e-4) -> None:
    """A float32 copy of the float64 transform: float32 outputs, round trip, and agreement."""
    t32 = copy.deepcopy(t64).float()
    x = x64.float()
    z, ladj = t32(x)
    assert z.dtype == ladj.dtype == torch.float32
    assert (t32.inverse(z) - x).abs().max() < tol
    z64, ladj64 = t64(x.double())
    assert (z - z64).abs().max() < tol and (ladj - ladj64).abs().max() < tol


def check_bijection(t, x, tol: float = 1e-9, brute_force: bool = True, **kwargs) -> None:
    """Non-trivial, round trip, inverse_and_log_det consistency, and (``brute_force``, float64)
    the log-dets of both directions against autograd Jacobians; ``kwargs`` (batched tensors,
    e.g. ``context=``) go to every call."""
    check_nontrivial(t, x, **kwargs)
    check_round_trip(t, x, tol=tol, **kwargs)
    check_logdet(t, x, tol=tol, brute_force=brute_force, **kwargs)


class LayerContract:
    """The contract as a test class. Subclass as ``Test…`` and provide:

    * a fixture ``name`` parametrised over the layers (``@pytest.fixture(params=…)``);
    * ``make(name, seed)``: the layer in float64 with its parameters perturbed off their init;
    * ``inputs(name, dtype, batch, latent=False)``: points of the domain (or, with ``latent``,
      of the codomain).

    ``seeds`` parametrise the round-trip and log-det tests.
    """

    seeds = (0, 1, 2)

    def make(self, name: str, seed: int) -> torch.nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def inputs(self, name: str, dtype=torch.float64, batch: int = 4, latent: bool = False):  # pragma: no cover
        raise NotImplementedError

    @pytest.fixture(params=seeds)
    def seed(self, request) -> int:
        return request.param

    def test_round_trip_float64(self, name, seed):
        layer = self.make(name, seed)
        x = self.inputs(name)
        check_nontrivial(layer, x)
        check_round_trip(layer, x, self.inputs(name, latent=True), tol=1e-10)

    def test_logdet_matches_autograd_jacobian_both_directions(self, name, seed):
        layer = self.make(name, seed)
        check_logdet(layer, self.inputs(name, batch=3), tol=1e-9)

    def test_inverse_logdet_is_minus_forward_on_latent_points(self, name):
        layer = self.make(name, 0)
        u = self.inputs(name, latent=True)
        x, ladj_inv = layer.inverse_and_log_det(u)
        assert (x - layer.inverse(u)).abs().max() < 1e-12
        assert (ladj_inv + layer(x)[1]).abs().max() < 1e-10

    def test_gradients_reach_every_parameter(self, name):
        layer = self.make(name, 0)
        check_gradients(layer, self.inputs(name).requires_grad_())

    def test_gradients_match_finite_differences(self, name):
        check_gradcheck(self.make(name, 0), self.inputs(name, batch=2))

    def test_float32(self, name):
        check_float32(self.make(name, 0), self.inputs(name))
