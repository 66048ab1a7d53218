"""fig2: the LP/QP best slope-bounded fits, Theorem 3's bound, and both directions of the theorem
on quickly trained 1-D ResFlows and an ImpFlow block."""

import itertools
import json

import numpy as np
import pytest

from impflow.experiments import fig2
from impflow.theory import best_slope_bounded_fit, theorem3_bound


def test_theorem3_bound_values():
    assert [theorem3_bound(10, 0.15, l) for l in (1, 2, 3)] == pytest.approx([0.60, 0.45, 0.15])
    assert theorem3_bound(10, 0.15, 4) is None


@pytest.mark.parametrize("ell", [1, 2, 3, 4])
def test_best_sup_matches_closed_form(ell):
    # f rises 3 on [0, 0.3] while h rises at most 0.3·2^ℓ, so 2t ≥ 3 − 0.3·2^ℓ; the left part
    # (slope 0.1) costs nothing, hence t* = max(0, 1.5 − 0.15·2^ℓ) = 1.2, 0.9, 0.3, 0.
    x = fig2.make_grid(0.01).flatten().numpy()
    best = best_slope_bounded_fit(x, fig2.target(fig2.make_grid(0.01)).flatten().numpy(), 2.0**ell)
    assert best["sup"] == pytest.approx(max(0.0, 1.5 - 0.15 * 2**ell), abs=1e-7)
    slopes = np.diff(best["h_rmse"]) / np.diff(x)
    assert slopes.min() >= -1e-9 and slopes.max() <= 2**ell + 1e-9


def test_lp_and_qp_against_brute_force():
    """Tiny case: enumerate slopes on a fine lattice; the best offset is closed-form
    (mid-range of residuals for sup, their mean for least squares)."""
    x = np.array([0.0, 0.3, 0.5, 1.0])
    y = np.array([0.0, 1.5, 1.6, 1.4])
    s_max, k = 2.0, 80
    levels = np.linspace(0.0, s_max, k + 1)
    s = np.array(list(itertools.product(levels, repeat=3)))  # (m, 3) slopes
    h = np.concatenate([np.zeros((len(s), 1)), np.cumsum(s * np.diff(x), axis=1)], axis=1)
    r = y - h
    brute_sup = ((r.max(1) - r.min(1)) / 2).min()
    brute_rmse = r.std(axis=1).min()
    best = best_slope_bounded_fit(x, y, s_max)
    resolution = s_max / k * np.diff(x).sum()
    assert best["sup"] <= brute_sup + 1e-9 and brute_sup <= best["sup"] + resolution
    assert best["rmse"] <= brute_rmse + 1e-9 and brute_rmse <= best["rmse"] + resolution
    assert np.abs(best["h_sup"] - y).max() == pytest.approx(best["sup"], abs=1e-8)


def test_fig2_quick_both_directions_of_theorem3(tmp_path):
    result = fig2.run(tmp_path, quick=True)
    rows = {r["model"]: r for r in result["rows"]}
    assert rows["impflow"]["sup"] < 0.1  # one ImpFlow block fits slope 10 and 0.1
    assert rows["impflow"]["lip_estimate"] > 8  # beyond any ℓ ≤ 3 ResFlow
    for ell in (1, 2, 3, 4):
        r = rows[f"resflow-{ell}"]
        assert r["lip_estimate"] <= r["lip_bound"] < 2**ell
        # a trained ResFlow can't beat the best slope-[0, 2^ℓ] function, nor Theorem 3
        assert r["sup"] >= r["best_sup"] - 1e-9
        assert r["rmse"] >= r["best_rmse"] - 1e-6
        if ell <= 3:
            assert r["best_sup"] >= r["theorem3"] and r["sup"] >= r["theorem3"]
    assert json.loads((tmp_path / "fig2.json").read_text())["grid_points"] == 131
    assert (tmp_path / "fig2.png").stat().st_size > 0 and "resflow-3" in (tmp_path / "fig2.md").read_text()
