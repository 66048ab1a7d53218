import numpy as np
import pytest
import torch

import impflow
from impflow import ActNorm, Compose, Flow, Inverse, StandardNormal
from impflow.models.residual import default_logdet

D = torch.float64


@pytest.mark.parametrize("builder", [impflow.models.resflow, impflow.models.impflow])
def test_sample_and_log_prob_consistent(builder):
    torch.manual_seed(0)
    flow = builder(3, blocks=2, hidden=(16,)).double().eval()
    x, lp = flow.sample_and_log_prob(7)
    assert x.shape == (7, 3) and lp.shape == (7,)
    assert torch.allclose(lp, flow.log_prob(x), atol=1e-9)
    s = flow.sample(5)
    assert s.shape == (5, 3) and not s.requires_grad


def test_rsample_is_differentiable_through_implicit_solves():
    torch.manual_seed(0)
    flow = impflow.models.impflow(2, blocks=1, hidden=(8,)).double()
    x = flow.rsample(16)
    x.pow(2).sum().backward()
    grads = [p.grad for p in flow.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_distribution_view():
    flow = impflow.models.resflow(2, blocks=1, hidden=(8,)).double().eval()
    dist = flow.distribution()
    assert isinstance(dist, torch.distributions.Distribution)
    v = dist.sample((3, 4))
    assert v.shape == (3, 4, 2)
    assert dist.log_prob(v).shape == (3, 4)
    assert torch.allclose(dist.log_prob(v)[1], flow.log_prob(v[1]))


def test_compose_and_inverse():
    torch.manual_seed(0)
    a, b = ActNorm(3).double(), ActNorm(3).double()
    with torch.no_grad():
        for m in (a, b):
            m.bias.normal_()
            m.log_scale.normal_()
    a.initialized.fill_(True)
    b.initialized.fill_(True)
    c = Compose(a, b)
    x = torch.randn(5, 3, dtype=D)
    z, ld = c(x)
    assert torch.allclose(ld, a(x)[1] + b(a(x)[0])[1])
    assert torch.allclose(c.inverse(z), x)
    inv = Inverse(c)
    x2, ld2 = inv(z)
    assert torch.allclose(x2, x) and torch.allclose(ld2, -ld)
    assert torch.allclose(inv.inverse(x), z)
    with pytest.raises(TypeError, match="Compose takes Transforms"):
        Compose(a, torch.nn.Linear(3, 3))


def test_layers_and_recording():
    """``layers`` opens nested containers; ``recording`` sees each call once, in order, with the
    layer's input and (z, ladj), and leaves no hook behind, also when the pass fails."""
    torch.manual_seed(0)
    flow = impflow.models.impflow(3, blocks=2, hidden=(8,)).double().eval()
    nested = Compose(flow.transform, Compose(ActNorm(3).double()))
    found = list(impflow.transforms.layers(nested))
    assert [type(t).__name__ for t in found] == ["ActNorm", "ImplicitBlock", "ActNorm", "ImplicitBlock", "ActNorm",
                                                  "ActNorm"]
    x = torch.randn(5, 3, dtype=D)
    with impflow.transforms.recording(found) as calls:
        z, ladj = nested(x)
    assert [c[0] for c in calls] == found
    assert calls[0][1] is x and calls[-1][2][0] is z
    assert all(torch.equal(calls[k + 1][1], calls[k][2][0]) for k in range(len(calls) - 1))
    assert torch.allclose(sum(out[1] for _, _, out in calls), ladj)
    assert not any(t._forward_hooks for t in found)
    with pytest.raises(ValueError, match="boom"), impflow.transforms.recording(found) as calls:
        nested(x)
        raise ValueError("boom")
    assert len(calls) == len(found) and not any(t._forward_hooks for t in found)


def test_standard_normal_follows_dtype_and_flow_needs_shape():
    base = StandardNormal((2,)).double()
    assert base.sample(3).dtype == D
    with pytest.raises(ValueError, match="event_shape"):
        Flow(ActNorm(2))
    assert Flow(ActNorm(2), base).event_shape == (2,)


def test_data_of_another_dtype_is_a_clear_error():
    """A float64 batch into a float32 flow (and back) names both dtypes, whether the layers would
    fail deep inside (an LU matmul) or silently promote (ActNorm)."""
    x = torch.randn(5, 2)
    for flow in (impflow.models.linear(2), Flow(ActNorm(2), event_shape=2)):
        with pytest.raises(TypeError, match=r"x has dtype torch.float64 but the flow's parameters are torch.float32"):
            flow.log_prob(x.double())
        assert flow.log_prob(x).dtype == torch.float32
        with pytest.raises(TypeError, match=r"torch.float32 but .* torch.float64; convert the data \(x.double\(\)\)"):
            flow.double().log_prob(x)
    with pytest.raises(TypeError, match=r"convert the data \(x.to\(torch.bfloat16\)\) or the flow \(flow.to\(torch.float16\)\)"):
        Flow(ActNorm(2), event_shape=2).to(torch.bfloat16).log_prob(x.half())


def test_builders_defaults_and_parameter_parity():
    flow = impflow.models.impflow(dim=2)
    assert len([m for m in flow.modules() if isinstance(m, impflow.ImplicitBlock)]) == 4
    n_imp = sum(p.numel() for p in flow.parameters())
    n_res = sum(p.numel() for p in impflow.models.resflow(dim=2).parameters())
    assert abs(n_imp - n_res) / n_res < 1e-3  # same networks, only the ActNorm count differs
    assert default_logdet(2) == "exact" and default_logdet(784) == "unbiased"
    # equal ActNorms, exactly equal parameters: ResFlow's every second one, or ImpFlow's inside its blocks
    count = lambda f: (sum(isinstance(m, impflow.ActNorm) for m in f.modules()), sum(p.numel() for p in f.parameters()))
    assert count(impflow.models.resflow(dim=2, actnorm_every=2)) == count(flow) == (5, n_imp)
    assert count(impflow.models.impflow(dim=2, inner_actnorm=True)) == count(impflow.models.resflow(dim=2)) == (9, n_res)
    with pytest.raises(ValueError, match="actnorm_every"):
        impflow.models.resflow(dim=2, actnorm_every=0)
    with pytest.raises(ValueError, match="blocks"):
        impflow.models.impflow(dim=2, blocks=0)


def test_sample_counts_are_checked():
    flow = impflow.models.impflow(dim=2).double()
    assert flow.sample(0).shape == (0, 2) and flow.sample_and_log_prob(0)[1].shape == (0,)
    # a vector flow on image-layout data: the base is (64,), the events (1, 8, 8)
    from impflow.config import RunConfig
    from impflow.train.runs import build_model

    images = build_model(RunConfig(data="digits", model="maf", layout="image", blocks=1, hidden=(8,)))
    assert images.sample(1).shape == (1, 1, 8, 8)
    assert images.sample(0).shape == images.sample_and_log_prob(0)[0].shape == (0, 1, 8, 8)
    assert flow.sample(np.int64(3)).shape == (3, 2)
    for bad, error in [((3, 4), TypeError), (2.0, TypeError), (True, TypeError), (-1, ValueError)]:
        with pytest.raises(error, match="n must be"):
            flow.sample(bad)
