"""Cost of one training step: 4-block ImpFlow vs 8-block ResFlow (same networks and parameters).

2-D checkerboard, each g a 2-128-128-2 LipschitzMLP, batch 5000, exact log-det, float32, Adam.
The two models step alternately in one process (so machine load hits both alike); we report
the median process CPU time and wall time per step, at initialisation and after both were
trained for ``--train-steps`` steps (trained networks need more solver iterations).

    python benchmarks/step.py [--steps 10] [--train-steps 300]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import impflow
from impflow.data import toy2d

from common import machine, table, train_briefly, write


def step_times(models: dict[str, impflow.Flow], x: torch.Tensor, steps: int) -> dict[str, dict]:
    opts = {k: torch.optim.Adam(m.parameters(), lr=1e-4) for k, m in models.items()}
    cpu = {k: [] for k in models}
    wall = {k: [] for k in models}
    iters = {k: [] for k in models}
    for _ in range(steps + 1):  # the first step of each is warm-up
        for k, f in models.items():
            w, c = time.perf_counter(), time.process_time()
            loss = -f.log_prob(x).mean()
            opts[k].zero_grad()
            loss.backward()
            opts[k].step()
            cpu[k].append(time.process_time() - c)
            wall[k].append(time.perf_counter() - w)
            its = [b.forward_solve.forward.mean_iterations for b in f.transform if isinstance(b, impflow.ImplicitBlock)]
            iters[k].append(sum(its) / len(its) if its else 0.0)
    return {
        k: {
            "cpu_s": statistics.median(cpu[k][1:]),
            "wall_s": statistics.median(wall[k][1:]),
            "solver_iterations": statistics.mean(iters[k][1:]),
        }
        for k in models
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {"impflow-4": impflow.models.impflow(2, blocks=4), "resflow-8": impflow.models.resflow(2, blocks=8)}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    x = toy2d.sample("checkerboard", args.batch, seed=0)
    rows = []
    for state in ("init", "trained"):
        if state == "trained":
            for f in models.values():
                train_briefly(f, args.train_steps, batch=500, lr=2e-3)
        t = step_times(models, x, args.steps)
        for k, v in t.items():
            rows.append({"networks": state, "model": k, "params": params[k], **v})
        rows.append(
            {
                "networks": state,
                "model": "ratio imp/res",
                "cpu_s": t["impflow-4"]["cpu_s"] / t["resflow-8"]["cpu_s"],
                "wall_s": t["impflow-4"]["wall_s"] / t["resflow-8"]["wall_s"],
            }
        )
    print(table(rows, ["networks", "model", "params", "cpu_s", "wall_s", "solver_iterations"]))
    print(f"wrote {write('step', {'machine': machine(), 'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
