"""Digits 8×8 density estimation: ImpFlow vs ResFlow vs Glow, NSF and DLF at matched size.

Issue #6: bits/dim on scikit-learn's digits as (1, 8, 8) images, every model at (about) the
same number of parameters and the same number of optimiser steps, against the best affine
flow (the Gaussian fit of the same preprocessed data).

* data: ``impflow.data.load_digits`` (seeded 80/20 split, 1438 train / 359 test images, 17
  levels). Each training batch is dequantised afresh, x = (x_int + u)/17, and preprocessed by
  ``Preprocess`` (y = logit(α + (1 − 2α)x), α = 0.05). The test set is dequantised once with a
  fixed seed, the same noise for every model.
* bits/dim = −(log p_Y(y) + ladj − 64 ln 17)/(64 ln 2) (``impflow.data.images.bits_per_dim``),
  ladj the logit's log-det: every preprocessing Jacobian is counted.
* models (all see y; none has its own logit):
  - ``impflow``: ``image_impflow((1, 8, 8), (n, n, n), hidden=h)``, ``n = --impflow-blocks``;
  - ``resflow``: ``image_resflow`` with 2n blocks per scale and the same h: the same number of
    networks, equal parameters up to the ActNorms (the paper's 2-2-2 vs 4-4-4 comparison);
  - ``glow`` and ``dlf``: ``models.classic`` in their image form (``shape=(1, 8, 8)``, 2 levels);
  - ``nsf``: vector form only (``models.classic.nsf`` has no image form): the 64 values of y
    flattened, spline couplings on alternating halves;
  Glow/DLF/NSF ``hidden`` is chosen so that their parameter count is closest to ResFlow's
  (checked: within ±10%, recorded).
* training: Adam (``--lr``; constant, or with ``--schedule cosine`` decayed to 0 at ``--steps``
  after ``--warmup`` linear warm-up steps, ``impflow.train.lr_factor`` as in ``impflow train``),
  ``--steps`` steps of ``--batch`` images drawn with replacement, the same steps for every
  model; ResFlow/ImpFlow train with the Neumann log-det gradient estimator (the exact 64×64
  log-det in training is about 20 times slower: ``impflow train --model image-resflow --data
  digits --steps 20 --batch-size 64 --logdet exact`` trained for 81 s against 3.9 s with
  ``--logdet neumann``, one thread, 2026-12-07) and the library's default
  roulette (geometric, p = 0.5, raised by the variance rule with ``--variance-margin``; ``none``
  gives the fixed-p estimator of the runs before that rule); ImpFlow's root solver is
  ``SolverConfig(method=--solver, tol=--train-tol)``.
* evaluation: test (and train) bits/dim with **exact** log-dets (``exact_logdet``) for
  ResFlow/ImpFlow, solver tol 1e-6 (the float32 default), mean ± standard error over images,
  then mean ± std over seeds; and where each model changes volume: the test images' log|det J|
  split by layer kind (ActNorm, ImpFlow or ResFlow blocks, couplings, …; ``per_image``).
* baselines on the same preprocessed data: ``theory.gaussian_nll(train y, test y)`` (the best
  affine flow, fitted in closed form: an affine flow of N(0, I) is exactly a Gaussian) and, as
  a reference only, ``theory.linear_oracle_nll`` (a per-image oracle, not a model).

Usage::

    python benchmarks/digits.py                     # the default budget
    python benchmarks/digits.py --quick             # smoke run (prints only)
    python benchmarks/digits.py --steps 1500 --seeds 3 --models impflow resflow

Results go to ``benchmarks/results/digits.json`` and ``digits.md`` (``--name`` changes the file
stem); the JSON is rewritten after every run. With ``--eval-every k`` the report adds the test
bits/dim every k steps (a table, and the plot ``NAME_curves.png``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    RESULTS, arg_type, load_parts, machine, machines_note, merged_command, publish, same_machine, seeds_text, write,
)

from impflow import theory  # noqa: E402
from impflow.config import SCHEDULES, ConfigError, parse_switch  # noqa: E402
from impflow.data.images import bits_per_dim, dequantize, load_digits  # noqa: E402
from impflow.logdet import LogDetConfig, exact_logdet  # noqa: E402
from impflow.models import dlf, glow, image_impflow, image_resflow, nsf  # noqa: E402
from impflow.nn import ACTIVATIONS  # noqa: E402
from impflow.solvers import SolverConfig  # noqa: E402
from impflow.train import lr_factor  # noqa: E402
from impflow.transforms import layers, recording  # noqa: E402

MODELS = ("impflow", "resflow", "glow", "nsf", "dlf")
SCHEDULE_DEFAULTS = {"schedule": "constant", "warmup": 0}  # runs and checkpoints from before --schedule
SHAPE = (1, 8, 8)
DIM = 64


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--seeds", type=int, default=2, help="number of seeds (seed-start, seed-start + 1, …)")
    p.add_argument("--seed-start", type=int, default=0, help="first seed (to run seeds in separate processes)")
    p.add_argument(
        "--merge", nargs="+", default=None, metavar="STEM",
        help="no training: merge results/STEM.json files (same settings, different seeds) into --name",
    )
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--schedule", choices=SCHEDULES, default="constant",
                   help="learning rate after warm-up: constant (the runs before this option) or cosine "
                        "(decayed to 0 at --steps, impflow train's default)")
    p.add_argument("--warmup", type=int, default=0, help="linear learning-rate warm-up steps")
    p.add_argument("--hidden", type=int, default=32, help="channels inside each ResFlow/ImpFlow g")
    p.add_argument("--impflow-blocks", type=int, default=2, help="per scale; ResFlow gets twice as many")
    p.add_argument("--coeff", type=float, default=0.97)
    p.add_argument("--activation", choices=sorted(ACTIVATIONS), default="lipswish",
                   help="activation inside every ResFlow/ImpFlow g")
    p.add_argument("--actnorm", type=arg_type(parse_switch), default=True,
                   help="true/false: ActNorm first and after every ResFlow/ImpFlow block (false: none, exactly equal "
                        "parameters, the ImpFlow paper's toy protocol)")
    p.add_argument("--inner-actnorm", type=arg_type(parse_switch), default=False,
                   help="true/false: also an ActNorm inside every ImpFlow block, between (Id + g_x) and the g_z "
                        "solve, where ResFlow has one between its two blocks (with --actnorm: the same ActNorms "
                        "and exactly equal parameters)")
    p.add_argument("--resflow-actnorm-every", type=int, default=1,
                   help="with --actnorm: ResFlow's ActNorms after every k-th block only; 2 puts them where "
                        "ImpFlow has its (exactly equal parameters)")
    p.add_argument("--alpha", type=float, default=0.05, help="logit α of the preprocessing")
    p.add_argument("--solver", choices=("auto", "fixed_point", "broyden"), default="broyden")
    p.add_argument("--train-tol", type=float, default=None, help="ImpFlow solver tol in training (default 1e-6)")
    p.add_argument("--variance-margin", type=arg_type(parse_margin), default=LogDetConfig.variance_margin,
                   help="the Russian roulette's variance rule (LogDetConfig.variance_margin, default %(default)s); "
                   "none: a fixed geometric p = 0.5, as in the runs before the rule")
    p.add_argument("--n-exact-terms", type=arg_type(parse_terms), default=LogDetConfig.n_exact_terms,
                   help="series terms the Neumann estimator always computes before the roulette "
                        "(LogDetConfig.n_exact_terms, default %(default)s); more terms, less variance")
    p.add_argument("--flow-steps", type=int, default=4, help="Glow/DLF steps per level, NSF steps")
    p.add_argument("--eval-every", type=int, default=0, help="also record test bits/dim every k steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 20 steps, prints only")
    p.add_argument("--name", default=None, help="results file stem (default digits)")
    args = p.parse_args(argv)
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    args.no_write = args.quick and args.name is None
    args.name = args.name or "digits"
    if args.quick:
        args.seeds, args.steps = 1, 20
    return args


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(name: str, args: argparse.Namespace, hidden: int | None = None) -> torch.nn.Module:
    """Model ``name``; ``hidden`` overrides the width of Glow/NSF/DLF (matched to ResFlow)."""
    n = args.impflow_blocks
    if name in ("impflow", "resflow"):
        solver = SolverConfig(method=args.solver, tol=args.train_tol)
        logdet = LogDetConfig("neumann", n_exact_terms=args.n_exact_terms, variance_margin=args.variance_margin)
        common = dict(hidden=args.hidden, coeff=args.coeff, logdet=logdet, solver=solver, actnorm=args.actnorm,
                      activation=args.activation)
        if name == "impflow":
            return image_impflow(SHAPE, (n, n, n), inner_actnorm=args.inner_actnorm, **common)
        return image_resflow(SHAPE, (2 * n, 2 * n, 2 * n), actnorm_every=args.resflow_actnorm_every, **common)
    h = hidden if hidden is not None else 64
    if name == "glow":
        return glow(shape=SHAPE, steps=args.flow_steps, levels=2, hidden=h)
    if name == "dlf":
        return dlf(shape=SHAPE, steps=args.flow_steps, levels=2, hidden=h)
    return nsf(DIM, steps=args.flow_steps, hidden=h)


def matched_hidden(name: str, args: argparse.Namespace, target: int) -> int:
    """The width of ``name`` whose parameter count is closest to ``target``."""
    count = lambda h: n_params(build(name, args, h))
    lo, hi = 2, 1024  # parameter counts grow with the width: bisect, then take the nearer end
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) < target else (lo, mid)
    return min((lo, hi), key=lambda h: abs(count(h) - target))


def to_input(name: str, y: torch.Tensor) -> torch.Tensor:
    return y.flatten(1) if name == "nsf" else y


@torch.no_grad()
def evaluate(model: torch.nn.Module, name: str, y: torch.Tensor, ladj: torch.Tensor, batch: int = 120) -> dict:
    """bits/dim (mean, standard error over images), exact log-dets, solver tol 1e-6."""
    model.eval()
    with exact_logdet():
        lp = torch.cat([model.log_prob(to_input(name, y[i : i + batch])) for i in range(0, len(y), batch)])
    model.train()
    bpd = bits_per_dim(lp, ladj, DIM, 17)
    return {"bpd": float(bpd.mean()), "bpd_se": float(bpd.std() / math.sqrt(len(bpd))), "finite": bool(torch.isfinite(bpd).all())}


def per_image(calls, whole: torch.nn.Module, n: int, name: str) -> dict[str, float]:
    """Where the model changes volume: the log-dets :func:`impflow.transforms.recording` saw
    over ``n`` images as nats per image by kind of layer (class name: ActNorm, ImplicitBlock, …),
    after checking that the kinds add up to the log-det of ``whole``, the model's transform (no
    layer missed or counted twice)."""
    parts: dict[str, float] = {}
    total = 0.0
    for module, _, (_, ladj) in calls:
        v = float(ladj.double().sum())
        if module is whole:
            total += v
        else:
            parts[type(module).__name__] = parts.get(type(module).__name__, 0.0) + v
    if not math.isclose(sum(parts.values()), total, rel_tol=1e-5, abs_tol=1e-3 * n):
        raise RuntimeError(f"{name}: the layers' log-dets add up to {sum(parts.values()) / n}, the model's is {total / n}")
    return {kind: v / n for kind, v in parts.items()}


def baselines(pre, data, test_y, test_ladj, gen_seed: int) -> dict:
    """Best affine flow (Gaussian fit on dequantised, preprocessed train data) and the oracle."""
    x_tr = dequantize(data.train_images, data.levels, torch.Generator().manual_seed(gen_seed))
    y_tr, train_ladj = pre(x_tr)
    # test NLLs of x per image (each image's own logit ladj), so the s.e. includes that term's spread
    g = theory.gaussian_nll(y_tr.double().flatten(1), test_y.double().flatten(1), test_ladj=test_ladj.double())
    scale = DIM * math.log(2)
    term = DIM * math.log(data.levels)
    # oracle on the same preprocessed test images: its NLL is of y; add the same logit ladj and K^D terms
    orc = theory.linear_oracle_nll(test_y.double(), squeeze=2, levels=None)
    oracle_bpd = (float(orc["mean_nll"]) - float(test_ladj.double().mean()) + term) / scale
    return {
        "gaussian_test_bpd": (g["test_nll"] + term) / scale,
        "gaussian_test_bpd_se": g["test_nll_se"] / scale,
        "gaussian_train_bpd": (g["nll"] - float(train_ladj.double().mean()) + term) / scale,
        "linear_oracle_test_bpd": oracle_bpd,
        "note": "bpd = (NLL_y − logit ladj + 64 ln 17)/(64 ln 2), the ladj per image (train: its mean over the "
        "training images); Gaussian fitted on train y "
        "(one dequantisation), scored on the same test y as the flows; the oracle fits each image "
        "to itself (squeeze 2: 16 positions × 4 channels) and is no model",
    }


def prepare(args: argparse.Namespace):
    """(data, preprocessing, test set): the digits split, the logit step, and the test images
    dequantised once with a fixed seed (the same noise for every model and run)."""
    data = load_digits(seed=args.split_seed)
    pre = data.preprocess(args.alpha)
    test = pre(dequantize(data.test_images, data.levels, torch.Generator().manual_seed(12345)))
    return data, pre, test


def train(
    args: argparse.Namespace,
    name: str,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    data,
    pre,
    test,
    first: int = 1,
    on_grad: Callable[[int, torch.Tensor], None] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> tuple[list[dict], int]:
    """Steps ``first`` … ``--steps``: a batch drawn and dequantised with ``gen``, the loss, its
    backward, ``on_grad(step, loss)`` (the gradients are in place), the Adam step at this step's
    learning rate (``--schedule``, ``--warmup``; set from the step number, so a resumed run needs
    no scheduler state), the
    ``--eval-every`` test evaluation (not at the last step), ``after_step(step)``. A non-finite loss
    skips the step. Returns (learning curve, number of skipped steps)."""
    n = len(data.train_images)
    curve = []
    nonfinite = 0
    for step in range(first, args.steps + 1):
        idx = torch.randint(0, n, (args.batch,), generator=gen)
        y, _ = pre(dequantize(data.train_images[idx], data.levels, gen))
        loss = -model.log_prob(to_input(name, y)).mean()
        if not torch.isfinite(loss):
            nonfinite += 1
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if on_grad is not None:
            on_grad(step, loss)
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_factor(step - 1, args.warmup, args.steps, args.schedule)
        opt.step()
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            curve.append({"step": step, "test_bpd": evaluate(model, name, *test)["bpd"]})
        if after_step is not None:
            after_step(step)
    return curve, nonfinite


def run_one(args, name: str, seed: int, data, pre, test, hidden: int | None) -> dict:
    torch.manual_seed(seed)
    model = build(name, args, hidden)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(1000 + seed)  # batches and dequantisation: the same for every model
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        curve, nonfinite = train(args, name, model, opt, gen, data, pre, test)
        train_time = time.perf_counter() - t0
        t1 = time.perf_counter()
        with recording([*layers(model), model.transform]) as calls:
            te = evaluate(model, name, *test)
        eval_time = time.perf_counter() - t1
        log_det = per_image(calls, model.transform, len(test[0]), name)
        # train bits/dim on a fixed subset as large as the test set (exact log-dets are slow)
        x_tr = dequantize(data.train_images[: len(data.test_images)], data.levels, torch.Generator().manual_seed(77))
        tr = evaluate(model, name, *pre(x_tr))
    solver_warnings = sum("converge" in str(w.message) or "solve" in str(w.message) for w in caught)
    rec = {
        "model": name, "seed": seed, "params": n_params(model), "hidden": hidden if hidden else args.hidden,
        "steps": args.steps, "test_bpd": te["bpd"], "test_bpd_se": te["bpd_se"], "test_finite": te["finite"],
        "train_bpd": tr["bpd"],  # on the first len(test) training images
        "nonfinite_steps": nonfinite, "solver_warnings": solver_warnings,
        "train_time_s": train_time, "eval_time_s": eval_time, "curve": curve,
        "log_det_by_kind": log_det,  # nats per test image; older files lack it
    }
    return rec


def summarise(runs: list[dict], models: list[str]) -> list[dict]:
    rows = []
    for m in models:
        rs = [r for r in runs if r["model"] == m]
        if not rs:
            continue
        v = [r["test_bpd"] for r in rs]
        rows.append({
            "model": m, "n": len(rs), "params": rs[0]["params"], "hidden": rs[0]["hidden"],
            "test_bpd_mean": statistics.mean(v), "test_bpd_std": statistics.stdev(v) if len(v) > 1 else 0.0,
            "test_bpds": v, "train_bpd_mean": statistics.mean(r["train_bpd"] for r in rs),
            "train_time_s_mean": statistics.mean(r["train_time_s"] for r in rs),
            **volume_summary(rs),
        })
    return rows


def volume_summary(runs: list[dict]) -> dict:
    """The mean over the runs that recorded it (files from before the record lack it) of each layer
    kind's log-det, with those runs' seeds."""
    rs = [r for r in runs if "log_det_by_kind" in r]
    if not rs:
        return {}
    kinds = rs[0]["log_det_by_kind"]
    return {"log_det_by_kind": {k: statistics.mean(r["log_det_by_kind"].get(k, 0.0) for r in rs) for k in kinds},
            "log_det_seeds": [r["seed"] for r in rs]}


def comparison(runs: list[dict]) -> dict | None:
    """ImpFlow − ResFlow test bits/dim, paired by seed."""
    imp = {r["seed"]: r["test_bpd"] for r in runs if r["model"] == "impflow"}
    res = {r["seed"]: r["test_bpd"] for r in runs if r["model"] == "resflow"}
    seeds = sorted(set(imp) & set(res))
    if not seeds:
        return None
    d = [imp[s] - res[s] for s in seeds]
    return {
        "seeds": seeds, "diffs": d, "mean_diff": statistics.mean(d),
        "std_diff": statistics.stdev(d) if len(d) > 1 else None,
        "impflow_wins": f"{sum(x < 0 for x in d)}/{len(d)}",
    }


def time_ratios(runs: list[dict]) -> dict[int, float]:
    """ImpFlow / ResFlow training time by seed, for seeds whose two runs ran on one machine (runs
    of one process carry no machine record of their own: they share it)."""
    imp = {r["seed"]: r for r in runs if r["model"] == "impflow"}
    res = {r["seed"]: r for r in runs if r["model"] == "resflow"}
    return {
        s: imp[s]["train_time_s"] / res[s]["train_time_s"]
        for s in sorted(set(imp) & set(res))
        if same_machine(imp[s].get("machine", {}), res[s].get("machine", {}))
    }


def logdet_option(field: str, convert: Callable[[str], Any], expected: str, none: bool = False) -> Callable:
    """A parser of ``LogDetConfig.<field>`` from the command line: ``convert`` the text, then let
    LogDetConfig check the value; ``none``: the word none gives None."""

    def parse(text: str):
        if none and text.strip().lower() == "none":
            return None
        try:
            value = convert(text)
            LogDetConfig("neumann", **{field: value})  # validates the range
        except ValueError:
            raise ConfigError(f"expected {expected}, got {text!r}") from None
        return value

    parse.__name__ = f"parse_{field}"
    return parse


parse_margin = logdet_option("variance_margin", float, "a number in (0, 1] or none", none=True)
parse_terms = logdet_option("n_exact_terms", int, "an integer of at least 1")


def roulette_text(settings: dict) -> str:
    """The training estimator's roulette (files from before the variance rule: fixed p)."""
    margin = settings.get("variance_margin")
    terms = settings.get("n_exact_terms", LogDetConfig.n_exact_terms)
    return (f"{terms} exact terms, geometric roulette, p = 0.5"
            + (f", variance rule margin {margin}" if margin is not None else " fixed, no variance rule"))


def schedule_text(settings: dict) -> str:
    """The learning-rate schedule, for the settings line (files from before the option: constant)."""
    warmup = settings.get("warmup", 0)
    text = f" after {warmup} warm-up steps" if warmup else ""
    if settings.get("schedule", "constant") == "cosine":
        return f", cosine decay to 0{text}"
    return f", constant{text}" if warmup else ""


def actnorm_text(settings: dict) -> str:
    """Where the ActNorms are, for the settings line (files from before the options: after every block)."""
    outer = settings.get("actnorm", True)
    inner = settings.get("inner_actnorm", False)
    every = settings.get("resflow_actnorm_every", 1)
    if not outer:
        text = "no ActNorm"
    elif every > 1:
        nth = {2: "second", 3: "third"}.get(every, f"{every}th")
        text = f"ActNorm after every ImpFlow block and after every {nth} ResFlow block"
    else:
        text = "ActNorm after every block"
    return text + (" and inside every ImpFlow block" if inner else "")


def markdown(payload: dict) -> str:
    a, b = payload["settings"], payload["baselines"]
    lines = [
        "# Digits 8×8: bits/dim at matched parameters and steps",
        "",
        f"Command: `{payload['command']}`  ",
        f"Wall time: {payload['wall_time_s'] / 60:.1f} min{' (summed over the merged runs, which ran in parallel)' if payload.get('merged_from') else ''} ({payload['machine']['threads']} thread(s), "
        f"torch {payload['machine']['torch']}, {payload['machine']['date']}; shared CPU, times are only "
        "comparable as ratios within this run)",
        "",
    ]
    note = machines_note(payload["runs"])
    ratios = time_ratios(payload["runs"])
    if note:
        lines += [note + "  "]
    if ratios:
        lines += ["ImpFlow / ResFlow training time per run, paired by seed on one machine: "
                  + ", ".join(f"{v:.2f}× (seed {s})" for s, v in ratios.items()) + ".", ""]
    elif note:
        lines += [""]
    lines += [
        f"Data: sklearn digits as (1, 8, 8), split seed {a['split_seed']} ({payload['data']['n_train']} train / "
        f"{payload['data']['n_test']} test), 17 levels, uniform dequantisation, logit α = {a['alpha']}; "
        "bits/dim include the logit Jacobian and the 64·ln 17 scaling.  ",
        f"Training: Adam lr {a['lr']}{schedule_text(a)}, {a['steps']} steps of batch {a['batch']} for every model, seeds "
        f"{seeds_text(payload['runs'])}. ImpFlow {a['impflow_blocks']}-{a['impflow_blocks']}-{a['impflow_blocks']}, "
        f"ResFlow {2 * a['impflow_blocks']}-{2 * a['impflow_blocks']}-{2 * a['impflow_blocks']} (hidden {a['hidden']}, "
        f"kernels 3-1-3, coeff {a['coeff']}, {a.get('activation', 'lipswish')} activations, {actnorm_text(a)}, no factor-out), Neumann log-det "
        f"gradients in training ({roulette_text(a)}), exact log-dets at evaluation; ImpFlow solver {a['solver']} "
        f"(train tol {a['train_tol'] if a['train_tol'] is not None else '1e-6 default'}). Glow/DLF: image form, "
        f"2 levels × {a['flow_steps']} steps; NSF: vector form on the 64 flattened values "
        f"({a['flow_steps']} spline-coupling steps; no image form exists). Their widths are set to match ResFlow's parameters.",
        "",
        "| model | test bits/dim (mean ± std over seeds) | per-seed | train bits/dim | params | width | steps | train s/run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["summary"]:
        lines.append(
            f"| {r['model']} | {r['test_bpd_mean']:.4f} ± {r['test_bpd_std']:.4f} | "
            + ", ".join(f"{v:.4f}" for v in r["test_bpds"])
            + f" | {r['train_bpd_mean']:.4f} | {r['params']} | {r['hidden']} | {a['steps']} | {r['train_time_s_mean']:.0f} |"
        )
    lines += [
        f"| best affine flow (Gaussian fit) | {b['gaussian_test_bpd']:.4f} (± {b['gaussian_test_bpd_se']:.4f} s.e. over images) | | "
        f"{b['gaussian_train_bpd']:.4f} | closed form | | | |",
        f"| linear oracle (per image, not a model) | {b['linear_oracle_test_bpd']:.4f} | | | | | | |",
        "",
    ]
    c = payload["comparison"]
    if c is not None:
        sd = f"{c['std_diff']:.4f}" if c["std_diff"] is not None else "n/a"
        lines.append(
            f"ImpFlow − ResFlow test bits/dim, paired by seed: mean {c['mean_diff']:+.4f} (std {sd}; per seed "
            + ", ".join(f"{d:+.4f}" for d in c["diffs"])
            + f"); ImpFlow better in {c['impflow_wins']} seeds."
        )
    pr = {r["model"]: r["params"] for r in payload["summary"]}
    if "resflow" in pr:
        dev = {m: 100 * (p - pr["resflow"]) / pr["resflow"] for m, p in pr.items()}
        lines.append("Parameter deviation from ResFlow: " + ", ".join(f"{m} {d:+.1f}%" for m, d in dev.items()) + ".")
    lines.append("")
    return "\n".join(lines + volume_markdown(payload) + curve_markdown(payload))


def volume_markdown(payload: dict) -> list[str]:
    """The table of :func:`volume_summary` (empty for files without the record)."""
    rows = [r for r in payload["summary"] if "log_det_by_kind" in r]
    if not rows:
        return []
    kinds = list(dict.fromkeys(k for r in rows for k in r["log_det_by_kind"]))
    lines = ["Where each model changes volume: log|det J| of y → z per test image in nats (exact), summed over "
             "each kind of layer, mean over seeds (the kinds add up to the model's log-det):", "",
             "| model | seeds | " + " | ".join(kinds) + " | total |", "|---" * (len(kinds) + 3) + "|"]
    for r in rows:
        v = r["log_det_by_kind"]
        lines.append(f"| {r['model']} | {seeds_text([{'seed': s} for s in r['log_det_seeds']])} | "
                     + " | ".join(f"{v[k]:+.2f}" if k in v else "" for k in kinds) + f" | {sum(v.values()):+.2f} |")
    return lines + [""]


def curves(payload: dict) -> dict[str, dict[int, dict[int, float]]]:
    """Test bits/dim per model, step and seed, from the runs' ``--eval-every`` records and their
    final evaluations: ``{model: {step: {seed: value}}}``."""
    out: dict[str, dict[int, dict[int, float]]] = {}
    for r in payload["runs"]:
        points = [(c["step"], c["test_bpd"]) for c in r.get("curve", [])] + [(r["steps"], r["test_bpd"])]
        for step, v in points:
            out.setdefault(r["model"], {}).setdefault(step, {})[r["seed"]] = v
    return out


def curve_markdown(payload: dict) -> list[str]:
    """The learning-curve table (empty without ``--eval-every`` records)."""
    cs = curves(payload)
    if not any(len(c) > 1 for c in cs.values()):
        return []
    models = [m for m in MODELS if m in cs]
    steps = sorted({s for c in cs.values() for s in c})
    paired = "impflow" in cs and "resflow" in cs
    head = "| step | " + " | ".join(models) + (" | ImpFlow − ResFlow (paired mean; wins) |" if paired else " |")
    lines = ["Test bits/dim during training (mean over seeds; the last row is the final evaluation above):", "",
             head, "|---" * (len(models) + 1 + paired) + "|"]
    for step in steps:
        cells = [f"{statistics.mean(cs[m][step].values()):.4f}" if step in cs[m] else "" for m in models]
        if paired:  # by seed, as comparison()
            imp, res = cs["impflow"].get(step, {}), cs["resflow"].get(step, {})
            d = [v - res[seed] for seed, v in imp.items() if seed in res]
            cells.append(f"{statistics.mean(d):+.4f}; {sum(x < 0 for x in d)}/{len(d)}" if d else "")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return lines + [""]


def plot_curves(payload: dict, path: Path) -> bool:
    """Test bits/dim against steps, one line per model (mean over seeds, seeds as dots), to ``path``
    (the best affine flow, far above, is in the table)."""
    cs = curves(payload)
    if not any(len(c) > 1 for c in cs.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in [m for m in MODELS if m in cs]:
        steps = sorted(cs[m])
        seeds = len(cs[m][steps[-1]])
        line, = ax.plot(steps, [statistics.mean(cs[m][s].values()) for s in steps], marker="o", ms=3,
                        label=f"{m} ({seeds} seed{'s' if seeds > 1 else ''})")
        for s in steps:
            ax.scatter([s] * len(cs[m][s]), list(cs[m][s].values()), s=6, color=line.get_color(), alpha=0.4)
    ax.set_xlabel("training step")
    ax.set_ylabel("test bits/dim (exact log-det)")
    ax.set_title("Digits 8×8: mean over seeds (dots: single seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def report(name: str, payload: dict, save: bool = True) -> None:
    """Publish the markdown and JSON and, with learning curves, ``results/NAME_curves.png``."""
    publish(name, payload, markdown(payload), save=save)
    if save and plot_curves(payload, RESULTS / f"{name}_curves.png"):
        print(f"wrote {RESULTS / (name + '_curves.png')}")


def merge(args: argparse.Namespace, command: str) -> dict:
    """One result from per-seed-range (or per-model) result files: their runs pooled; the training
    settings must agree, the model lists may differ; a (model, seed) pair may appear only once."""
    keys = ("steps", "batch", "lr", "schedule", "warmup", "hidden", "impflow_blocks", "coeff", "alpha", "solver", "train_tol", "flow_steps",
            "split_seed", "actnorm", "activation", "inner_actnorm", "resflow_actnorm_every", "variance_margin",
            "n_exact_terms")
    older = {"actnorm": True, "activation": "lipswish", "inner_actnorm": False, "resflow_actnorm_every": 1,
             "variance_margin": None, "n_exact_terms": LogDetConfig.n_exact_terms,
             **SCHEDULE_DEFAULTS}  # files written before these options existed
    parts, runs = load_parts(args.merge, keys, ("model", "seed"), defaults=older)
    models = [m for m in MODELS if any(r["model"] == m for r in runs)]
    seeds = sorted({r["seed"] for r in runs})
    settings = dict(parts[0]["settings"], models=models, seeds=len(seeds), seed_start=seeds[0])
    return dict(
        parts[0], command=merged_command(command, parts), settings=settings,
        wall_time_s=sum(q["wall_time_s"] for q in parts),
        summary=summarise(runs, models), comparison=comparison(runs), runs=runs,
        merged_from=list(args.merge),
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.merge:
        cmd = "python benchmarks/digits.py " + " ".join(argv if argv is not None else sys.argv[1:])
        out = merge(args, cmd)
        report(args.name, out)
        return out
    torch.set_num_threads(args.threads)
    data, pre, test = prepare(args)
    base = baselines(pre, data, *test, gen_seed=54321)
    command = "python benchmarks/digits.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(argv if argv is not None else sys.argv[1:]))
    target = n_params(build("resflow", args))
    hidden = {m: matched_hidden(m, args, target) for m in args.models if m not in ("impflow", "resflow")}
    print(f"ResFlow params {target}; matched widths {hidden}", flush=True)
    print(f"best affine (Gaussian) test bits/dim {base['gaussian_test_bpd']:.4f}", flush=True)
    runs: list[dict] = []
    start = time.perf_counter()

    def payload() -> dict:
        return {
            "benchmark": "digits",
            "command": command,
            "settings": {k: v for k, v in vars(args).items() if k not in ("name", "no_write")},
            "data": {"name": "digits", "n_train": len(data.train_images), "n_test": len(data.test_images)},
            "machine": machine(),
            "wall_time_s": time.perf_counter() - start,
            "baselines": base,
            "summary": summarise(runs, args.models),
            "comparison": comparison(runs),
            "runs": runs,
        }

    for seed in range(args.seed_start, args.seed_start + args.seeds):
        for m in args.models:
            rec = run_one(args, m, seed, data, pre, test, hidden.get(m))
            runs.append(rec)
            print(
                f"seed {seed} {m:8s} params {rec['params']} test {rec['test_bpd']:.4f} ± {rec['test_bpd_se']:.4f} "
                f"train {rec['train_bpd']:.4f} {rec['train_time_s']:.0f}s warn {rec['solver_warnings']}",
                flush=True,
            )
            if not args.no_write:
                write(args.name, payload())
    out = payload()
    report(args.name, out, save=not args.no_write)
    return out


if __name__ == "__main__":
    main()
