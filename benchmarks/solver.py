"""Broyden vs fixed-point iteration on the root problems of ImpFlow blocks, and memory vs iterations.

For coeff ∈ {0.9, 0.99} and networks freshly initialised or trained briefly on checkerboard,
collect the forward problems z + g_z(z) = y of every ImplicitBlock of a 4-block 2-D ImpFlow
(2-128-128-2 networks) on a batch of data, and solve them to ‖F‖ < 1e-8 (float64) and 1e-5
(float32) with each method: g evaluations per sample, batched calls, wall time, converged.

Then the memory of one training step: bytes the autograd graph saves for backward (a
deterministic count, de-duplicated by storage) with the solver capped at 10 vs 100 iterations.

    python benchmarks/solver.py [--train-steps 300] [--batch 2000]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import impflow
from impflow.data import toy2d
from impflow.solvers import SolverConfig, find_root

from common import machine, table, train_briefly, write


def block_problems(flow: impflow.Flow, x: torch.Tensor) -> list[tuple[torch.nn.Module, torch.Tensor]]:
    """(g_z, y) of each ImplicitBlock's forward solve on the data x."""
    out = []
    h = x
    with torch.no_grad():
        for t in flow.transform:
            if isinstance(t, impflow.ImplicitBlock):
                out.append((t.g_z, t.fx.map(h)))
            h, _ = t(h)
    return out


def solve_stats(g, y: torch.Tensor, method: str, tol: float) -> dict:
    def F(z, idx):
        rhs = y if idx is None else y[idx]
        return z + g(z) - rhs

    cfg = SolverConfig(method=method, tol=tol, max_iter=2000 if method == "fixed_point" else 200, on_failure="ignore")
    t = time.perf_counter()
    with torch.no_grad():
        _, s = find_root(F, y.clone(), cfg, scale=y.norm(dim=1))
    return {
        "evaluations": s.evaluations,
        "calls": s.calls,
        "seconds": time.perf_counter() - t,
        "converged": s.converged / s.batch,
        "max_iterations": s.iterations,
    }


def saved_bytes(flow: impflow.Flow, x: torch.Tensor, cfg: SolverConfig) -> tuple[int, float]:
    """Bytes saved for backward during one training step's forward, and mean solver iterations."""
    for m in flow.modules():
        if isinstance(m, impflow.ResidualBlock):
            m.solver = cfg
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = -flow.log_prob(x).mean()
    loss.backward()
    its = [b.forward_solve.forward.mean_iterations for b in flow.transform if isinstance(b, impflow.ImplicitBlock)]
    return sum(seen.values()), sum(its) / len(its)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    trained = {}
    for coeff in (0.9, 0.99):
        for state in ("fresh", "trained"):
            torch.manual_seed(0)
            flow = impflow.models.impflow(2, blocks=4, coeff=coeff).double()
            if state == "trained":
                train_briefly(flow, args.train_steps)
                trained[coeff] = flow
            flow.eval()
            for dtype, tol in ((torch.float64, 1e-8), (torch.float32, 1e-5)):
                f = copy.deepcopy(flow).to(dtype)
                x = toy2d.sample("checkerboard", args.batch, seed=1, dtype=dtype)
                probs = block_problems(f, x)
                res = {m: [solve_stats(g, y, m, tol) for g, y in probs] for m in ("broyden", "fixed_point")}
                row = {"coeff": coeff, "networks": state, "dtype": str(dtype).split(".")[1], "tol": tol}
                for m, r in res.items():
                    row[f"{m}_evals"] = sum(d["evaluations"] for d in r) / len(r)
                    row[f"{m}_seconds"] = sum(d["seconds"] for d in r)
                    row[f"{m}_converged"] = min(d["converged"] for d in r)
                row["evals_ratio"] = row["fixed_point_evals"] / row["broyden_evals"]
                row["time_ratio"] = row["fixed_point_seconds"] / row["broyden_seconds"]
                rows.append(row)
                print(row, flush=True)

    mem = []
    flow = trained[0.99].float().train()
    x = toy2d.sample("checkerboard", args.batch, seed=2)
    for iters in (10, 100):
        cfg = SolverConfig(method="fixed_point", tol=0.0, max_iter=iters, on_failure="ignore")
        b, mean_it = saved_bytes(copy.deepcopy(flow), x, cfg)
        mem.append({"max_iter": iters, "mean_iterations": mean_it, "saved_MiB": b / 2**20})

    cols = ["coeff", "networks", "dtype", "tol", "broyden_evals", "fixed_point_evals", "evals_ratio",
            "broyden_seconds", "fixed_point_seconds", "time_ratio", "broyden_converged", "fixed_point_converged"]
    print(table(rows, cols))
    print(table(mem, ["max_iter", "mean_iterations", "saved_MiB"]))
    path = write("solver", {"machine": machine(), "args": vars(args), "solvers": rows, "memory": mem})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
