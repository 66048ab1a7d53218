"""Training throughput (examples/s) of data-parallel CPU training: 2 gloo ranks vs 1 process.

Each measurement is one ``impflow train`` run in a fresh process (``--devices N``: N local
ranks, DistributedDataParallel over gloo, each rank one CPU thread and half of the global batch)
with the same global batch size, so the two settings do the same work per step:

* ``2-D ImpFlow``: 4 implicit blocks, 64-64 networks, checkerboard, batch 1024, exact log-dets;
* ``tabular``: 5 implicit blocks, 128-128 networks (the ``gas`` preset's model) on an 8-D array
  of correlated Gaussian data (GAS's dimension; the UCI files are not needed), batch 1000.

Throughput = (last − first recorded step) × batch / (training seconds between those records),
from the run's ``history.json``: the ``seconds`` field counts training steps only (no
evaluation, checkpoints or process start-up), and the steps before the first record (warm-up)
are left out. Settings run interleaved, in alternating order, for ``--rounds`` rounds; the
report gives every value, the median per setting, and the per-round ratio 2 ranks / 1 rank.
An optional third setting (``--settings``), 1 process with 2 threads, uses the same two cores
as 2 ranks; it is off by default because on cores shared with other jobs two intra-op threads
oversubscribe them and the run slows down many times (benchmarks/results/threads.json).

Usage::

    python benchmarks/throughput.py                 # 3 rounds (~6 min on 2 shared cores)
    python benchmarks/throughput.py --rounds 1 --steps 20 --name throughput-quick

Writes ``benchmarks/results/<name>.json`` and ``<name>.md`` (default name ``throughput``); the
JSON is rewritten after every run, so an interrupted benchmark keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, write  # noqa: E402

MODELS = {
    "2-D ImpFlow": dict(data="checkerboard", model="impflow", blocks=4, hidden="64,64", batch=1024),
    "tabular": dict(data="{array}", model="impflow", blocks=5, hidden="128,128", batch=1000),
}
SETTINGS = {  # name -> (ranks, threads per rank)
    "1 rank x 1 thread": (1, 1),
    "2 ranks x 1 thread": (2, 1),
    "1 rank x 2 threads": (1, 2),
}
DEFAULT_SETTINGS = ("1 rank x 1 thread", "2 ranks x 1 thread")
TABULAR_DIM = 8


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=30, help="training steps per run (records every --record)")
    p.add_argument("--record", type=int, default=10, help="steps between history records")
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    p.add_argument("--settings", nargs="+", choices=tuple(SETTINGS), default=list(DEFAULT_SETTINGS),
                   help="default: the two 1-thread settings (2 threads oversubscribe cores other jobs use)")
    p.add_argument("--name", default="throughput", help="results file stem")
    args = p.parse_args(argv)
    if args.steps < 2 * args.record or args.steps % args.record:
        p.error("--steps must be a multiple of --record and at least twice it (the first record is warm-up)")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


def tabular_array(folder: Path) -> Path:
    """An (N, 8) array of correlated Gaussian data (seeded)."""
    rng = np.random.default_rng(0)
    path = folder / "tabular.npy"
    np.save(path, rng.normal(size=(20000, TABULAR_DIM)) @ rng.normal(size=(TABULAR_DIM, TABULAR_DIM)))
    return path


def train_argv(model: dict, ranks: int, threads: int, steps: int, record: int, out: Path, array: Path) -> list[str]:
    return [
        "train", "--out", str(out), "--data", model["data"].format(array=array), "--model", model["model"],
        "--blocks", str(model["blocks"]), "--hidden", model["hidden"], "--batch-size", str(model["batch"]),
        "--steps", str(steps), "--eval-every", str(steps), "--log-every", str(record), "--eval-size", "1000",
        "--devices", str(ranks), "--threads", str(threads), "--device", "cpu", "--quiet",
    ]  # fmt: skip


def measure(argv: list[str], out: Path, batch: int, threads: int) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "impflow", *argv], capture_output=True, text=True, env=env,
                          timeout=900)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"impflow {' '.join(argv)} failed ({done.returncode}): {done.stderr[-2000:]}")
    history = json.loads((out / "history.json").read_text())
    first, last = history[0], history[-1]
    seconds = last["seconds"] - first["seconds"]
    steps = last["step"] - first["step"]
    return {
        "examples_per_s": steps * batch / seconds,
        "steps_timed": steps,
        "train_seconds_timed": seconds,
        "wall_seconds": wall,
        "final_loss": last["loss"],
    }


def summarise(runs: list[dict], models: list[str], settings: list[str]) -> list[dict]:
    rows = []
    for m in models:
        row: dict = {"model": m}
        for s in settings:
            values = [r["examples_per_s"] for r in runs if r["model"] == m and r["setting"] == s]
            if values:
                row[s] = {"median": statistics.median(values), "values": values}
        base = "1 rank x 1 thread"
        for s in settings:
            if s == base:
                continue
            ratios = []
            for rnd in sorted({r["round"] for r in runs}):
                pair = {r["setting"]: r["examples_per_s"] for r in runs if r["model"] == m and r["round"] == rnd}
                if base in pair and s in pair:
                    ratios.append(pair[s] / pair[base])
            if ratios:
                row[f"ratio {s} / {base}"] = {"median": statistics.median(ratios), "per_round": ratios}
        rows.append(row)
    return rows


def markdown(payload: dict) -> str:
    a = payload["settings"]
    lines = [
        "# Data-parallel training throughput on CPU (gloo)",
        "",
        f"Command: `{payload['command']}`  ",
        f"Wall time: {payload['wall_time_s'] / 60:.1f} min, torch {payload['machine']['torch']}, "
        f"{payload['machine']['date']}, {payload['cpu_count']} CPU cores (shared with other jobs: "
        f"1-min load average {payload['load_average_start']:.1f} at the start).",
        "",
        f"Each value: one `impflow train --devices N --threads T` run of {a['steps']} steps; examples/s over "
        f"steps {a['record']}..{a['steps']} from history.json's training seconds (no evaluation, checkpoints or "
        f"start-up). The global batch is the same in every setting (2 ranks: half each). {a['rounds']} rounds, "
        "settings interleaved in alternating order; medians, and the median over rounds of the per-round ratio.",
        "",
        "| model | setting | examples/s (median) | all values | ratio to 1 rank x 1 thread (median; per round) |",
        "|---|---|---|---|---|",
    ]
    for row in payload["summary"]:
        for s in a["settings"]:
            if s not in row:
                continue
            ratio = row.get(f"ratio {s} / 1 rank x 1 thread")
            shown = "1" if s == "1 rank x 1 thread" else (
                f"{ratio['median']:.2f} ({', '.join(f'{r:.2f}' for r in ratio['per_round'])})" if ratio else "")
            lines.append(f"| {row['model']} | {s} | {row[s]['median']:.0f} | "
                         f"{', '.join(f'{v:.0f}' for v in row[s]['values'])} | {shown} |")
    lines += [
        "",
        "Models: " + "; ".join(f"{k}: {v['model']} {v['blocks']} blocks, {v['hidden']} networks, batch {v['batch']}, "
                               f"data {'checkerboard' if v['data'] == 'checkerboard' else f'{TABULAR_DIM}-D array'}"
                               for k, v in MODELS.items() if k in a["models"]) + ".",
        "",
        "On a machine whose cores are busy with other jobs the ratios measure contention as much as scaling; "
        "compare them only within this file.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    given = sys.argv[1:] if argv is None else argv
    command = "python benchmarks/throughput.py" + ("".join(f" {a}" for a in given))
    runs: list[dict] = []
    start = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    def payload() -> dict:
        return {
            "benchmark": "throughput",
            "command": command,
            "settings": {k: v for k, v in vars(args).items() if k != "name"},
            "models": {k: MODELS[k] for k in args.models},
            "machine": machine(),
            "cpu_count": os.cpu_count(),
            "load_average_start": load,
            "wall_time_s": time.perf_counter() - start,
            "summary": summarise(runs, args.models, args.settings),
            "runs": runs,
        }

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        array = tabular_array(folder)
        for rnd in range(args.rounds):
            order = args.settings if rnd % 2 == 0 else args.settings[::-1]
            for m in args.models:
                for s in order:
                    ranks, threads = SETTINGS[s]
                    out = folder / f"{m.replace(' ', '_')}-{s.replace(' ', '_')}-{rnd}"
                    result = measure(train_argv(MODELS[m], ranks, threads, args.steps, args.record, out, array),
                                     out, MODELS[m]["batch"], threads)
                    runs.append({"round": rnd, "model": m, "setting": s, "ranks": ranks, "threads": threads} | result)
                    print(f"round {rnd} {m:12s} {s:20s} {result['examples_per_s']:9.0f} examples/s "
                          f"({result['wall_seconds']:.0f} s wall)", flush=True)
                    write(args.name, payload())
    out = payload()
    md = markdown(out)
    write(args.name, out)
    (RESULTS / f"{args.name}.md").write_text(md)
    print()
    print(md)
    return out


if __name__ == "__main__":
    main()
