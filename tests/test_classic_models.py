
import pytest
import torch
from contract import check_bijection, perturb

from impflow.data.toy2d import banana
from impflow import Compose, Flow
from impflow.models.classic import dlf, glow, linear, maf, nsf, realnvp
from impflow.transforms.elementwise import RationalQuadraticSpline
from impflow.transforms.linear import LULinear
from impflow.transforms.normalization import ActNorm

VECTOR_BUILDERS = {
    "realnvp": lambda d: realnvp(d, steps=3, hidden=16),
    "glow": lambda d: glow(d, steps=3, hidden=16),
    "maf": lambda d: maf(d, steps=3, hidden=(16, 16)),
    "maf_spline": lambda d: maf(d, steps=2, hidden=16, transformer="spline", bins=4),
    "nsf": lambda d: nsf(d, steps=2, hidden=16, bins=4),
    "nsf_autoregressive": lambda d: nsf(d, steps=2, hidden=16, bins=4, autoregressive=True),
    "dlf": lambda d: dlf(d, steps=3, hidden=16),
    "glow_rotation_scale_then_shift": lambda d: glow(d, steps=3, hidden=16, mixing="rotation", shift_first=False),
    "dlf_rotation_scale_then_shift": lambda d: dlf(d, steps=3, hidden=16, mixing="rotation", shift_first=False),
    "linear": lambda d: linear(d),
}
IMAGE_BUILDERS = {
    "realnvp": lambda s: realnvp(shape=s, steps=4, levels=2, hidden=8),
    "glow": lambda s: glow(shape=s, steps=2, levels=2, hidden=8),
    "glow_no_lu": lambda s: glow(shape=s, steps=2, levels=2, hidden=8, lu=False),
    "dlf": lambda s: dlf(shape=s, steps=2, levels=2, hidden=8, partitions=3),
}



def nll(flow: Flow, x: torch.Tensor) -> float:
    with torch.no_grad():
        return -flow.log_prob(x).mean().item()


def train(flow: Flow, data: torch.Tensor, steps: int = 150, lr: float = 1e-2) -> Flow:
    """Full-batch Adam on the NLL (the first pass initialises the ActNorms)."""
    optimizer = torch.optim.Adam(flow.parameters(), lr=lr)
    for _ in range(steps):
        loss = -flow.log_prob(data).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return flow


def check_flow(flow: Flow, x: torch.Tensor, tol: float = 1e-9) -> None:
    """log_prob finite, samples of the event shape, sample/log_prob consistent, exact round trip."""
    flow.log_prob(x)  # initialise ActNorms on data, then freeze them
    flow.eval()
    with torch.no_grad():
        assert torch.isfinite(flow.log_prob(x)).all()
        samples, log_p = flow.sample_and_log_prob(4)
        assert samples.shape == (4, *flow.event_shape)
        assert (flow.log_prob(samples) - log_p).abs().max() < tol * 100
    check_bijection(flow.transform, x, tol)


@pytest.mark.parametrize("name", VECTOR_BUILDERS)
def test_vector_builders(name):
    flow = perturb(VECTOR_BUILDERS[name](3), std=0.1).double()
    check_flow(flow, torch.randn(5, 3, dtype=torch.float64))


@pytest.mark.parametrize("name", IMAGE_BUILDERS)
def test_image_builders(name):
    flow = perturb(IMAGE_BUILDERS[name]((2, 4, 4)), std=0.05).double()
    assert flow.event_shape == (2, 4, 4)
    check_flow(flow, torch.randn(3, 2, 4, 4, dtype=torch.float64))


def test_builder_arguments():
    with pytest.raises(ValueError, match="exactly one"):
        realnvp()
    with pytest.raises(ValueError, match="exactly one"):
        glow(2, shape=(1, 4, 4))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        dlf(shape=(4, 4))


@pytest.mark.parametrize("name", VECTOR_BUILDERS)
def test_training_improves_nll(name):
    torch.manual_seed(1)
    data = banana(256, seed=0)
    flow = VECTOR_BUILDERS[name](2)
    flow.log_prob(data)  # ActNorm initialisation: the baseline is the standardised data
    before = nll(flow, data)
    after = nll(train(flow, data), data)
    assert after < before - (0.1 if name == "linear" else 0.5), (before, after)


def test_linear_and_elementwise_alternation_beats_either_alone():
    """The tutorial's point: linear flows cannot bend the density, elementwise flows cannot
    correlate the variables; alternating them can do both."""
    torch.manual_seed(0)
    data, held_out = banana(256, seed=0), banana(2000, seed=1)

    def spline():
        return RationalQuadraticSpline(2, bins=8, bound=4.0)

    def mixing():
        return LULinear(2, weight=torch.linalg.qr(torch.randn(2, 2))[0])

    flows = {
        "linear": linear(2),
        "elementwise": Flow(Compose(ActNorm(2), spline(), spline(), spline()), event_shape=2),
        "alternating": Flow(
            Compose(ActNorm(2), mixing(), spline(), mixing(), spline(), mixing(), spline()), event_shape=2
        ),
    }
    scores = {name: nll(train(flow, data), held_out) for name, flow in flows.items()}
    assert scores["alternating"] < min(scores["linear"], scores["elementwise"]) - 0.3, scores


def _modules(flow: Flow, kind: type) -> list:
    return [m for m in flow.modules() if isinstance(m, kind)]


@pytest.mark.parametrize("actnorm", [False, True])
def test_actnorm_option(actnorm):
    from impflow.transforms.coupling import Coupling

    for flow in (realnvp(4, steps=3, hidden=8, actnorm=actnorm), nsf(4, steps=3, hidden=8, actnorm=actnorm)):
        assert len(_modules(flow, ActNorm)) == (3 if actnorm else 0)
        assert len(_modules(flow, Coupling)) == 3
        check_flow(perturb(flow, std=0.1).double(), torch.randn(5, 4, dtype=torch.float64))


def test_nsf_structure():
    """Alternating halves; LULinear at the identity ("lu"), at a rotation, or absent; bound 5."""
    from impflow.transforms.coupling import Coupling, half_mask

    flow = nsf(6, steps=3, hidden=8)
    couplings = _modules(flow, Coupling)
    assert [c.mask.tolist() for c in couplings] == [half_mask(6, k).tolist() for k in range(3)]
    assert all(c.transformer.bound == 5.0 for c in couplings)
    lus = _modules(flow, LULinear)
    assert len(lus) == 3
    x = torch.randn(4, 6)
    for lu in lus:
        z, ladj = lu(x)
        assert torch.allclose(z, x) and torch.allclose(ladj, torch.zeros(4))
    rotated = _modules(nsf(6, steps=2, hidden=8, mixing="rotation"), LULinear)
    assert not torch.allclose(rotated[0](x)[0], x)
    assert not _modules(nsf(6, steps=2, hidden=8, mixing="none"), LULinear)
    with pytest.raises(ValueError, match="mixing"):
        nsf(6, mixing="random")
    check_flow(perturb(nsf(6, steps=2, hidden=8, mixing="none"), std=0.1).double(), torch.randn(5, 6, dtype=torch.float64))


def test_realnvp_matches_the_standard_parameter_count():
    """d_a kept features -> two hidden layers -> d_b·2 outputs per coupling, no other parameters."""
    d, h, steps = 7, 16, 4
    expected = 0
    for k in range(steps):
        d_a = 4 if k % 2 == 0 else 3  # alternating_mask(7, k): parity-k indices condition
        expected += (d_a + 1) * h + (h + 1) * h + (h + 1) * (d - d_a) * 2
    assert sum(p.numel() for p in realnvp(d, steps=steps, hidden=h).parameters()) == expected


def test_realnvp_identity_init_default_vectors_off_images_on():
    from impflow.transforms.coupling import Coupling

    def starts_at_identity(flow, x):
        return all(torch.equal(c(x)[0], x) for c in _modules(flow, Coupling))

    x = torch.randn(3, 4)
    assert not starts_at_identity(realnvp(4, steps=2, hidden=8), x)
    assert starts_at_identity(realnvp(4, steps=2, hidden=8, identity_init=True), x)
    image = torch.randn(3, 8, 2, 2)  # the squeezed shape seen by the couplings of (2, 4, 4)
    assert starts_at_identity(realnvp(shape=(2, 4, 4), steps=2, levels=1, hidden=8), image)
    assert not starts_at_identity(realnvp(shape=(2, 4, 4), steps=2, levels=1, hidden=8, identity_init=False), image)


def test_realnvp_actnorm_default_vectors_off_images_on():
    assert not _modules(realnvp(4, steps=2, hidden=8), ActNorm)
    assert _modules(realnvp(shape=(2, 4, 4), steps=2, levels=1, hidden=8), ActNorm)
    assert not _modules(realnvp(shape=(2, 4, 4), steps=2, levels=1, hidden=8, actnorm=False), ActNorm)


@pytest.mark.parametrize("make", [glow, dlf])
def test_glow_dlf_mixing_initialisation(make):
    """Vector glow/dlf: LULinear at the identity (even steps) and the reversal (odd steps) by
    default; a random rotation with mixing="rotation"; the identity with "identity"."""
    d = 5
    x = torch.randn(4, d)
    lus = _modules(make(d, steps=4, hidden=8), LULinear)
    assert len(lus) == 4
    for k, lu in enumerate(lus):
        z, ladj = lu(x)
        assert torch.allclose(z, x if k % 2 == 0 else x.flip(1)) and torch.allclose(ladj, torch.zeros(4))
    for lu in _modules(make(d, steps=2, hidden=8, mixing="identity"), LULinear):
        assert torch.allclose(lu(x)[0], x)
    rotation = _modules(make(d, steps=2, hidden=8, mixing="rotation"), LULinear)[0]
    W = rotation(torch.eye(d))[0].T  # columns W e_j
    assert torch.allclose(W @ W.T, torch.eye(d), atol=1e-5)  # orthogonal ...
    assert (W.abs() < 0.999).all()  # ... and not a permutation (with probability 1)
    with pytest.raises(ValueError, match="mixing"):
        make(d, mixing="random")


def test_affine_forms_of_the_builders():
    """realnvp, maf and nsf-free builders: scale-then-shift by default for realnvp; glow and
    dlf keep their papers' shift-first form unless asked."""
    from impflow.transforms.coupling import AffineTransformer

    def forms(flow):
        return {m.shift_first for m in flow.modules() if isinstance(m, AffineTransformer)}

    assert forms(realnvp(4, steps=2, hidden=8)) == {False}
    assert forms(maf(4, steps=2, hidden=8)) == {False}
    assert forms(glow(4, steps=2, hidden=8)) == forms(dlf(4, steps=2, hidden=8)) == {True}
    assert forms(glow(4, steps=2, hidden=8, shift_first=False)) == {False}
    assert forms(dlf(shape=(2, 4, 4), steps=1, levels=1, hidden=8, shift_first=False)) == {False}
