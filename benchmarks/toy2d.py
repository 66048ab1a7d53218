"""ImpFlow-4 vs ResFlow-8 on 2-D toy densities under the same step budget (issue 3's target).

For every dataset × model × seed: train through :class:`impflow.train.Trainer` with the
settings of ``impflow experiment fig3`` (:func:`impflow.experiments.fig3.train_one`: the same
hidden sizes, hence the same networks and parameters, Adam with warm-up and cosine decay,
exact log-dets, 1 CPU thread), then the test NLL on 20000 fresh points at the best-validation
checkpoint, the gap to the entropy, parameters and wall time. Means over seeds per dataset and
model; the issue expects ImpFlow-4 below ResFlow-8 on average.

    python benchmarks/toy2d.py [--datasets checkerboard,8gaussians,2spirals] [--steps 1500]
                               [--hidden 64,64] [--batch 1024] [--seeds 0,1,2] [--runs runs/toy2d]

Runs go to ``RUNS/<dataset>/<model>-seed<K>`` (``impflow eval/plot`` work on them); finished
runs with the same settings are reused, unfinished ones resumed (so ``impflow experiment fig3
--out RUNS/checkerboard`` draws the figure from the same runs). Results:
``benchmarks/results/toy2d.json`` and ``.md``.

Default budget (1500 steps, batch 1024, 64-64, 3 seeds, checkerboard): about 25-40 min on one
core of the shared 2-core machines (ImpFlow-4 steps cost ≈ 2× ResFlow-8 steps).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from impflow.config import parse_hidden, parse_switch
from impflow.data import toy2d
from impflow.experiments import fig3

from common import RESULTS, machine, arg_type, table, write

COLUMNS = ["data", "model", "seed", "params", "nll", "nll_bits", "gap", "gap_bits", "wall_seconds", "best_step"]
ORDINAL = {2: "second", 3: "third", 4: "fourth"}
SUMMARY = ["data", "model", "params", "nll_mean", "nll_std", "nll_bits_mean", "gap_mean", "gap_bits_mean",
           "wall_seconds_mean"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="checkerboard", help="comma-separated toy datasets")
    ap.add_argument("--steps", type=int, default=fig3.FULL.steps)
    ap.add_argument("--hidden", type=arg_type(parse_hidden), default=fig3.FULL.hidden)
    ap.add_argument("--batch", type=int, default=fig3.FULL.batch_size)
    ap.add_argument("--lr", type=float, default=fig3.FULL.lr)
    ap.add_argument("--actnorm", type=arg_type(parse_switch), default=None,
                    help="true/false for both models (default: the builders' ActNorm before every block; "
                         "the ImpFlow paper's toy code uses none); false adds -noactnorm to the run folders")
    ap.add_argument("--resflow-actnorm-every", type=int, default=1,
                    help="2: ResFlow-8's ActNorms before every second block only, 5 like ImpFlow-4's "
                    "(exactly equal parameters)")
    ap.add_argument("--activation", default=None,
                    help="activation of every g for both models (default: the builders' LipSwish); "
                         "adds -ACTIVATION to the run folders")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--runs", type=Path, default=Path("runs/toy2d"), help="where the run directories go")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="toy2d", help="results file stem under benchmarks/results")
    args = ap.parse_args()
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [d for d in datasets if d not in toy2d.NAMES]
    if unknown:
        ap.error(f"unknown dataset(s) {', '.join(unknown)}; valid: {', '.join(toy2d.NAMES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(args.threads)
    base = replace(fig3.FULL, steps=args.steps, hidden=tuple(args.hidden), batch_size=args.batch, lr=args.lr,
                   warmup=min(fig3.FULL.warmup, args.steps // 10), actnorm=args.actnorm,
                   activation=args.activation, resflow_actnorm_every=args.resflow_actnorm_every)
    every = args.resflow_actnorm_every
    suffix = (("-noactnorm" if args.actnorm is False else "") + (f"-{args.activation}" if args.activation else "")
              + (f"-actnorm-every{every}" if every != 1 and args.actnorm is not False else ""))
    start = time.perf_counter()
    rows = []
    for data in datasets:
        cfg = replace(base, data=data)
        for seed in seeds:
            for model in fig3.MODELS:
                row = fig3.train_one(args.runs / data / f"{model}-seed{seed}{suffix}", model, cfg, seed, progress="none")
                rows.append(row)
                print(f"{data} {row['model']} seed {seed}: {row['nll']:.4f} nats ({row['nll_bits']:.4f} bits), "
                      f"{row['wall_seconds']:.0f} s{' (reused)' if row['reused'] else ''}", flush=True)
    summary = fig3.summarize(rows)
    verdict = {}
    for data in datasets:
        means = {s["model"].split("-")[0]: s["nll_mean"] for s in summary if s["data"] == data}
        verdict[data] = {"impflow_minus_resflow_nats": means["impflow"] - means["resflow"],
                         "impflow_better": means["impflow"] < means["resflow"]}
    payload = {
        "benchmark": "ImpFlow-4 vs ResFlow-8 (same networks) on toy 2-D densities, same step budget",
        "machine": machine(),
        "settings": asdict(base) | {"hidden": list(base.hidden), "data": datasets, "seeds": seeds,
                                    "threads": args.threads, "runs": str(args.runs)},
        "units": "test NLL in nats per example (bits = nats / ln 2) on 20000 fresh points, best-validation "
                 "checkpoint; wall_seconds: training incl. evaluations/checkpoints",
        "rows": rows,
        "summary": summary,
        "verdict": verdict,
        "train_wall_seconds_total": sum(r["wall_seconds"] for r in rows),
        "reused_runs": sum(r["reused"] for r in rows),
        "elapsed_seconds": time.perf_counter() - start,
    }
    m = payload["machine"]
    reused = f", {payload['reused_runs']} of {len(rows)} runs reused from {args.runs}" if payload["reused_runs"] else ""
    md = "\n".join(
        [
            "# ImpFlow-4 vs ResFlow-8 on toy 2-D data (`benchmarks/toy2d.py`)",
            "",
            f"{base.steps} steps, batch {base.batch_size}, hidden {','.join(map(str, base.hidden))}, lr {base.lr:g}, "
            f"seeds {','.join(map(str, seeds))}, {args.threads} thread(s); torch {m['torch']}, {m['cpu']}, "
            f"{m['date']} (shared 2-core machine).",
            "ActNorm: " + ("none (the ImpFlow paper's toy protocol; equal parameter counts)" if args.actnorm is False
                           else "before every block and at the end (ResFlow-8: 9, ImpFlow-4: 5)" if every == 1
                           else f"before every {ORDINAL.get(every, f'{every}-th')} ResFlow-8 block and every "
                           f"ImpFlow-4 block, and at the end (ResFlow-8: {-(-8 // every) + 1}, ImpFlow-4: 5)") + ". "
            f"Activation: {args.activation or 'lipswish (default)'}.",
            f"Command: `python benchmarks/toy2d.py{' --actnorm false' if args.actnorm is False else ''}"
            f"{f' --resflow-actnorm-every {every}' if every != 1 else ''}"
            f"{' --activation ' + args.activation if args.activation else ''} --seeds {args.seeds} "
            f"--steps {base.steps} --name {args.name}` (finished runs under {args.runs} are reused).",
            "NLL in nats (bits = nats / ln 2), gap = NLL − entropy.",
            "",
            table(rows, COLUMNS),
            "",
            "Means over seeds:",
            "",
            table(summary, SUMMARY),
            "",
            "Verdict (mean ImpFlow-4 − mean ResFlow-8, nats): "
            + "; ".join(
                f"{d}: {v['impflow_minus_resflow_nats']:+.4f} ({'ImpFlow' if v['impflow_better'] else 'ResFlow'} better)"
                for d, v in verdict.items()
            ),
            f"Training wall time, all runs: {payload['train_wall_seconds_total'] / 60:.1f} min; this invocation "
            f"{payload['elapsed_seconds'] / 60:.1f} min{reused}.",
        ]
    )
    print(md)
    path = write(args.name, payload)
    (RESULTS / f"{args.name}.md").write_text(md + "\n")
    print(f"wrote {path} and {RESULTS / f'{args.name}.md'}")


if __name__ == "__main__":
    main()
