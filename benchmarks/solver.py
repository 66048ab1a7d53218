"""Broyden vs fixed-point iteration (and "auto") on the root problems of implicit/residual blocks.

Regimes (every root problem z + g(z) = y that the model solves on a batch of data, collected by
recording the calls of :func:`impflow.solvers.solve_residual`):

* ``2d``: 4-block ImpFlow on 2-D checkerboard (2-128-128-2 networks), batch ``--batch``;
  forward solves (x → z, g = g_z) and inverse solves (z → x, g = g_x, i.e. the ResidualBlock
  inverse) of every block.
* ``64d``: 2-block ImpFlow (64-128-128-64 networks) on 64-D digits vectors (dequantised,
  standardised per pixel), batch ``--vector-batch``; forward and inverse solves.
* ``image-flow``: ``image_impflow((1, 8, 8), (1, 1, 1), hidden=64, logdet="unbiased")`` on logit-preprocessed
  dequantised digits: conv g on (1, 8, 8), (4, 4, 4), (16, 2, 2), n = 64 per sample,
  batch ``--image-batch``; forward and inverse solves.
* ``image-classifier``: ``classifier((1, 8, 8), 10, "impflow", width=16)``: conv g on the
  stem's (16, 8, 8) features, n = 1024 per sample, batch ``--image-batch``; forward solves.

For coeff ∈ {0.9, 0.99}, networks freshly initialised or trained briefly (Adam; 2-D:
``--train-steps`` on checkerboard NLL; the digits models ``--train-steps-digits`` on NLL or, for
the classifier, cross-entropy), each problem is
solved in float64 to ‖F‖ < 1e-8 and in float32 to ‖F‖ < 1e-5 per sample with each method.
Reported per (regime, coeff, networks, dtype): g evaluations per sample and batched calls
(mean over the problems), process CPU seconds (the median of ``--repeats`` runs, the methods
interleaved, summed over the problems), the worst converged fraction, the ratios fixed point /
Broyden, what the default ``method="auto"`` ran and its time relative to the faster method, and why the
problems are easy or hard: the local contraction ‖J_g(z*)‖₂ at the solutions (median and
maximum over up to 64 samples, by power iteration) next to the bound coeff, and the
per-iteration cost of each method beyond its g evaluations (overhead).

    python benchmarks/solver.py [--threads 1] [--repeats 3] [--regimes 2d 64d image-flow image-classifier]

Then the memory of one training step (trained 2-D ImpFlow, float32): bytes the autograd graph
saves for backward (a deterministic count, de-duplicated by storage) with the solver capped at
10 vs 100 iterations.

Writes ``benchmarks/results/solver.json`` and ``solver.md`` (``--name`` changes the stem).
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as Fn

import impflow
import impflow.transforms.residual as residual_module
from impflow.data import toy2d
from impflow.data.images import load_digits
from impflow.models import classifier, image_impflow
from impflow.solvers import SolverConfig, find_root

from common import RESULTS, digits_vectors, machine, table, train_briefly, train_steps, write

REGIMES = ("2d", "64d", "image-flow", "image-classifier")
METHODS = ("broyden", "fixed_point", "auto")
PRECISIONS = ((torch.float64, 1e-8), (torch.float32, 1e-5))


# ----------------------------------------------------------------------------- problems


class Recorder:
    """Context manager recording (g, y) of every solve_residual call a ResidualBlock makes.

    Inside it the blocks skip their log-determinants (only the maps are needed to reach each
    block's input), which makes collecting the problems of the image flow affordable.
    """

    def __init__(self) -> None:
        self.problems: list[tuple[torch.nn.Module, torch.Tensor]] = []

    def __enter__(self) -> "Recorder":
        self._solve, self._logdet = residual_module.solve_residual, residual_module.residual_logdet

        def record(g, y, config=None, z0=None):
            self.problems.append((g, y.detach().clone()))
            return self._solve(g, y, config, z0)

        def no_logdet(g, x, config):
            return g(x), x.new_zeros(x.shape[0]), None

        residual_module.solve_residual = record
        residual_module.residual_logdet = no_logdet
        return self

    def __exit__(self, *exc) -> None:
        residual_module.solve_residual = self._solve
        residual_module.residual_logdet = self._logdet


def problems_of(model, regime: str, x: torch.Tensor) -> list[tuple[str, torch.nn.Module, torch.Tensor]]:
    """("forward" | "inverse", g, y) of every root problem the model solves on the data x."""
    out = []
    with torch.no_grad():
        if regime == "image-classifier":
            with Recorder() as rec:
                model(x)
            return [("forward", g, y) for g, y in rec.problems]
        with Recorder() as rec:
            z, _ = model.transform(x)
        out += [("forward", g, y) for g, y in rec.problems]
        with Recorder() as rec:
            model.transform.inverse(z)
        out += [("inverse", g, y) for g, y in rec.problems]
    return out


def residual_fn(g, y: torch.Tensor):
    shape = y.shape[1:]
    yf = y.reshape(y.shape[0], -1)

    def F(z, idx):
        rhs = yf if idx is None else yf[idx]
        return z + g(z.view(z.shape[0], *shape)).reshape(z.shape[0], -1) - rhs

    return F, yf


def solve_once(g, y: torch.Tensor, method: str, tol: float) -> tuple[float, float, object]:
    F, yf = residual_fn(g, y)
    cap = 200 if method == "broyden" else 2000
    cfg = SolverConfig(method=method, tol=tol, max_iter=cap, on_failure="ignore")
    c, w = time.process_time(), time.perf_counter()
    with torch.no_grad():
        z, s = find_root(F, yf.clone(), cfg, scale=yf.norm(dim=1), event_shape=y.shape[1:])
    return time.process_time() - c, time.perf_counter() - w, (z, s)


def g_seconds(g, y: torch.Tensor, reps: int = 5) -> float:
    """Median process CPU seconds of one batched g call on y."""
    ts = []
    with torch.no_grad():
        g(y)
        for _ in range(reps):
            c = time.process_time()
            g(y)
            ts.append(time.process_time() - c)
    return statistics.median(ts)


def local_contraction(g, z: torch.Tensor, samples: int = 64, iters: int = 20) -> tuple[float, float]:
    """Median and max over ``samples`` rows of ‖J_g(z_i)‖₂, by power iteration on J_gᵀJ_g."""
    z = z[:samples].detach()
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(z)
    sigma = torch.zeros(z.shape[0], dtype=z.dtype)
    with torch.enable_grad():
        zl = z.clone().requires_grad_(True)
        out = g(zl)
        u0 = torch.zeros_like(out, requires_grad=True)
        (vjp,) = torch.autograd.grad(out, zl, u0, create_graph=True)  # Jᵀu0, linear in u0
        for _ in range(iters):
            v = v / v.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *[1] * (v.dim() - 1))
            (Jv,) = torch.autograd.grad(vjp, u0, v, retain_graph=True)
            (JtJv,) = torch.autograd.grad(out, zl, Jv, retain_graph=True)
            sigma = Jv.flatten(1).norm(dim=1)
            v = JtJv.detach()
    return float(sigma.median()), float(sigma.max())


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


# ----------------------------------------------------------------------------- models


def build(regime: str, coeff: float, steps: int, data: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    if regime == "2d":
        model = impflow.models.impflow(2, blocks=4, coeff=coeff)
        if steps:
            train_briefly(model, steps)
    elif regime == "64d":
        model = impflow.models.impflow(64, blocks=2, coeff=coeff)
        if steps:
            train_steps(model, lambda m, xb, _: -m.log_prob(xb).mean(), data["vectors"], steps, batch=256, lr=1e-3)
    elif regime == "image-flow":
        model = image_impflow((1, 8, 8), (1, 1, 1), hidden=64, coeff=coeff, logdet="unbiased")
        if steps:
            train_steps(model, lambda m, xb, _: -m.log_prob(xb).mean(), data["images"], steps, batch=64, lr=1e-3)
    else:
        model = classifier((1, 8, 8), 10, "impflow", coeff=coeff, width=16)
        if steps:
            loss = lambda m, xb, yb: Fn.cross_entropy(m(xb), yb)
            train_steps(model, loss, data["unit_images"], steps, batch=64, lr=1e-2, labels=data["labels"])
    return model.eval()


def load_data(batch: int, vector_batch: int, image_batch: int) -> dict:
    digits = load_digits()
    unit, labels = digits.tensors("train", generator=torch.Generator().manual_seed(0))
    logit, _ = digits.preprocess()(unit)
    return {
        "2d": toy2d.sample("checkerboard", batch, seed=1, dtype=torch.float64),
        "vectors": digits_vectors(digits, "train", seed=0),
        "images": logit,
        "unit_images": unit,
        "labels": labels,
        "64d": digits_vectors(digits, "test", seed=1)[:vector_batch],
        "image-flow": digits.preprocess()(digits.tensors("test", generator=torch.Generator().manual_seed(1))[0])[0][
            :image_batch
        ],
        "image-classifier": digits.tensors("test", generator=torch.Generator().manual_seed(1))[0][:image_batch],
    }


# ----------------------------------------------------------------------------- benchmark


def measure(model, regime: str, coeff: float, x: torch.Tensor, dtype, tol: float, repeats: int) -> dict:
    model = copy.deepcopy(model).to(dtype)
    probs = problems_of(model, regime, x.to(dtype))
    per = {m: {"evals": [], "calls": [], "cpu": [], "wall": [], "conv": []} for m in METHODS}
    resolved: dict[str, int] = {}
    lip_med, lip_max, g_cpu = [], [], []
    for kind, g, y in probs:
        runs = {m: [] for m in METHODS}
        for _ in range(repeats):  # interleave the methods so machine load hits all alike
            for m in METHODS:
                runs[m].append(solve_once(g, y, m, tol))
        for m in METHODS:
            cpu = statistics.median(r[0] for r in runs[m])
            wall = statistics.median(r[1] for r in runs[m])
            z, s = runs[m][0][2]
            per[m]["evals"].append(s.evaluations)
            per[m]["calls"].append(s.calls)
            per[m]["cpu"].append(cpu)
            per[m]["wall"].append(wall)
            per[m]["conv"].append(s.converged / s.batch)
            if m == "auto":
                resolved[s.method] = resolved.get(s.method, 0) + 1
        z = runs["fixed_point"][0][2][0].view_as(y)
        med, mx = local_contraction(g, z)
        lip_med.append(med)
        lip_max.append(mx)
        g_cpu.append(g_seconds(g, y))
    row = {
        "regime": regime,
        "n": probs[0][2][0].numel(),
        "batch": x.shape[0],
        "problems": len(probs),
        "coeff": coeff,
        "dtype": str(dtype).split(".")[1],
        "tol": tol,
        "lip_median": statistics.median(lip_med),
        "lip_max": max(lip_max),
        "g_ms": 1e3 * sum(g_cpu) / len(g_cpu),
    }
    for m in METHODS:
        d = per[m]
        row[f"{m}_evals"] = sum(d["evals"]) / len(d["evals"])
        row[f"{m}_calls"] = sum(d["calls"]) / len(d["calls"])
        row[f"{m}_seconds"] = sum(d["cpu"])
        row[f"{m}_wall"] = sum(d["wall"])
        row[f"{m}_converged"] = min(d["conv"])
        # CPU seconds per batched call beyond the g evaluations it pays for (ms)
        g_total = sum(c * gs for c, gs in zip(d["calls"], g_cpu))
        row[f"{m}_overhead_ms"] = 1e3 * (sum(d["cpu"]) - g_total) / max(sum(d["calls"]), 1)
    # what auto ran, with the number of problems (of ``problems``) where it ran that
    row["auto_method"] = ", ".join(f"{k} ×{v}" for k, v in sorted(resolved.items()))
    row["evals_ratio"] = row["fixed_point_evals"] / row["broyden_evals"]
    row["time_ratio"] = row["fixed_point_seconds"] / row["broyden_seconds"]
    row["wall_ratio"] = row["fixed_point_wall"] / row["broyden_wall"]
    best = min(row["fixed_point_seconds"], row["broyden_seconds"])
    row["auto_vs_best"] = row["auto_seconds"] / best
    row["faster"] = "broyden" if row["time_ratio"] > 1 else "fixed_point"
    return row


def memory_rows(flow: impflow.Flow, batch: int) -> list[dict]:
    """Memory of one float32 training step with the solver capped at 10 vs 100 iterations."""
    flow = copy.deepcopy(flow).float().train()
    x = toy2d.sample("checkerboard", batch, seed=2)
    out = []
    for iters in (10, 100):
        cfg = SolverConfig(method="fixed_point", tol=0.0, max_iter=iters, on_failure="ignore")
        b, mean_it = saved_bytes(copy.deepcopy(flow), x, cfg)
        out.append({"max_iter": iters, "mean_iterations": mean_it, "saved_MiB": b / 2**20})
    return out


SUMMARY = ["regime", "dtype", "lip_median", "evals_ratio", "time_ratio", "faster", "auto_vs_best"]


def summary(rows: list[dict]) -> list[dict]:
    """min–max of the key columns per (regime, dtype)."""
    out = []
    for regime in dict.fromkeys(r["regime"] for r in rows):
        for dtype in ("float64", "float32"):
            rs = [r for r in rows if r["regime"] == regime and r["dtype"] == dtype]
            if not rs:
                continue
            span = lambda k: f"{min(r[k] for r in rs):.3g}–{max(r[k] for r in rs):.3g}"
            faster = {r["faster"] for r in rs}
            out.append({
                "regime": regime, "dtype": dtype, "lip_median": span("lip_median"),
                "evals_ratio": span("evals_ratio"), "time_ratio": span("time_ratio"),
                "faster": " / ".join(f"{m} ×{sum(r['faster'] == m for r in rs)}" for m in sorted(faster)),
                "auto_vs_best": span("auto_vs_best"),
            })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regimes", nargs="+", choices=REGIMES, default=list(REGIMES))
    ap.add_argument("--coeffs", type=float, nargs="+", default=[0.9, 0.99])
    ap.add_argument("--train-steps", type=int, default=300, help="2-D training steps")
    ap.add_argument("--train-steps-digits", type=int, default=50, help="training steps of the digits models")
    ap.add_argument("--batch", type=int, default=2000, help="2-D batch")
    ap.add_argument("--vector-batch", type=int, default=256)
    ap.add_argument("--image-batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="solver")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    command = "python benchmarks/solver.py " + shlex.join(sys.argv[1:])
    data = load_data(args.batch, args.vector_batch, args.image_batch)
    start = time.perf_counter()

    rows, mem = [], []
    for regime in args.regimes:
        steps = args.train_steps if regime == "2d" else args.train_steps_digits
        for coeff in args.coeffs:
            for state in ("fresh", "trained"):
                model = build(regime, coeff, steps if state == "trained" else 0, data)
                if regime == "2d" and state == "trained" and coeff == max(args.coeffs):
                    mem = memory_rows(model, args.batch)
                for dtype, tol in PRECISIONS:
                    row = measure(model, regime, coeff, data[regime], dtype, tol, args.repeats)
                    row["networks"] = state
                    rows.append(row)
                    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    cols = ["regime", "n", "coeff", "networks", "dtype", "lip_median", "lip_max", "broyden_evals",
            "fixed_point_evals", "evals_ratio", "broyden_seconds", "fixed_point_seconds", "time_ratio",
            "broyden_overhead_ms", "fixed_point_overhead_ms", "g_ms", "broyden_converged",
            "fixed_point_converged", "auto_method", "auto_vs_best"]
    md = [
        "# Broyden vs fixed point (generated by benchmarks/solver.py)",
        "",
        f"Command: `{command}` ({time.perf_counter() - start:.0f} s; {machine()})",
        "",
        "evals: g evaluations per sample (mean over the problems); seconds: process CPU time summed over",
        "the problems (median of the repeats); ratios are fixed point / Broyden (> 1: Broyden faster);",
        "lip: ‖J_g(z*)‖₂ at the solutions (median, max); overhead_ms: CPU ms per batched call beyond",
        "its g evaluation (a difference of two noisy timings; negative = within noise); g_ms: one batched",
        "g call; auto_method: what the default ran (× number of problems); auto_vs_best: auto's time /",
        "the faster method's.",
        "float64 to ‖F‖ < 1e-8, float32 to ‖F‖ < 1e-5, per sample.",
        "",
        table(rows, cols),
        "",
    ]
    if mem:
        md += [
            "Memory of one float32 training step of the trained 2-D ImpFlow (largest coeff, batch "
            f"{args.batch}): bytes saved for backward with the solver capped at 10 vs 100 iterations.",
            "",
            table(mem, ["max_iter", "mean_iterations", "saved_MiB"]),
            "",
        ]
    md += ["Ranges per regime and dtype (over coeff and fresh/trained):", "", table(summary(rows), SUMMARY), ""]
    print("\n".join(md))
    payload = {"machine": machine(), "command": command, "args": vars(args), "solvers": rows, "memory": mem}
    path = write(args.name, payload)
    (RESULTS / f"{args.name}.md").write_text("\n".join(md))
    print(f"wrote {path} and {args.name}.md")


if __name__ == "__main__":
    main()
