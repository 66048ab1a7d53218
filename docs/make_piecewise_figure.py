"""Plot the K = 5 piecewise-linear flow of the tutorial (φ = [0.2, 0.1, 0.4, 0.05, 0.25]).

As a flow on [0, 1] with a uniform base: z = f(x), x = f⁻¹(u), and p(x) = f'(x) = K φ_b.
Writes docs/piecewise_linear.png next to this script:

    python docs/make_piecewise_figure.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from impflow.transforms.elementwise import PiecewiseLinear  # noqa: E402

PHI = torch.tensor([0.2, 0.1, 0.4, 0.05, 0.25], dtype=torch.float64)
OUT = Path(__file__).with_name("piecewise_linear.png")


def main() -> None:
    flow = PiecewiseLinear.from_probabilities(PHI)
    K = len(PHI)
    grid = torch.linspace(0, 1, 2001, dtype=torch.float64)[:, None]
    with torch.no_grad():
        f, ladj = flow(grid)
        f_inv = flow.inverse(grid)
        u = torch.rand(100_000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        samples = flow.inverse(u)
    edges = torch.linspace(0, 1, K + 1)
    knots = torch.cat([torch.zeros(1, dtype=torch.float64), PHI.cumsum(0)])
    g, f, f_inv, density = grid.squeeze(1), f.squeeze(1), f_inv.squeeze(1), ladj.exp()

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    ax = axes[0]
    ax.plot(g, f, color="C0")
    ax.plot(edges, knots, "o", color="C0", ms=4)
    ax.set(title="forward f(x) (normalizing direction)", xlabel="x", ylabel="z = f(x)")
    ax = axes[1]
    ax.plot(g, f_inv, color="C1")
    ax.plot(knots, edges, "o", color="C1", ms=4)
    ax.set(title="inverse f⁻¹(u) (generative direction)", xlabel="u", ylabel="x = f⁻¹(u)")
    ax = axes[2]
    ax.hist(samples.squeeze(1), bins=100, range=(0, 1), density=True, color="C2", alpha=0.4,
            label="histogram of f⁻¹(u), u ~ U[0, 1]")
    ax.plot(g, density, color="C2", label="p(x) = f'(x) = Kφ_b")
    ax.set(title="density", xlabel="x", ylabel="p(x)", ylim=(0, 2.7))
    ax.legend(loc="upper left", fontsize=8)
    for ax, bin_edges in zip(axes, (edges, knots, edges)):  # bin boundaries on each x-axis
        ax.set_xlim(0, 1)
        for e in bin_edges[1:-1]:
            ax.axvline(e, color="0.8", lw=0.8, zorder=0)
    fig.suptitle("Piecewise-linear flow, K = 5, φ = " + str(PHI.tolist()))
    fig.tight_layout()
    fig.savefig(OUT, dpi=120)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
