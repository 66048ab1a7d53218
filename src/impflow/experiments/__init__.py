"""The paper's experiments as functions ``run(out, quick=False, seed=0, ...) -> dict``, each writing
PNGs and a JSON/markdown table under ``out``; :data:`EXPERIMENTS` maps names to them."""

from collections.abc import Callable

from . import fig2, fig3, lipschitz

__all__ = ["EXPERIMENTS", "fig2", "fig3", "lipschitz"]

EXPERIMENTS: dict[str, Callable[..., dict]] = {"fig2": fig2.run, "fig3": fig3.run, "lipschitz": lipschitz.run}
