"""Estimated vs certified Lipschitz constants of ResFlows and ImpFlows (seed 001, §4).

For every flow, the whole map x ↦ z, its inverse and every block (forward at the block's
inputs, inverse at its outputs) get two numbers: the estimate max ‖J(x)‖₂ over data points
and over a grid (:func:`impflow.theory.estimate_lipschitz`, a lower bound on the truth) and
the certified bound (:func:`impflow.theory.block_lipschitz_bounds`). A ResFlow block is
≤ (1 + c) < 2-Lipschitz, so an ℓ-block ResFlow is < 2^ℓ; one ImpFlow block - with as many
networks as a 2-block ResFlow - is certified only up to (1 + c_x)/(1 − c_z). The 1-D models
of :mod:`fig2` show that gap being used: the ImpFlow reaches slope 10, out of every ℓ ≤ 3
ResFlow's reach.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from ..data import toy2d
from ..flow import Flow
from ..models.residual import impflow, resflow
from ..theory import block_lipschitz_bounds, jacobian_spectral_norms
from ..transforms import Compose, Transform
from . import fig2

__all__ = ["default_flows", "lipschitz_rows", "run"]

Map = Callable[[Tensor], Tensor]


def default_flows(quick: bool = False, seed: int = 0) -> tuple[dict[str, Flow], Tensor]:
    """A 2-block ResFlow and a 1-block ImpFlow (same networks count, no ActNorm) trained briefly
    by maximum likelihood on checkerboard samples; returns the flows and the training data."""
    steps, hidden, n = (60, (32, 32), 1024) if quick else (600, (64, 64), 4096)
    data = toy2d.sample("checkerboard", n, seed=seed)
    torch.manual_seed(seed)
    flows = {
        "resflow-2": resflow(2, blocks=2, hidden=hidden, actnorm=False),
        "impflow-1": impflow(2, blocks=1, hidden=hidden, actnorm=False),
    }
    g = torch.Generator().manual_seed(seed)
    for flow in flows.values():
        opt = torch.optim.Adam(flow.parameters(), lr=5e-3)
        for _ in range(steps):
            batch = data[torch.randint(n, (256,), generator=g)]
            loss = -flow.log_prob(batch).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return flows, data


def _grid(data: Tensor, size: int) -> Tensor:
    """size × size grid over the bounding box of 2-D data."""
    lo, hi = data.min(dim=0).values, data.max(dim=0).values
    axes = [torch.linspace(float(lo[i]), float(hi[i]), size, dtype=data.dtype) for i in range(2)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 2)


def _forward(t: Transform) -> Map:
    return lambda x: t(x)[0]


def _estimates(forward: Map, inverse: Map, points: dict[str, Tensor]) -> dict[str, float]:
    """max ‖J‖₂ of the map at each point set and of its inverse at the images of those points."""
    out = {}
    for name, x in points.items():
        with torch.no_grad():
            z = forward(x)
        out[f"fwd_{name}"] = float(jacobian_spectral_norms(forward, x).max())
        out[f"inv_{name}"] = float(jacobian_spectral_norms(inverse, z).max())
    return out


def _bounds(t: Transform) -> dict[str, float]:
    b = block_lipschitz_bounds(t)
    return {"fwd_bound": b["forward"], "inv_bound": b["inverse"]}


def lipschitz_rows(name: str, flow: Flow, points: dict[str, Tensor]) -> list[dict]:
    """Rows for the whole transform and for each of its blocks (each at its own inputs)."""
    t = flow.transform
    rows = [{"flow": name, "part": "whole map", **_estimates(_forward(t), t.inverse, points), **_bounds(t)}]
    blocks = list(t) if isinstance(t, Compose) else [t]
    for k, block in enumerate(blocks):
        part = f"block {k} ({type(block).__name__})"
        estimates = _estimates(_forward(block), block.inverse, points)
        rows.append({"flow": name, "part": part, **estimates, **_bounds(block)})
        with torch.no_grad():
            points = {p: block(x)[0] for p, x in points.items()}
    return rows


def _one_d_rows(seed: int) -> list[dict]:
    """fig2's quick models: max and min slope against 2^ℓ and the certified bound."""
    x, models, _ = fig2.fit_models(fig2.QUICK, seed)
    rows = []
    for name, model in models.items():
        slopes = jacobian_spectral_norms(model, x)
        blocks = len(model.blocks) if isinstance(model, fig2.ResFlowMap) else 1
        rows.append(
            {
                "model": name,
                "max_slope": float(slopes.max()),
                "inverse_lip": float(1 / slopes.min()),
                "certified": model.lipschitz_bound(),
                "resflow_limit": 2.0**blocks if name.startswith("resflow") else None,
            }
        )
    return rows


def _markdown(rows: list[dict], one_d: list[dict], grid: bool) -> str:
    cols = ["data", "grid"] if grid else ["data"]
    head = " | ".join([f"Lip(f) {c}" for c in cols] + ["bound"] + [f"Lip(f⁻¹) {c}" for c in cols] + ["bound"])
    lines = [
        "# Lipschitz constants: estimated (max ‖J‖₂) vs certified",
        "",
        f"| flow | part | {head} |",
        "|---" * (4 + 2 * len(cols)) + "|",
    ]
    for r in rows:
        vals = [r[f"fwd_{c}"] for c in cols] + [r["fwd_bound"]] + [r[f"inv_{c}"] for c in cols] + [r["inv_bound"]]
        lines.append(f"| {r['flow']} | {r['part']} | " + " | ".join(f"{v:.3g}" for v in vals) + " |")
    lines += [
        "",
        "## 1-D fits of fig2 (quick settings): slopes an ℓ-block ResFlow cannot reach",
        "",
        "| model | max slope | Lip(f⁻¹) = 1/min slope | certified Lip | ResFlow limit 2^ℓ |",
        "|---|---|---|---|---|",
    ]
    for r in one_d:
        limit = "—" if r["resflow_limit"] is None else f"{r['resflow_limit']:g}"
        lines.append(
            f"| {r['model']} | {r['max_slope']:.2f} | {r['inverse_lip']:.2f} | {r['certified']:.3g} | {limit} |"
        )
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], one_d: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [2, 1]})
    labels = [f"{r['flow']}\n{r['part'].split(' (')[0]}" for r in rows]
    pos = np.arange(len(rows))
    series = [
        ("fwd_data", "Lip(f) est.", "C0", None),
        ("fwd_bound", "Lip(f) bound", "C0", "//"),
        ("inv_data", "Lip(f⁻¹) est.", "C1", None),
        ("inv_bound", "Lip(f⁻¹) bound", "C1", "//"),
    ]
    for i, (key, label, colour, hatch) in enumerate(series):
        ax[0].bar(pos + (i - 1.5) * 0.2, [r[key] for r in rows], 0.2, label=label, color=colour,
                  alpha=0.45 if hatch else 0.9, hatch=hatch)
    ax[0].set_xticks(pos, labels, fontsize=8)
    ax[0].set_yscale("log")
    ax[0].set_title("2-D checkerboard flows: estimate (data points) vs certified bound")
    ax[0].legend(fontsize=8)
    names = [r["model"] for r in one_d]
    ax[1].bar(names, [r["max_slope"] for r in one_d], color="C2", label="max slope (est.)")
    limits = [r["resflow_limit"] for r in one_d]
    ax[1].scatter([n for n, l in zip(names, limits) if l], [l for l in limits if l], color="k", marker="_",
                  s=600, label="ResFlow limit 2^ℓ", zorder=3)
    ax[1].axhline(10, color="r", ls=":", label="target slope 10")
    ax[1].set_yscale("log")
    ax[1].set_title("1-D fits of fig2")
    ax[1].tick_params(axis="x", labelsize=8)
    ax[1].legend(fontsize=8)
    for a in ax:
        a.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(
    out: Path,
    quick: bool = False,
    seed: int = 0,
    flows: dict[str, Flow] | None = None,
    data: Tensor | None = None,
) -> dict:
    """Estimate and bound Lipschitz constants; writes lipschitz.png/.json/.md under ``out``.

    Args:
        flows: trained flows by name (e.g. loaded runs); by default :func:`default_flows`.
        data: points to evaluate at (default: checkerboard samples); a grid over their
            bounding box is added for 2-D data.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if flows is None:
        flows, train = default_flows(quick, seed)
        data = train if data is None else data
    elif data is None:
        data = toy2d.sample("checkerboard", 1024, seed=seed)
    n = 256 if quick else 1024
    points = {"data": data[:n]}
    grid = data.shape[1:] == (2,)
    if grid:
        points["grid"] = _grid(data, 16 if quick else 32)
    rows = []
    for name, flow in flows.items():
        ref = next(flow.parameters())
        rows += lipschitz_rows(name, flow, {k: v.to(ref) for k, v in points.items()})
    one_d = _one_d_rows(seed)
    result = {"seed": seed, "quick": quick, "rows": rows, "one_d": one_d}
    (out / "lipschitz.json").write_text(json.dumps(result, indent=2))
    (out / "lipschitz.md").write_text(_markdown(rows, one_d, grid))
    _plot(rows, one_d, out / "lipschitz.png")
    return result
