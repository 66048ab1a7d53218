"""The Russian roulette's variance in training, on the digits benchmark's runs.

With a geometric roulette of continuation probability q, term k of the log-det series (of size
≈ ρ^k, ρ the contraction of J_g at the data) is reweighted by q^-(k − n_exact), so the
estimator's second moment Σ (ρ²/q)^k is infinite once ρ² ≥ q: a rare long series then returns a
loss, and a gradient, hundreds of times too large. This script shows it on
``benchmarks/digits.py``'s training runs, and the variance rule
(``LogDetConfig.variance_margin``) preventing it:

* ``replay``: train as ``digits.py`` does (same seed, batches and evaluations: bit for bit on the
  same machine), recording every step's minibatch loss, gradient norm and ImpFlow solver
  iterations, and saving checkpoints (model, Adam, both random states) at ``--save-at``;
* ``resume CKPT``: continue a checkpoint to ``--until`` on the same random stream, optionally
  with another ``--variance-margin`` (the counterfactual);
* ``measure CKPT``: every residual map's contraction at 60 test images (spectral norm and
  radius of its exact Jacobian), the blocks' ρ̂ and roulette q, and the spread of the Neumann
  gradient estimator over ``--draws`` draws on one training batch, against the exact gradient.

Usage (digits.py options after ``--``)::

    python benchmarks/roulette.py replay --model impflow --seed 3 --until 5600 --save-at 4000,5000 \\
        -- --steps 6000 --resflow-actnorm-every 2 --eval-every 500 --variance-margin none
    python benchmarks/roulette.py resume runs/roulette/impflow_s3_5000.pt --until 6000 --variance-margin 0.8
    python benchmarks/roulette.py measure runs/roulette/impflow_s3_4000.pt

Results go to ``results/roulette_NAME.json`` and ``.md`` (``--name``); checkpoints to
``runs/roulette/`` (not committed).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import digits  # noqa: E402
from common import arg_type, machine, publish  # noqa: E402

from impflow.logdet import exact_logdet  # noqa: E402
from impflow.train.runs import refresh_spectral  # noqa: E402
from impflow.transforms import recording  # noqa: E402
from impflow.transforms.implicit import ImplicitBlock  # noqa: E402
from impflow.transforms.residual import ResidualBlock  # noqa: E402

CHECKPOINTS = Path(__file__).parents[1] / "runs" / "roulette"
KEEP = object()  # --variance-margin not given: the checkpoint's
WINDOW = 250  # steps per row of the training table


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    digits_argv = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    replay = sub.add_parser("replay", help="train as digits.py does, with per-step records and checkpoints")
    replay.add_argument("--model", choices=("impflow", "resflow"), default="impflow")
    replay.add_argument("--seed", type=int, default=0)
    resume = sub.add_parser("resume", help="continue a checkpoint, optionally with another --variance-margin")
    measure = sub.add_parser("measure", help="contractions and gradient-estimator spread at a checkpoint")
    for q in (resume, measure):
        q.add_argument("checkpoint", type=Path)
    for q in (replay, resume):
        q.add_argument("--until", type=int, required=True, help="last training step")
        q.add_argument("--save-at", default="", help="steps to checkpoint, e.g. 4000,5000")
    for q in (resume, measure):
        q.add_argument("--variance-margin", type=arg_type(digits.parse_margin), default=KEEP,
                       help="override the checkpoint's (a number in (0, 1] or none)")
    measure.add_argument("--draws", type=int, default=40)
    measure.add_argument("--warmup", type=int, default=20, help="training-mode draws before measuring (ρ̂ adapts)")
    p.add_argument("--name", default=None, help="results file stem (default from the run)")
    args = p.parse_args(argv)
    if args.command == "replay" and "--variance-margin" not in digits_argv:
        p.error("pass digits.py's --variance-margin after -- (none: the fixed-p estimator)")
    if args.command == "replay" and any(a.startswith(("--schedule", "--warmup")) for a in digits_argv):
        # replay trains to --until (run_training sets steps = until), so a decaying schedule would end there
        p.error("replay reproduces constant-learning-rate digits runs only (no --schedule/--warmup)")
    return args, digits_argv


def grad_norm(model: torch.nn.Module) -> float:
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None))


def solver_iterations(model: torch.nn.Module) -> int | None:
    """The most iterations of the last forward solves of the ImpFlow blocks (None for ResFlow)."""
    solves = [b.forward_solve for b in model.modules() if isinstance(b, ImplicitBlock)]
    return max(s.forward.iterations for s in solves) if solves else None


def restore(path: Path, margin) -> tuple[dict, argparse.Namespace, torch.nn.Module, torch.optim.Optimizer, torch.Generator]:
    """A checkpoint of ``replay``/``resume`` as (checkpoint, digits args, model, Adam, batch generator),
    the global random state set to the saved one; ``margin`` overrides the variance rule."""
    ck = torch.load(path, weights_only=False)
    dargs = argparse.Namespace(**{**digits.SCHEDULE_DEFAULTS, **ck["digits_args"]})
    if margin is not KEEP:
        dargs.variance_margin = margin
    model = digits.build(ck["model_name"], dargs)
    model.load_state_dict(ck["model"])
    for layer in model.modules():
        if hasattr(layer, "mark_current"):  # u, v were refined for these weights
            layer.mark_current()
    opt = torch.optim.Adam(model.parameters(), lr=dargs.lr)
    opt.load_state_dict(ck["opt"])
    gen = torch.Generator()
    gen.set_state(ck["gen"])
    torch.set_rng_state(ck["rng"])
    return ck, dargs, model, opt, gen


def run_training(args, dargs, name: str, seed: int, model, opt, gen, first: int, origin: str) -> dict:
    """Steps ``first`` … ``--until`` of digits.train with per-step records and checkpoints."""
    torch.set_num_threads(dargs.threads)
    data, pre, test = digits.prepare(dargs)
    dargs.steps = args.until  # the loop's evaluations stay those of the full run (every --eval-every < until)
    save_at = {int(s) for s in args.save_at.split(",") if s}
    CHECKPOINTS.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def on_grad(step: int, loss: torch.Tensor) -> None:
        rows.append({"step": step, "loss": float(loss.detach()), "grad_norm": grad_norm(model),
                     "solver_iterations": solver_iterations(model)})

    def after_step(step: int) -> None:
        if step in save_at:
            refresh_spectral(model)  # the refinement the next forward would do: u, v then fit the weights saved
            path = CHECKPOINTS / f"{name}_s{seed}_{step}.pt"
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state(),
                        "gen": gen.get_state(), "step": step, "model_name": name, "seed": seed,
                        "digits_args": vars(dargs) | {"steps": None}}, path)
            print(f"saved {path}", flush=True)

    t0 = time.perf_counter()
    curve, nonfinite = digits.train(dargs, name, model, opt, gen, data, pre, test, first, on_grad, after_step)
    curve.append({"step": args.until, "test_bpd": digits.evaluate(model, name, *test)["bpd"]})
    return {
        "kind": args.command, "origin": origin, "model": name, "seed": seed, "first_step": first,
        "until": args.until, "variance_margin": dargs.variance_margin, "nonfinite_steps": nonfinite,
        "train_time_s": time.perf_counter() - t0, "curve": curve, "steps": rows,
    }


def training_markdown(out: dict) -> list[str]:
    r = out["run"]
    rows = r["steps"]
    lines = [
        f"{r['model']} seed {r['seed']}, steps {r['first_step']}–{r['until']} ({r['origin']}); "
        f"{digits.roulette_text(r)}; {r['nonfinite_steps']} non-finite steps skipped.",
        "",
        f"| steps | mean loss (nats/image) | min loss | median ‖grad‖ | max ‖grad‖ | max solver iterations |",
        "|---|---|---|---|---|---|",
    ]
    for a in range(0, len(rows), WINDOW):
        w = rows[a : a + WINDOW]
        losses, norms = [x["loss"] for x in w], [x["grad_norm"] for x in w]
        its = [x["solver_iterations"] for x in w if x["solver_iterations"] is not None]
        lines.append(f"| {w[0]['step']}–{w[-1]['step']} | {statistics.mean(losses):.2f} | {min(losses):.2f} | "
                     f"{statistics.median(norms):.1f} | {max(norms):.1f} | {max(its) if its else '—'} |")
    top = sorted(rows, key=lambda x: -x["grad_norm"])[:5]
    lines += ["", "Largest gradient norms: " + ", ".join(
        f"step {x['step']} (‖grad‖ {x['grad_norm']:.0f}, loss {x['loss']:.1f})" for x in top) + ".", "",
        "| step | test bits/dim |", "|---|---|"]
    lines += [f"| {c['step']} | {c['test_bpd']:.4f} |" for c in r["curve"]]
    return lines


def residual_maps(model: torch.nn.Module) -> list[tuple[str, ResidualBlock, torch.nn.Module, int]]:
    """(name, block, module, side): the block's g is evaluated at the input (side 0) or output
    (side 1) of ``module``: ImpFlow's g_x at the ImpFlow block's input, g_z at its output z,
    ResFlow's g at its own block's input."""
    inner = {id(c) for b in model.modules() if isinstance(b, ImplicitBlock) for c in (b.fx, b.fz)}
    maps = []
    for n, m in model.named_modules():
        if isinstance(m, ImplicitBlock):
            maps += [(f"{n}.g_x", m.fx, m, 0), (f"{n}.g_z", m.fz, m, 1)]
        elif isinstance(m, ResidualBlock) and id(m) not in inner:
            maps.append((n, m, m, 0))
    return maps


def contractions(model, name: str, maps, y: torch.Tensor) -> list[dict]:
    """Spectral norm and radius of each map's exact Jacobian at the images ``y``."""
    hooked = {id(m): m for _, _, m, _ in maps}.values()
    with recording(hooked) as calls, torch.no_grad(), exact_logdet():
        model.log_prob(digits.to_input(name, y))
    seen = {id(module): (x, out[0]) for module, x, out in calls}
    out = []
    for label, block, module, side in maps:
        x = seen[id(module)][side]
        shape = x.shape[1:]
        g = lambda v: block.g(v.reshape(1, *shape)).reshape(-1)
        J = torch.func.vmap(torch.func.jacrev(g))(x.reshape(len(x), -1)).detach()
        norm = torch.linalg.matrix_norm(J, ord=2)
        radius = torch.linalg.eigvals(J).abs().max(dim=1).values
        rho_hat = float(block.contraction)
        out.append({"map": label, "norm_median": float(norm.median()), "norm_max": float(norm.max()),
                    "radius_median": float(radius.median()), "radius_max": float(radius.max()),
                    "rho_hat": rho_hat, "q": block.logdet.continuation(rho_hat) if block.logdet.roulette == "geometric" else None})
    return out


def measure(args) -> dict:
    ck, dargs, model, opt, gen = restore(args.checkpoint, args.variance_margin)
    name = ck["model_name"]
    torch.set_num_threads(dargs.threads)
    data, pre, test = digits.prepare(dargs)
    params = list(model.parameters())
    batch_gen = torch.Generator().manual_seed(999)
    idx = torch.randint(0, len(data.train_images), (dargs.batch,), generator=batch_gen)
    y, _ = pre(digits.dequantize(data.train_images[idx], data.levels, batch_gen))

    def gradient() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        (-model.log_prob(digits.to_input(name, y)).mean()).backward()
        return torch.cat([p.grad.reshape(-1) for p in params])

    model.train()
    with exact_logdet():
        exact = gradient()
    torch.manual_seed(0)
    for _ in range(args.warmup):
        gradient()
    draws = torch.stack([gradient() for _ in range(args.draws)])
    err = ((draws - exact).norm(dim=1) / exact.norm()).tolist()
    model.eval()
    maps = contractions(model, name, residual_maps(model), test[0][:60])
    return {"kind": "measure", "checkpoint": str(args.checkpoint), "model": name, "seed": ck["seed"], "step": ck["step"],
            "variance_margin": dargs.variance_margin, "draws": args.draws, "warmup": args.warmup,
            "relative_gradient_error": err,
            "mean_of_draws_error": float((draws.mean(0) - exact).norm() / exact.norm()), "maps": maps}


def measure_markdown(out: dict) -> list[str]:
    r = out["run"]
    err = sorted(r["relative_gradient_error"])
    lines = [
        f"{r['model']} seed {r['seed']} at step {r['step']} ({r['checkpoint']}); {digits.roulette_text(r)}.",
        "",
        f"Neumann gradient on one training batch, {r['draws']} draws after {r['warmup']} warm-up draws, "
        f"‖draw − exact‖/‖exact‖: median {statistics.median(err):.3f}, 90% {err[int(0.9 * (len(err) - 1))]:.3f}, "
        f"max {err[-1]:.3f}; the mean of the draws is off by {r['mean_of_draws_error']:.3f}.",
        "",
        "| residual map | ‖J_g‖₂ median | max | spectral radius median | max | ρ̂ (block) | roulette q |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in r["maps"]:
        q = f"{m['q']:.3f}" if m["q"] is not None else "—"
        lines.append(f"| {m['map']} | {m['norm_median']:.3f} | {m['norm_max']:.3f} | {m['radius_median']:.3f} | "
                     f"{m['radius_max']:.3f} | {m['rho_hat']:.3f} | {q} |")
    return lines


def main(argv: list[str] | None = None) -> dict:
    args, digits_argv = parse(argv)
    command = "python benchmarks/roulette.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.command == "replay":
        dargs = digits.parse(digits_argv)
        torch.manual_seed(args.seed)  # as digits.run_one
        model = digits.build(args.model, dargs)
        opt = torch.optim.Adam(model.parameters(), lr=dargs.lr)
        gen = torch.Generator().manual_seed(1000 + args.seed)
        run = run_training(args, dargs, args.model, args.seed, model, opt, gen, 1, "a fresh run")
        stem = f"{args.model}_s{args.seed}_replay"
    elif args.command == "resume":
        ck, dargs, model, opt, gen = restore(args.checkpoint, args.variance_margin)
        run = run_training(args, dargs, ck["model_name"], ck["seed"], model, opt, gen, ck["step"] + 1,
                           f"resumed from {args.checkpoint}")
        stem = f"{ck['model_name']}_s{ck['seed']}_from{ck['step']}"
    else:
        run = measure(args)
        stem = f"{run['model']}_s{run['seed']}_at{run['step']}"
    stem = "roulette_" + (args.name or stem + ("" if run["variance_margin"] is None else "_rule"))
    out = {"benchmark": "roulette", "command": command, "machine": machine(), "run": run}
    md = ["# Russian-roulette log-det estimator in training (digits)", "", f"Command: `{command}`  ",
          f"Machine: {out['machine']['cpu']}, torch {out['machine']['torch']}, {out['machine']['date']}", ""]
    md += measure_markdown(out) if args.command == "measure" else training_markdown(out)
    publish(stem, out, "\n".join(md) + "\n")
    return out


if __name__ == "__main__":
    main()
