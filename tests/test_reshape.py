import math

import pytest
import torch
from contract import check_bijection, check_gradients, perturb

from impflow import Compose, Flow
from impflow.transforms.coupling import Coupling, channel_mask
from impflow.transforms.normalization import ActNorm
from impflow.transforms.reshape import MultiScale, Split, Squeeze


def test_squeeze_layout_and_round_trip():
    x = torch.arange(2 * 4 * 6, dtype=torch.float64).reshape(1, 2, 4, 6)
    z, ladj = Squeeze()(x)
    assert z.shape == (1, 8, 2, 3) and torch.equal(ladj, torch.zeros(1))
    # channel 4c + 2i + j holds pixel (2h + i, 2w + j) of channel c
    for c, i, j in [(0, 0, 0), (0, 1, 0), (1, 0, 1), (1, 1, 1)]:
        assert torch.equal(z[0, 4 * c + 2 * i + j], x[0, c, i::2, j::2])
    assert torch.equal(Squeeze().inverse(z), x)
    x_back, ladj_inv = Squeeze().inverse_and_log_det(z)
    assert torch.equal(x_back, x) and torch.equal(ladj_inv, torch.zeros(1))


def test_squeeze_errors():
    with pytest.raises(ValueError, match="even"):
        Squeeze()(torch.randn(2, 1, 3, 4))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        Squeeze()(torch.randn(2, 4))


@pytest.mark.parametrize("channels", [4, 5])
def test_split(channels):
    t = perturb(Split(channels, hidden=8), std=0.1).double()
    x = torch.randn(3, channels, 4, 4, dtype=torch.float64)
    check_bijection(t, x)
    check_gradients(t, x)
    z, ladj = t(x)
    k = t.kept_channels
    assert k == (channels + 1) // 2 and torch.equal(z[:, :k], x[:, :k])


def test_split_scores_factored_half_as_conditional_gaussian():
    """log N(z_f; 0, I) + ladj = log N(x_f; μ(x_k), σ(x_k)²)."""
    t = perturb(Split(4, hidden=8), std=0.1).double()
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    z, ladj = t(x)
    params = t.net(x[:, :2]).reshape(3, 2, 2, 2, 2).movedim(2, -1)  # (B, C_f, H, W, 2)
    shift, log_scale = t.transformer._shift_log_scale(params)
    mean, log_std = -shift, -log_scale
    gaussian = torch.distributions.Normal(mean, log_std.exp()).log_prob(x[:, 2:]).flatten(1).sum(1)
    standard = torch.distributions.Normal(0.0, 1.0).log_prob(z[:, 2:]).flatten(1).sum(1)
    assert torch.allclose(standard + ladj, gaussian, atol=1e-10)


def glow_step(shape, k):
    return Compose(ActNorm(shape[0]), Coupling(channel_mask(shape, k), hidden=8))


def multiscale(shape=(2, 4, 4), levels=2):
    t = MultiScale(shape, levels=levels, steps=2, step_factory=glow_step, hidden=8)
    return perturb(t, std=0.1).double()


def test_multiscale_shapes():
    t = multiscale((3, 8, 8), levels=3)
    # level 1: (12, 4, 4) -> factor 6; level 2: (24, 2, 2) -> factor 12; level 3: (48, 1, 1)
    assert t.factored_shapes == [(6, 4, 4), (12, 2, 2)] and t.final_shape == (48, 1, 1)
    assert sum(math.prod(s) for s in [*t.factored_shapes, t.final_shape]) == 3 * 8 * 8
    with pytest.raises(ValueError, match="divisible"):
        MultiScale((3, 6, 6), levels=2, steps=1, step_factory=glow_step)


def test_multiscale_bijection():
    t = multiscale()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    check_bijection(t, x)
    check_gradients(t, x)


def test_multiscale_latent_layout():
    """The first factored part is the first Split's standardised half, flattened."""
    t = multiscale()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    z, _ = t(x)
    h, _ = t.blocks[0](x)
    n = math.prod(t.factored_shapes[0])
    assert torch.equal(z.flatten(1)[:, :n], h[:, -t.factored_shapes[0][0] :].flatten(1))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_multiscale_flow_sample_and_log_prob(dtype, tol):
    flow = Flow(multiscale(), event_shape=(2, 4, 4)).to(dtype).eval()  # no ActNorm re-init
    with torch.no_grad():
        x, log_p = flow.sample_and_log_prob(5)
        assert x.shape == (5, 2, 4, 4) and x.dtype == dtype
        assert (flow.log_prob(x) - log_p).abs().max() < tol * 10
        z, _ = flow.transform(x)
        assert (flow.transform.inverse(z) - x).abs().max() < tol
