"""Digits classification with Lipschitz-constrained ResFlow vs ImpFlow residual blocks.

The ImpFlow paper's classification experiment (CIFAR-10/100) replaces the residual blocks of a
ResNet by ResFlow blocks x ↦ x + g(x) or by ImpFlow blocks, every g with Lip ≤ c, and reports
that ImpFlow blocks give lower test error at every c ∈ {0.99, 0.9, 0.8, 0.7, 0.6} at equal
parameters. Here the same comparison runs on scikit-learn's 8×8 digits (always available):

* data: ``impflow.data.load_digits`` (1797 images, a seeded 80/20 train/test split, 1438/359),
  levels 0..16 scaled to [0, 1] (x/16); optionally (``--shift k``) training batches are
  translated by up to k pixels with zero fill (the analogue of CIFAR's random crops), and
  (``--vary-split``) seed s uses its own split (split seed s), so the spread over seeds includes
  the choice of test images;
* model: ``impflow.models.classifier((1, 8, 8), 10, block, coeff, width, ...)``: conv stem,
  ``blocks`` ResFlow blocks or ``blocks // 2`` ImpFlow blocks (each holds two networks, so
  parameter counts are equal; checked and recorded), 2×2 average pooling, linear head; with
  ``--stages W,W,...`` the paper's ResNet-like layout instead: one stage of blocks per width
  (2 ResFlow / 1 ImpFlow per stage by default), a 1×1 stride-2 conv + BatchNorm + ReLU between
  stages; ``--kernels`` sets the convs inside each g (3,1,3 by default; the paper's is 3,3);
* training: cross-entropy, Adam (lr 1e-2 by default: at 2e-3 both still underfit after 15
  epochs) with cosine annealing to 0 over all steps, the same epochs,
  batch size, learning rate and seeds (init + batch order) for both block types;
* reported per (c, block): test error (%) mean ± std over seeds, the paired (same seed, split
  and batch order) difference ImpFlow − ResFlow with its standard error, parameters, training time,
  and for ImpFlow the forward/backward solver iterations (``block.forward_solve``).

Usage::

    python benchmarks/classify.py                 # the default budget (~20 min on 1 thread)
    python benchmarks/classify.py --quick         # smoke run (~1 min, prints only)
    python benchmarks/classify.py --epochs 30 --seeds 5 --coeffs 0.99 0.6
    python benchmarks/classify.py --epochs 25 --seeds 3 --shift 1 --vary-split   # results/classify.*
    python benchmarks/classify.py --stages 16,32 --kernels 3,3 --name NAME       # multi-stage layout

Results go to ``benchmarks/results/classify.json`` and ``classify.md`` (``--name`` changes the
file stem). The JSON is rewritten after every run, so an interrupted sweep keeps what it did.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import arg_type, load_parts, machine, merged_command, publish, seeds_text, write  # noqa: E402

from impflow.config import parse_hidden  # noqa: E402
from impflow.data.images import load_digits  # noqa: E402
from impflow.models import classifier  # noqa: E402
from impflow.solvers import SolverConfig  # noqa: E402

BLOCKS = ("resflow", "impflow")
COEFFS = (0.99, 0.9, 0.8, 0.7, 0.6)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--coeffs", type=float, nargs="+", default=list(COEFFS))
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (seed-start, seed-start + 1, …)")
    p.add_argument("--seed-start", type=int, default=0, help="first seed (to run seeds in separate processes)")
    p.add_argument(
        "--merge", nargs="+", default=None, metavar="STEM",
        help="no training: merge results/STEM.json files (same settings, different seeds) into --name",
    )
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2, help="Adam's initial lr (cosine-annealed to 0)")
    p.add_argument("--width", type=int, default=16, help="channels the blocks act on")
    p.add_argument("--hidden", type=int, default=None, help="channels inside g (default width)")
    p.add_argument(
        "--resflow-blocks", type=int, default=None,
        help="ResFlow blocks (per stage with --stages; default 4, or 2 per stage); ImpFlow gets half as many",
    )
    p.add_argument(
        "--stages", type=arg_type(parse_hidden), default=None, metavar="W,W,...",
        help="multi-stage layout: block widths per stage, a 1×1 stride-2 conv + BN + ReLU between "
        "stages (default: one stage of --width)",
    )
    p.add_argument("--kernels", type=arg_type(parse_hidden), default=(3, 1, 3), metavar="K,K,...", help="conv kernel sizes inside g")
    p.add_argument("--pool", type=int, default=2)
    p.add_argument("--solver", choices=("fixed_point", "broyden"), default="fixed_point")
    p.add_argument("--tol", type=float, default=None, help="solver tolerance (default 1e-6 in float32)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--split-seed", type=int, default=0, help="train/test split (unless --vary-split)")
    p.add_argument(
        "--vary-split", action="store_true",
        help="seed s also draws its own 80/20 split (split seed s): the spread then includes split noise",
    )
    p.add_argument(
        "--shift", type=int, default=0,
        help="augmentation: random translation of each training image by up to this many pixels (zero fill)",
    )
    p.add_argument(
        "--quick", action="store_true",
        help="smoke run: 1 seed, c ∈ {0.9, 0.6}, 2 epochs; prints only unless --name is given",
    )
    p.add_argument("--name", default=None, help="results file stem (default classify)")
    args = p.parse_args(argv)
    args.no_write = args.quick and args.name is None
    args.name = args.name or "classify"
    if args.quick:
        args.seeds, args.coeffs, args.epochs = 1, [0.9, 0.6], 2
    if args.resflow_blocks is None:
        args.resflow_blocks = 4 if args.stages is None else 2
    if args.resflow_blocks % 2:
        p.error("--resflow-blocks must be even (ImpFlow gets half as many)")
    return args


def digits(split_seed: int) -> dict[str, torch.Tensor]:
    d = load_digits(test_fraction=0.2, seed=split_seed)
    scale = float(d.levels - 1)  # levels 0..16 -> [0, 1]
    return {
        "x_train": d.train_images.float() / scale,
        "y_train": d.train_labels.long(),
        "x_test": d.test_images.float() / scale,
        "y_test": d.test_labels.long(),
    }


def random_shift(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image of x (B, C, H, W) by (dy, dx) ∈ {−k..k}², zero fill (random-crop augmentation)."""
    if k == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (k, k, k, k))
    dy = torch.randint(0, 2 * k + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * k + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(b, x.shape[1], h, w + 2 * k)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(b, x.shape[1], h, w)
    return out.gather(3, cols)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _solve_stats(model: torch.nn.Module) -> list[tuple[float, float | None, int, int]]:
    """(forward mean iterations, backward mean iterations, unconverged, batch) per ImpFlow block."""
    out = []
    for b in model.blocks:
        info = getattr(b, "forward_solve", None)
        if info is None:
            continue
        bwd = info.backward.mean_iterations if info.backward is not None else None
        out.append((info.forward.mean_iterations, bwd, info.forward.failed, info.forward.batch))
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> tuple[float, float, list]:
    """(error %, mean cross-entropy, solver stats of the last batch)."""
    wrong, loss = 0, 0.0
    for i in range(0, len(x), batch):
        logits = model(x[i : i + batch])
        wrong += int((logits.argmax(1) != y[i : i + batch]).sum())
        loss += float(F.cross_entropy(logits, y[i : i + batch], reduction="sum"))
    return 100.0 * wrong / len(x), loss / len(x), _solve_stats(model)


def run_one(args: argparse.Namespace, data: dict, block: str, coeff: float, seed: int) -> dict:
    torch.manual_seed(seed)
    n_blocks = args.resflow_blocks if block == "resflow" else args.resflow_blocks // 2
    solver = SolverConfig(method=args.solver, tol=args.tol)
    model = classifier(
        (1, 8, 8), 10, block=block, coeff=coeff, width=args.width if args.stages is None else None,
        blocks=n_blocks, hidden=args.hidden, kernels=args.kernels, pool=args.pool, solver=solver,
        stages=args.stages,
    )
    x, y = data["x_train"], data["y_train"]
    steps_per_epoch = math.ceil(len(x) / args.batch)
    total = steps_per_epoch * args.epochs
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    gen = torch.Generator().manual_seed(seed)  # same batch order for both block types

    fwd_its, bwd_its, fwd_max, failed, warns = [], [], 0.0, 0, 0
    t0 = time.perf_counter()
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(args.epochs):
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), args.batch):
                idx = order[i : i + args.batch]
                loss = F.cross_entropy(model(random_shift(x[idx], args.shift, gen)), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                for f, b, fail, _ in _solve_stats(model):
                    fwd_its.append(f)
                    fwd_max = max(fwd_max, f)
                    failed += fail
                    if b is not None:
                        bwd_its.append(b)
        train_time = time.perf_counter() - t0
        model.eval()
        t1 = time.perf_counter()
        test_err, test_loss, test_stats = evaluate(model, data["x_test"], data["y_test"])
        eval_time = time.perf_counter() - t1
        train_err, train_loss, _ = evaluate(model, x, y)
        warns = sum("solve" in str(w.message) or "converge" in str(w.message) for w in caught)

    rec = {
        "block": block, "coeff": coeff, "seed": seed, "blocks": n_blocks, "params": n_params(model),
        "steps": total, "test_error": test_err, "test_loss": test_loss,
        "train_error": train_err, "train_loss": train_loss,
        "train_time_s": train_time, "test_time_s": eval_time,
    }
    if block == "impflow":
        mean = lambda v: sum(v) / len(v) if v else None
        last = fwd_its[-len(model.blocks):]
        rec["solver"] = {
            "train_fwd_iters_mean": mean(fwd_its),          # per sample, averaged over blocks and steps
            "train_fwd_iters_last": mean(last),             # averaged over blocks, last step
            "train_fwd_iters_max": fwd_max,                 # worst (block, step) batch mean
            "train_bwd_iters_mean": mean(bwd_its),          # implicit backward (adjoint) solve
            "test_fwd_iters_mean": mean([s[0] for s in test_stats]),
            "unconverged_samples": failed + sum(s[2] for s in test_stats),
            "solver_warnings": warns,
        }
    return rec


def _paired(runs: list[dict], c: float, key: str) -> list[float]:
    """ImpFlow − ResFlow of ``key`` at coefficient c, one value per seed run with both blocks."""
    res = {r["seed"]: r[key] for r in runs if r["coeff"] == c and r["block"] == "resflow"}
    return [r[key] - res[r["seed"]] for r in runs if r["coeff"] == c and r["block"] == "impflow" and r["seed"] in res]


def _mean_se(v: list[float]) -> tuple[float | None, float | None]:
    mean = statistics.mean(v) if v else None
    return mean, (statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else None)


def summarise(runs: list[dict], coeffs: list[float]) -> list[dict]:
    rows = []
    for c in coeffs:
        row: dict = {"coeff": c}
        for block in BLOCKS:
            rs = [r for r in runs if r["coeff"] == c and r["block"] == block]
            if not rs:
                continue
            errs = [r["test_error"] for r in rs]
            row[block] = {
                "n": len(rs),
                "test_error_mean": statistics.mean(errs),
                "test_error_std": statistics.stdev(errs) if len(errs) > 1 else 0.0,
                "test_errors": errs,
                "train_error_mean": statistics.mean(r["train_error"] for r in rs),
                "params": sorted({r["params"] for r in rs}),
                "blocks": rs[0]["blocks"],
                "train_time_s_mean": statistics.mean(r["train_time_s"] for r in rs),
            }
            if block == "impflow":
                row[block]["fwd_iters_mean"] = statistics.mean(r["solver"]["train_fwd_iters_mean"] for r in rs)
                row[block]["fwd_iters_last"] = statistics.mean(r["solver"]["train_fwd_iters_last"] for r in rs)
                row[block]["bwd_iters_mean"] = statistics.mean(r["solver"]["train_bwd_iters_mean"] for r in rs)
                row[block]["test_fwd_iters_mean"] = statistics.mean(r["solver"]["test_fwd_iters_mean"] for r in rs)
                row[block]["unconverged_samples"] = sum(r["solver"]["unconverged_samples"] for r in rs)
        if "resflow" in row and "impflow" in row:
            row["equal_params"] = row["resflow"]["params"] == row["impflow"]["params"]
            row["impflow_better"] = row["impflow"]["test_error_mean"] < row["resflow"]["test_error_mean"]
            # seeds paired (same init seed, split and batch order): ImpFlow − ResFlow, points
            diffs = _paired(runs, c, "test_error")
            row["impflow_wins_seeds"] = f"{sum(d < 0 for d in diffs)}/{len(diffs)}"
            row["diff_mean"], row["diff_se"] = _mean_se(diffs)
            train = _paired(runs, c, "train_error")
            row["train_diff_mean"], row["train_diff_se"] = _mean_se(train)
            row["impflow_train_wins_seeds"] = f"{sum(d < 0 for d in train)}/{len(train)}"
        rows.append(row)
    return rows


def _pm(mean: float, se: float | None) -> str:
    return f"{mean:+.2f}" + (f" ± {se:.2f}" if se is not None else "")


def markdown(payload: dict) -> str:
    a = payload["settings"]
    rows = payload["summary"]
    pm = lambda d: f"{d['test_error_mean']:.2f} ± {d['test_error_std']:.2f}"
    lines = [
        "# Digits classification: ResFlow vs ImpFlow residual blocks",
        "",
        f"Command: `{payload['command']}`  ",
        f"Wall time: {payload['wall_time_s'] / 60:.1f} min"
        f"{' (summed over the merged runs)' if payload.get('merged_from') else ''} ({payload['machine']['threads']} thread(s), "
        f"torch {payload['machine']['torch']}, {payload['machine']['date']})",
        "",
        "Data: sklearn digits, seeded 80/20 split ("
        + ("a different split per seed (split seed = seed)" if a.get("vary_split") else f"split seed {a['split_seed']}")
        + f": {payload['data']['n_train']} train / {payload['data']['n_test']} test), x/16 ∈ [0, 1], "
        + (f"random shifts of up to {a['shift']} px (zero fill) on training batches.  " if a.get("shift") else "no augmentation.  "),
        model_line(a),
        f"Training: cross-entropy, Adam lr {a['lr']} with cosine annealing, batch {a['batch']}, "
        f"{a['epochs']} epochs ({payload['steps']} steps), seeds {seeds_text(payload['runs'])} "
        f"(same init seed and batch order for both blocks). ImpFlow solver: {a['solver']}, "
        f"tol {a['tol'] if a['tol'] is not None else '1e-6 (default)'}.",
        "",
        "Test error (%), mean ± std over seeds:",
        "",
        "| c | ResFlow | ImpFlow | ImpFlow better | Imp − Res (paired mean ± s.e.) | wins (seeds) | train error Imp − Res (wins) | params (Res / Imp) | train s/run (Res / Imp) | ImpFlow fwd iters (mean / last / test) | ImpFlow bwd iters |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "resflow" not in r or "impflow" not in r:
            continue
        R, I = r["resflow"], r["impflow"]
        lines.append(
            f"| {r['coeff']} | {pm(R)} | {pm(I)} | {'yes' if r['impflow_better'] else 'no'} | "
            f"{_pm(r['diff_mean'], r['diff_se'])} | "
            f"{r['impflow_wins_seeds']} | {_pm(r['train_diff_mean'], r['train_diff_se'])} ({r['impflow_train_wins_seeds']}) | "
            f"{R['params'][0]} / {I['params'][0]}"
            f"{'' if r['equal_params'] else ' (UNEQUAL)'} | "
            f"{R['train_time_s_mean']:.0f} / {I['train_time_s_mean']:.0f} | "
            f"{I['fwd_iters_mean']:.1f} / {I['fwd_iters_last']:.1f} / {I['test_fwd_iters_mean']:.1f} | "
            f"{I['bwd_iters_mean']:.1f} |"
        )
    better = [r["impflow_better"] for r in rows if "impflow_better" in r]
    lines += [
        "",
        f"ImpFlow lower mean error at every c: **{'yes' if better and all(better) else 'no'}** "
        f"({sum(better)}/{len(better)} values of c). Lower mean *training* error at every c: "
        f"**{'yes' if rows and all(r.get('train_diff_mean', 0) < 0 for r in rows) else 'no'}**.",
        "",
        "Solver iterations are per sample, averaged over ImpFlow blocks: `mean` over all training "
        "steps, `last` at the final step, `test` on the test set; the backward column is the "
        "implicit-gradient (adjoint) solve. Train error (%, mean): "
        + ", ".join(
            f"c={r['coeff']}: {r['resflow']['train_error_mean']:.2f} / {r['impflow']['train_error_mean']:.2f}"
            for r in rows if "resflow" in r and "impflow" in r
        )
        + " (ResFlow / ImpFlow).",
    ]
    return "\n".join(lines) + "\n"


def model_line(a: dict) -> str:
    """The markdown "Model:" line of settings ``a`` (older files lack stages / kernels)."""
    kernels = "-".join(map(str, a.get("kernels") or [3, 1, 3]))
    stages = a.get("stages")
    g = f"kernels {kernels}, LipSwish, every conv spectrally normalised to c"
    if stages is None:
        body = f"blocks (width {a['width']}, hidden {a['hidden'] or a['width']}, {g})"
        per = ""
    else:
        hidden = "= stage width" if a["hidden"] is None else f"{a['hidden']} scaled with the stage width"
        body = (
            f"{len(stages)} stages of widths {'-'.join(map(str, stages))} (hidden {hidden}, {g}), "
            "between stages a 1×1 stride-2 conv + BatchNorm + ReLU"
        )
        per = " per stage"
    return (
        f"Model: conv stem → {body} → {a['pool']}×{a['pool']} avg-pool → linear; "
        f"ResFlow {a['resflow_blocks']} blocks{per}, ImpFlow {a['resflow_blocks'] // 2} "
        f"block{'s' if a['resflow_blocks'] // 2 != 1 else ''}{per}.  "
    )


def merge(args: argparse.Namespace, command: str) -> dict:
    """One result from per-seed-range result files: their runs pooled; the training settings
    must agree; a (block, c, seed) run may appear only once."""
    keys = ("epochs", "batch", "lr", "width", "hidden", "resflow_blocks", "pool", "solver", "tol", "split_seed", "vary_split", "shift",
            "stages", "kernels")
    parts, runs = load_parts(
        args.merge, keys, ("block", "coeff", "seed"),
        defaults={"vary_split": False, "shift": 0, "stages": None, "kernels": [3, 1, 3]},
    )
    coeffs = sorted({r["coeff"] for r in runs}, reverse=True)
    seeds = sorted({r["seed"] for r in runs})
    settings = dict(parts[0]["settings"], coeffs=coeffs, seeds=len(seeds), seed_start=seeds[0])
    return dict(
        parts[0], command=merged_command(command, parts), settings=settings,
        wall_time_s=sum(q["wall_time_s"] for q in parts), summary=summarise(runs, coeffs), runs=runs,
        merged_from=list(args.merge),
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.merge:
        out = merge(args, "python benchmarks/classify.py " + " ".join(argv if argv is not None else sys.argv[1:]))
        publish(args.name, out, markdown(out))
        return out
    torch.set_num_threads(args.threads)
    data = digits(args.split_seed)
    command = "python benchmarks/classify.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(argv if argv is not None else sys.argv[1:]))
    steps = math.ceil(len(data["x_train"]) / args.batch) * args.epochs
    runs: list[dict] = []
    start = time.perf_counter()

    def payload() -> dict:
        return {
            "benchmark": "classify",
            "command": command,
            "settings": {k: v for k, v in vars(args).items() if k not in ("name", "no_write", "merge")},
            "data": {"name": "digits", "n_train": len(data["x_train"]), "n_test": len(data["x_test"])},
            "steps": steps,
            "machine": machine(),
            "wall_time_s": time.perf_counter() - start,
            "summary": summarise(runs, args.coeffs),
            "runs": runs,
        }

    for seed in range(args.seed_start, args.seed_start + args.seeds):
        if args.vary_split:
            data = digits(seed)
        for c in args.coeffs:
            for block in BLOCKS:
                rec = run_one(args, data, block, c, seed)
                runs.append(rec)
                extra = ""
                if block == "impflow":
                    s = rec["solver"]
                    extra = f" fwd_it {s['train_fwd_iters_mean']:.1f} (last {s['train_fwd_iters_last']:.1f}) bwd_it {s['train_bwd_iters_mean']:.1f}"
                print(
                    f"seed {seed} c {c:<4} {block:8s} params {rec['params']} err {rec['test_error']:5.2f}% "
                    f"train_err {rec['train_error']:5.2f}% {rec['train_time_s']:6.1f}s{extra}",
                    flush=True,
                )
                if not args.no_write:
                    write(args.name, payload())
    out = payload()
    publish(args.name, out, markdown(out), save=not args.no_write)
    return out


if __name__ == "__main__":
    main()
