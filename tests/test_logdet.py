"""The Russian-roulette log-det estimators' variance rule (LogDetConfig.variance_margin).

With a geometric roulette of continuation probability q, term k of the series (of size ρ^k for
a J that contracts by ρ) is reweighted by q^-(k - n_exact): the estimator's second moment is
Σ (ρ²/q)^k, infinite once ρ² ≥ q. These tests use a linear g(x) = A x with A = ρ·Q (Q
orthogonal), whose every series ratio is exactly ρ and whose log det(I + A) is known.
"""

import math
import warnings

import pytest
import torch

from impflow import LogDetConfig, ResidualBlock
from impflow.logdet import residual_logdet

D = torch.float64


def linear_block(rho: float, n: int = 8, **config) -> tuple[ResidualBlock, float]:
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=D, generator=torch.Generator().manual_seed(5)))
    A = rho * Q
    block = ResidualBlock(lambda x: x @ A.T, logdet=LogDetConfig("unbiased", **config), event_shape=(n,))
    return block, float(torch.linalg.slogdet(torch.eye(n, dtype=D) + A)[1])


def test_continuation_rule():
    c = LogDetConfig("unbiased")  # p = 0.5, margin 0.8, cap 0.95
    assert c.continuation(0.0) == 0.5 and c.continuation(0.6) == 0.5  # 0.36/0.8 < 0.5: p decides
    assert c.continuation(0.7) == pytest.approx(0.49 / 0.8)
    assert c.continuation(0.99) == 0.95  # capped
    assert LogDetConfig("unbiased", variance_margin=None).continuation(0.9) == 0.5
    assert c.survival(5, q=0.8) == pytest.approx(0.8**3) and c.survival(2, q=0.8) == 1.0


def test_poisson_survival_is_exact_in_the_tail_and_the_roulette_warns():
    with pytest.warns(RuntimeWarning, match="infinite variance"):
        c = LogDetConfig("unbiased", roulette="poisson", lam=2.0, n_exact_terms=1)
    for m in range(40):  # P(N ≥ m) down to 1e-36, where 1 − CDF has long rounded to 0
        tail = math.fsum(math.exp(-2.0 + j * math.log(2.0) - math.lgamma(j + 1)) for j in range(m, m + 200))
        assert c.survival(1 + m) == pytest.approx(tail, rel=1e-12), m
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LogDetConfig("exact", roulette="poisson")  # no series, nothing to warn about


@pytest.mark.parametrize("bad", [dict(variance_margin=0.0), dict(variance_margin=1.5), dict(max_continue=1.0),
                                 dict(max_continue=0.3), dict(contraction_memory=1.2)])
def test_invalid_variance_settings_are_refused(bad):
    with pytest.raises(ValueError):
        LogDetConfig("unbiased", **bad)


def test_geometric_draws_follow_the_continuation():
    c = LogDetConfig("unbiased", n_exact_terms=1)
    torch.manual_seed(0)
    extra = torch.tensor([c.draw_terms(q=0.8) - 1 for _ in range(20000)], dtype=D)
    assert abs(float(extra.mean()) - 0.8 / 0.2) < 4 * float(extra.std()) / math.sqrt(len(extra))
    assert abs(float((extra >= 3).double().mean()) - 0.8**3) < 0.015


def test_training_calls_measure_the_contraction_and_eval_calls_do_not():
    block, _ = linear_block(0.9)
    x = torch.randn(16, 8, dtype=D)
    assert float(block.contraction) == 0.0
    block.eval()
    with torch.no_grad():
        block(x)
    assert float(block.contraction) == 0.0
    block.train()
    with torch.no_grad():
        block(x)
    assert float(block.contraction) == pytest.approx(0.9, rel=1e-6)  # ‖A^T w‖ = 0.9‖w‖ exactly (float32 buffer)
    # it decays slowly when later series measure less, and follows increases at once
    c = torch.tensor(0.95, dtype=D)
    config = LogDetConfig("unbiased")
    residual_logdet(lambda v: v @ (0.5 * torch.eye(8, dtype=D)), x, config, c, update=True)
    assert float(c) == pytest.approx(0.95 * config.contraction_memory)


def test_non_finite_rows_do_not_poison_the_measurement():
    c = torch.tensor(0.0, dtype=D)
    x = torch.randn(6, 3, dtype=D)
    x[2] = float("nan")
    residual_logdet(lambda v: 0.7 * v, x, LogDetConfig("unbiased"), c, update=True)
    assert float(c) == pytest.approx(0.7)


def test_variance_rule_bounds_the_tail_where_fixed_p_does_not():
    """ρ = 0.9: with q = 0.5 fixed, ρ²/q = 1.62 and rare long series give estimates hundreds of
    nats off; with the rule (q = 0.95) the same 4000 draws stay within the Hutchinson noise, and
    the estimate stays unbiased."""
    x = torch.randn(4, 8, dtype=D, generator=torch.Generator().manual_seed(1))
    errors = {}
    for margin in (None, 0.8):
        block, exact = linear_block(0.9, variance_margin=margin)
        with torch.no_grad():
            block(x)  # the first training call measures ρ̂ = 0.9
            torch.manual_seed(2)
            est = torch.stack([block(x)[1] for _ in range(4000)])
        errors[margin] = (est - exact).abs().max().item()
        if margin is not None:
            assert block.logdet.continuation(float(block.contraction)) == pytest.approx(0.95)
            mean, se = est.mean(0), est.std(0) / math.sqrt(len(est))
            assert ((mean - exact).abs() < 4 * se).all()
    # measured (seeds 0-3): 34-46 with the rule, 224-1011 without
    assert errors[0.8] < 80 and errors[None] > 3 * errors[0.8], errors


def test_contraction_is_saved_and_old_checkpoints_load():
    block, _ = linear_block(0.9)
    with torch.no_grad():
        block(torch.randn(4, 8, dtype=D))
    state = block.state_dict()
    assert float(state["contraction"]) == pytest.approx(0.9, rel=1e-6)
    fresh, _ = linear_block(0.9)
    fresh.load_state_dict(state)
    assert float(fresh.contraction) == float(block.contraction)
    del state["contraction"]  # a checkpoint from before the variance rule
    fresh.load_state_dict(state)  # strict loading still succeeds: ρ̂ starts again at 0
    assert float(fresh.contraction) == 0.0
