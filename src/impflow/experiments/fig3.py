"""Fig. 3 of the ImpFlow paper (seed 001, §4): checkerboard, 8-block ResFlow vs 4-block ImpFlow.

A k-block ImpFlow has 2k networks g (g_x and g_z per block), so with the same hidden sizes a
4-block ImpFlow and an 8-block ResFlow have the same networks and (up to the ActNorms) the same
parameters. Both are trained by maximum likelihood through :class:`impflow.train.Trainer` with
the same settings, step budget and seeds, each into its own run directory
(``out/resflow-seedK``, ``out/impflow-seedK``: checkpoints, history with the volume monitor,
plots; ``impflow eval/plot/sample`` work on them), then scored on fresh test points with exact
log-dets (:func:`impflow.train.evaluate_run`, best-validation checkpoint).

The paper reports 5.08 bits (ResFlow, 8 blocks) vs 5.05 bits (ImpFlow, 4 blocks) against the
entropy ln 32 nats = 5.00 bits with 128-128 networks; the default here is a smaller budget
(:data:`FULL`) that runs in well under an hour on 2 CPU cores, so expect larger gaps.

A run directory that already holds a finished run with exactly these settings is reused (its
recorded wall time is reported), and an unfinished one is resumed, so an interrupted
experiment - or ``benchmarks/toy2d.py`` writing to the same folder - is not trained twice.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from statistics import fmean, stdev
from typing import Any

import numpy as np
import torch

from ..checkpoint import CheckpointError, has_checkpoint, pointer, read_json, write_json
from ..config import RESUMABLE, RunConfig
from ..data import toy2d
from ..logdet import exact_logdet
from ..train import Trainer, evaluate_run, load, plot_run, read_run
from ..train.monitor import ProgressMode

__all__ = ["Fig3Config", "FULL", "QUICK", "PAPER_BITS", "model_name", "run_config", "train_one", "summarize", "run"]

_LN2 = math.log(2.0)
TIMING = "fig3_timing.json"
PAPER_BITS = {"resflow": 5.08, "impflow": 5.05}
"""The paper's Fig. 3 test NLLs (bits) on checkerboard, 8-block ResFlow and 4-block ImpFlow."""


@dataclass(frozen=True)
class Fig3Config:
    """Settings shared by both models (Adam, warm-up then cosine decay, exact log-dets)."""

    data: str = "checkerboard"
    steps: int = 1500
    hidden: tuple[int, ...] = (64, 64)
    batch_size: int = 1024
    lr: float = 5e-3
    warmup: int = 100
    eval_every: int = 250
    eval_size: int = 10000  # validation points (best-checkpoint selection)
    n_test: int = 20000  # fresh test points for the table
    resflow_blocks: int = 8
    impflow_blocks: int = 4
    actnorm: bool | None = None  # None: the builders' default (an ActNorm before every block); False: none
    resflow_actnorm_every: int = 1  # 2: ResFlow's ActNorms before every second block only (ImpFlow's count)
    activation: str | None = None  # None: the builders' default (LipSwish)
    grid: int = 200  # density image resolution

    def blocks(self, model: str) -> int:
        return {"resflow": self.resflow_blocks, "impflow": self.impflow_blocks}[model]


FULL = Fig3Config()
"""The default: 1500 steps of batch 1024 with 64-64 networks (≈ 20-30 min for 3 seeds × 2 models
on one core of the shared 2-core machines)."""

QUICK = Fig3Config(steps=8, hidden=(8,), batch_size=64, warmup=0, eval_every=4, eval_size=256, n_test=1000, grid=40)
"""A smoke test (seconds): same models, tiny networks and budget."""

MODELS = ("resflow", "impflow")


def model_name(model: str, cfg: Fig3Config) -> str:
    """``resflow-8``, ``impflow-4``."""
    return f"{model}-{cfg.blocks(model)}"


def run_config(model: str, cfg: Fig3Config, seed: int, quiet: bool = True) -> RunConfig:
    """The :class:`RunConfig` of one training run of the experiment."""
    return RunConfig(
        data=cfg.data,
        model=model,
        blocks=cfg.blocks(model),
        hidden=cfg.hidden,
        actnorm=cfg.actnorm,
        actnorm_every=cfg.resflow_actnorm_every if model == "resflow" and cfg.resflow_actnorm_every != 1 else None,
        activation=cfg.activation,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        warmup=cfg.warmup,
        schedule="cosine",
        eval_every=cfg.eval_every,
        eval_size=cfg.eval_size,
        log_every=min(100, cfg.eval_every),
        seed=seed,
        device="cpu",
        threads=torch.get_num_threads(),
        quiet=quiet,
    )


def _same_settings(a: RunConfig, b: RunConfig) -> str | None:
    """The first setting (besides resumable ones other than ``steps``) on which a and b differ."""
    da, db = a.to_dict(), b.to_dict()
    return next((k for k in da if (k not in RESUMABLE or k == "steps") and da[k] != db[k]), None)


def train_one(
    run_dir: str | Path,
    model: str,
    cfg: Fig3Config,
    seed: int,
    progress: ProgressMode = "none",
    plots: bool = True,
) -> dict[str, Any]:
    """Train (or reuse/resume) one run and score it; returns its table row.

    ``model`` is ``"resflow"`` or ``"impflow"`` (``cfg.blocks(model)`` blocks). A finished run
    with the same settings in ``run_dir`` is reused, an unfinished one resumed; a run with other
    settings is an error. ``plots`` also writes the run's PNGs (``impflow plot``).

    Row: data, model, seed, blocks, hidden, params, ``nll``/``nll_se``/``nll_bits`` (test,
    nats and bits per example), ``entropy``, ``gap`` (= nll − entropy) and ``gap_bits``,
    ``gaussian_nll`` (best affine flow), ``wall_seconds`` (training incl. evaluations and
    checkpoints), ``train_seconds`` (optimisation steps only), ``best_step``, ``run``, ``reused``.
    """
    run_dir = Path(run_dir)
    config = run_config(model, cfg, seed, quiet=progress == "none")
    timing_path = run_dir / TIMING
    wall = 0.0
    reused = False
    if has_checkpoint(run_dir):
        saved, _ = read_run(run_dir)
        differs = _same_settings(saved, config)
        if differs is not None:
            raise CheckpointError(
                f"{run_dir} holds a run with {differs}={getattr(saved, differs)!r}, not {getattr(config, differs)!r}; "
                "choose another output folder"
            )
        wall = read_json(timing_path, "fig3 timing")["wall_seconds"] if timing_path.is_file() else math.nan
        if pointer(run_dir, "last")["step"] >= cfg.steps:
            reused = True
            trainer = None
        else:
            trainer = Trainer.resume(run_dir, progress=progress)
    else:
        trainer = Trainer(config, run_dir, progress=progress)
    if trainer is not None:
        start = time.perf_counter()
        result = trainer.fit()
        wall += time.perf_counter() - start
        if result.status != "done":
            raise RuntimeError(f"{model} seed {seed}: {result.message}")
        write_json(timing_path, {"wall_seconds": wall, "train_seconds": trainer.train_seconds})
    report = evaluate_run(run_dir, which="best", n=cfg.n_test)
    if plots:
        plot_run(run_dir)
    return {
        "data": cfg.data,
        "model": model_name(model, cfg),
        "seed": seed,
        "blocks": cfg.blocks(model),
        "hidden": list(cfg.hidden),
        "params": report["params"],
        "nll": report["test_nll"],
        "nll_se": report["test_nll_se"],
        "nll_bits": report["test_nll_bits"],
        "entropy": report["entropy"],
        "gap": report["gap_to_entropy"],
        "gap_bits": report["gap_to_entropy_bits"],
        "gaussian_nll": report["gaussian_nll"],
        "wall_seconds": wall,
        "train_seconds": report["train_seconds"],
        "best_step": report["step"],
        "run": str(run_dir),
        "reused": reused,
    }


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (data, model): mean and across-seed standard deviation of the test NLL (nats, bits),
    mean gap to the entropy, parameters, mean and total wall time."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["data"], r["model"]), []).append(r)
    out = []
    for (data, model), rs in groups.items():
        nll = [r["nll"] for r in rs]
        gaps = [r["gap"] for r in rs if r["gap"] is not None]
        walls = [r["wall_seconds"] for r in rs]
        out.append(
            {
                "data": data,
                "model": model,
                "seeds": [r["seed"] for r in rs],
                "params": rs[0]["params"],
                "nll_mean": fmean(nll),
                "nll_std": stdev(nll) if len(nll) > 1 else 0.0,
                "nll_bits_mean": fmean(nll) / _LN2,
                "entropy": rs[0]["entropy"],
                "gap_mean": fmean(gaps) if gaps else None,
                "gap_bits_mean": fmean(gaps) / _LN2 if gaps else None,
                "wall_seconds_mean": fmean(walls),
                "wall_seconds_total": sum(walls),
            }
        )
    return out


def _fmt(v: Any, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown(rows: Sequence[dict], summary: Sequence[dict], cfg: Fig3Config, title: str) -> str:
    """Per-seed rows and per-model means, in nats and bits, against the entropy."""
    lines = [
        f"# {title}",
        "",
        f"Settings: {cfg.steps} steps, batch {cfg.batch_size}, hidden {','.join(map(str, cfg.hidden))}, Adam lr "
        f"{cfg.lr:g} ({cfg.warmup} warm-up steps, cosine decay), exact log-dets; test NLL on {cfg.n_test} fresh "
        f"points at the best-validation checkpoint ({cfg.eval_size} validation points, every {cfg.eval_every} "
        "steps). Wall time: training including evaluations and checkpoints, 1 thread.",
        "",
        "| data | model | seed | params | NLL (nats) | NLL (bits) | gap to entropy (nats) | gap (bits) "
        "| wall (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['data']} | {r['model']} | {r['seed']} | {r['params']} | {_fmt(r['nll'])} ± {_fmt(r['nll_se'])} "
            f"| {_fmt(r['nll_bits'])} | {_fmt(r['gap'])} | {_fmt(r['gap_bits'])} | {r['wall_seconds']:.0f} |"
        )
    lines += [
        "",
        "Means over seeds (± standard deviation across seeds):",
        "",
        "| data | model | seeds | params | NLL (nats) | NLL (bits) | entropy (nats / bits) | gap (nats) "
        "| gap (bits) | wall per run (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        ent = "—" if s["entropy"] is None else f"{s['entropy']:.3f} / {s['entropy'] / _LN2:.3f}"
        lines.append(
            f"| {s['data']} | {s['model']} | {len(s['seeds'])} | {s['params']} | {_fmt(s['nll_mean'])} ± "
            f"{_fmt(s['nll_std'])} | {_fmt(s['nll_bits_mean'])} | {ent} | {_fmt(s['gap_mean'])} "
            f"| {_fmt(s['gap_bits_mean'])} | {s['wall_seconds_mean']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _bounds(data: str) -> tuple[float, float]:
    x = toy2d.sample(data, 5000, seed=0)
    lo, hi = x.min().item(), x.max().item()
    return lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)


def _true_panel(data: str, bounds: tuple[float, float], n: int) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    axis = np.linspace(*bounds, n)
    xx, yy = np.meshgrid(axis, axis, indexing="xy")
    if data in toy2d.EXACT_DENSITY:
        pts = torch.from_numpy(np.stack([xx.ravel(), yy.ravel()], axis=1))
        logp = toy2d.log_prob(data, pts).numpy().reshape(xx.shape)
        ent = toy2d.entropy(data)
        label = f"true density ({ent:.3f} nats / {ent / _LN2:.2f} bits)" if ent is not None else "true density"
        return label, xx, yy, logp
    x = toy2d.sample(data, 200_000, seed=0).numpy()  # no closed form: a histogram of samples
    edges = np.linspace(*bounds, n + 1)
    hist, _, _ = np.histogram2d(x[:, 1], x[:, 0], bins=[edges, edges], density=True)
    return "data (histogram)", xx, yy, np.log(np.maximum(hist, 1e-12))


def plot_panels(rows: Sequence[dict], cfg: Fig3Config, path: Path, seed: int) -> Path:
    """True density, then the ResFlow and the ImpFlow of ``seed``, on one colour scale."""
    from .. import plots

    bounds = _bounds(cfg.data)
    panels = [_true_panel(cfg.data, bounds, cfg.grid)]
    for model in MODELS:
        r = next(r for r in rows if r["model"] == model_name(model, cfg) and r["seed"] == seed)
        flow = load(r["run"])
        xx, yy, logp = plots.density_grid(flow, bounds, cfg.grid, context=exact_logdet)
        label = "ResFlow" if model == "resflow" else "ImpFlow"
        title = f"{label}, {cfg.blocks(model)} blocks: {r['nll_bits']:.3f} bits"
        panels.append((title, xx, yy, logp))
    params = " / ".join(str(next(r["params"] for r in rows if r["model"] == model_name(m, cfg))) for m in MODELS)
    suptitle = f"{cfg.data}: same networks ({params} params), {cfg.steps} steps, seed {seed}; test NLL in bits"
    return plots.plot_density_panels(panels, path, suptitle)


def run(
    out: str | Path,
    quick: bool = False,
    seed: int = 0,
    steps: int | None = None,
    seeds: Sequence[int] | None = None,
    config: Fig3Config | None = None,
    progress: ProgressMode = "none",
) -> dict[str, Any]:
    """Train both models for every seed, tabulate and plot; writes fig3.png/.json/.md under ``out``.

    Args:
        out: output folder; the runs go to ``out/resflow-seedK`` and ``out/impflow-seedK``.
        quick: :data:`QUICK` settings and one seed (a smoke test of seconds) instead of :data:`FULL`.
        seed: offset added to every entry of ``seeds`` (``impflow experiment fig3 --seed``).
        steps: override the number of training steps.
        seeds: the seed set, default (0, 1, 2) ((0,) with ``quick``).
        config: settings instead of FULL/QUICK.
        progress: the Trainer's progress output (``"lines"`` prints each record).

    Returns the JSON written to fig3.json: settings, per-seed rows, per-model summary, the
    entropy, the paper's numbers and ``impflow_better`` (mean test NLL of the ImpFlow below the
    ResFlow's).
    """
    cfg = config or (QUICK if quick else FULL)
    if steps is not None:
        cfg = replace(cfg, steps=steps, warmup=min(cfg.warmup, steps // 10))
    seeds = tuple(seeds) if seeds is not None else ((0,) if quick else (0, 1, 2))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = []
    for s in (seed + k for k in seeds):
        for model in MODELS:
            rows.append(train_one(out / f"{model}-seed{s}", model, cfg, s, progress=progress, plots=not quick))
    summary = summarize(rows)
    means = {s["model"].split("-")[0]: s["nll_mean"] for s in summary}
    entropy = toy2d.entropy(cfg.data)
    result = {
        "experiment": "fig3",
        "config": asdict(cfg) | {"hidden": list(cfg.hidden)},
        "seeds": [seed + k for k in seeds],
        "threads": torch.get_num_threads(),
        "entropy": entropy,
        "entropy_bits": None if entropy is None else entropy / _LN2,
        "paper_bits": PAPER_BITS,
        "rows": rows,
        "summary": summary,
        "impflow_better": means["impflow"] < means["resflow"],
        "seconds": time.perf_counter() - start,
    }
    write_json(out / "fig3.json", result)
    (out / "fig3.md").write_text(
        markdown(rows, summary, cfg, f"Fig. 3: {' vs '.join(model_name(m, cfg) for m in MODELS)} on {cfg.data}")
        + f"\nPaper (128-128 networks, long training): ResFlow-8 {PAPER_BITS['resflow']} bits, ImpFlow-4 "
        f"{PAPER_BITS['impflow']} bits, entropy 5.00 bits.\n"
    )
    plot_panels(rows, cfg, out / "fig3.png", seed + seeds[0])
    return result
