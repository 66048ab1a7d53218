"""Training steps/s of a small 2-D ImpFlow with 1 vs 2 intra-op threads, with the other core idle
and with a busy-loop process pinned to it.

The thread settings are alternated within each round (1, 2, 1, 2, ...) so slow drifts in the
machine's load hit both alike. Writes ``benchmarks/results/threads.json`` and prints a table;
the default of ``impflow train --threads`` is chosen from these numbers.

    python benchmarks/threads.py [--rounds 3] [--min-time 4] [--out benchmarks/results/threads.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

import impflow
from impflow.data import toy2d

BATCHES = (1024, 5000)
THREADS = (1, 2)
MODEL = dict(dim=2, blocks=4, hidden=(128, 128))


@contextmanager
def busy_core(enabled: bool) -> Iterator[int | None]:
    """A child process spinning on the last CPU (pinned there when the OS allows), if enabled."""
    if not enabled:
        yield None
        return
    code = (
        "import os, sys\n"
        "try:\n    os.sched_setaffinity(0, {int(sys.argv[1])})\nexcept (AttributeError, OSError):\n    pass\n"
        "while True:\n    pass\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str((os.cpu_count() or 1) - 1)])
    try:
        time.sleep(0.5)
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def training_step(flow: impflow.Flow, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    """One maximum-likelihood step (exact log-det, as the 2-D models train by default)."""
    loss = -flow.log_prob(x).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def measure(batch: int, threads: int, flow: impflow.Flow, opt: torch.optim.Optimizer, gen: torch.Generator,
            min_steps: int, min_time: float, max_time: float) -> dict:
    """Steps/s over at least ``min_steps`` steps and ``min_time`` seconds (stopping at ``max_time``)."""
    torch.set_num_threads(threads)
    training_step(flow, opt, toy2d.sample("checkerboard", batch, generator=gen))  # warm-up after the switch
    load_before = os.getloadavg()[0]
    steps, start = 0, time.perf_counter()
    while True:
        training_step(flow, opt, toy2d.sample("checkerboard", batch, generator=gen))
        steps += 1
        elapsed = time.perf_counter() - start
        if (steps >= min_steps and elapsed >= min_time) or elapsed >= max_time:
            break
    return {"steps": steps, "seconds": elapsed, "steps_per_s": steps / elapsed,
            "load_before": load_before, "load_after": os.getloadavg()[0]}


def run(rounds: int, min_steps: int, min_time: float, max_time: float) -> list[dict]:
    rows = []
    for busy in (False, True):
        with busy_core(busy):
            for batch in BATCHES:
                torch.manual_seed(0)
                flow = impflow.models.impflow(**MODEL)
                opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
                gen = torch.Generator().manual_seed(0)
                for r in range(rounds):
                    for threads in THREADS:
                        m = measure(batch, threads, flow, opt, gen, min_steps, min_time, max_time)
                        rows.append({"other_core": "busy" if busy else "idle", "batch": batch,
                                     "threads": threads, "round": r, **m})
                        print(f"  {rows[-1]['other_core']:4s} batch {batch:5d} threads {threads}: "
                              f"{m['steps_per_s']:7.2f} steps/s (load {m['load_before']:.1f})", flush=True)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Median steps/s per (other core, batch, threads) and the 2-thread / 1-thread ratio."""
    out = []
    keys = sorted({(r["other_core"], r["batch"]) for r in rows}, key=lambda k: (k[0] != "idle", k[1]))
    for core, batch in keys:
        med = {t: statistics.median(r["steps_per_s"] for r in rows
                                    if (r["other_core"], r["batch"], r["threads"]) == (core, batch, t))
               for t in THREADS}
        out.append({"other_core": core, "batch": batch,
                    **{f"steps_per_s_{t}_thread{'s' if t > 1 else ''}": med[t] for t in THREADS},
                    "speedup_2_over_1": med[2] / med[1], "fastest_threads": max(med, key=med.get)})
    return out


def table(summary: list[dict]) -> str:
    lines = ["| other core | batch | 1 thread (steps/s) | 2 threads (steps/s) | 2 / 1 | fastest |",
             "|---|---:|---:|---:|---:|---:|"]
    for s in summary:
        lines.append(f"| {s['other_core']} | {s['batch']} | {s['steps_per_s_1_thread']:.2f} | "
                     f"{s['steps_per_s_2_threads']:.2f} | {s['speedup_2_over_1']:.2f} | {s['fastest_threads']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-steps", type=int, default=3)
    parser.add_argument("--min-time", type=float, default=4.0, help="seconds per measurement, at least")
    parser.add_argument("--max-time", type=float, default=15.0, help="seconds per measurement, at most")
    parser.add_argument("--note", default="", help="free text on the machine's conditions, stored in the JSON")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "threads.json")
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load_start = os.getloadavg()
    rows = run(args.rounds, args.min_steps, args.min_time, args.max_time)
    summary = summarize(rows)
    result = {
        "benchmark": "impflow training step (exact log-det, Adam) on checkerboard",
        "model": {**MODEL, "hidden": list(MODEL["hidden"]),
                  "params": sum(p.numel() for p in impflow.models.impflow(**MODEL).parameters())},
        "conditions": {
            "started": started,
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "loadavg_at_start": load_start,
            "loadavg_at_end": os.getloadavg(),
            "busy": "a Python busy loop pinned to the last CPU (sched_setaffinity)",
            "note": args.note,
        },
        "summary": summary,
        "runs": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(summary))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
