"""The ``impflow`` command: train, evaluate, sample and plot flows (2-D toys, tabular data, images)
and Lipschitz ResFlow/ImpFlow classifiers (``impflow train --task classify``).

Exit codes: 0 success, 1 training stopped on a non-finite loss, 2 bad input (unknown names,
missing or incompatible runs, bad settings), 130 interrupted (Ctrl-C; training saves first).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed
from .checkpoint import CheckpointError, has_checkpoint
from .config import (
    FIELDS, PRESETS, ConfigError, RunConfig, coerce, parse_bool, parse_hidden, parse_switch, preset_help, resolve,
)
from .train import Trainer, evaluate_run, plot_run, sample_run
from .train.runs import plot_image_grid, saved_image_shape

__all__ = ["main", "build_parser"]

EXIT_CODES = {"done": 0, "non-finite": 1, "interrupted": 130}
DEMO_OUT = "runs/demo"


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (with a pointer to --help) instead of the full usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _arg_type(name: str) -> Any:
    def parse(text: str) -> Any:
        try:
            return coerce(name, text, source=None)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = name
    return parse


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field; unset flags stay out of the namespace (config/preset decide)."""
    group = parser.add_argument_group("run settings (also settable in --config YAML by the same name)")
    for name, f in FIELDS.items():
        if name == "preset":
            continue
        flag = "--" + name.replace("_", "-")
        shown = "" if f.default is None else f" (default: {f.default})"
        if f.metadata["parse"] is parse_bool:
            group.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=f.metadata["help"])
        else:
            metavar = {int: "N", float: "X", parse_hidden: "W,W", parse_switch: "true|false"}.get(f.metadata["parse"], name.upper())
            group.add_argument(flag, type=_arg_type(name), default=argparse.SUPPRESS, metavar=metavar,
                               help=f.metadata["help"] + shown)
    group.add_argument("--config", type=Path, metavar="FILE.yaml",
                       help="YAML mapping of settings; flags override it, it overrides the preset")


def _add_runtime_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, metavar="RUN", help="run directory written by `impflow train`")
    parser.add_argument("--which", choices=("best", "last"), default="best", help="checkpoint (default: best)")
    parser.add_argument("--device", type=_arg_type("device"), default=FIELDS["device"].default,
                        help=FIELDS["device"].metadata["help"] + " (default: auto)")
    parser.add_argument("--threads", type=_arg_type("threads"), default=FIELDS["threads"].default,
                        help="CPU threads (0: all cores; default 1, see `impflow train --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="impflow",
        description="Implicit Normalizing Flows (ImpFlow) and Residual Flows: density estimation on 2-D toys, "
        "tabular data and images, and Lipschitz-constrained classifiers. NLLs are in nats per example "
        "(bits = nats / ln 2); image runs also report bits/dim.",
        epilog="Quick start: impflow demo --out runs/demo",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    presets = preset_help()

    train = sub.add_parser(
        "train",
        help="train a flow (or, with --task classify, a classifier)",
        description="Train a flow by maximum likelihood, or with --task classify a classifier with ResFlow or "
        "ImpFlow blocks by cross-entropy. Settings: defaults < --preset < --config < flags. "
        "Writes RUN/config.json, checkpoints (last and best), history.json and plots.",
        epilog=presets + "\n\nexamples:\n  impflow train --preset paper-fig3 --out runs/fig3\n"
        "  impflow train --data digits --model image-impflow --out runs/digits-img\n"
        "  impflow train --task classify --data digits --model impflow --coeff 0.9 --out runs/cls",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--out", type=Path, required=True, metavar="RUN", help="run directory")
    train.add_argument("--preset", choices=tuple(PRESETS), help="start from a preset (listed below)")
    train.add_argument("--resume", action="store_true",
                       help="continue RUN exactly from its last checkpoint (only steps, eval-every, log-every, device, "
                       "threads, quiet may change)")
    train.add_argument("--devices", type=int, default=1, metavar="N",
                       help="data-parallel processes to start on this machine (DistributedDataParallel: gloo on "
                       "CPU, NCCL with one GPU each on CUDA); the batch size is the global batch, split evenly. "
                       "Same as launching with torchrun --nproc_per_node N -m impflow train ... (default: 1)")
    _add_run_options(train)
    train.set_defaults(handler=_train)

    demo = sub.add_parser(
        "demo",
        help="train the demo preset, then print the evaluation and the plot paths (`make demo`)",
        description="Train the `demo` preset (resuming RUN if it holds a run), print the eval JSON and the plots.",
        epilog=presets,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--out", type=Path, default=Path(DEMO_OUT), metavar="RUN",
                      help=f"run directory (default: {DEMO_OUT})")
    _add_run_options(demo)
    demo.set_defaults(handler=_demo)

    ev = sub.add_parser(
        "eval",
        help="print test NLL (bits/dim for images), baselines and solver statistics of a run as JSON "
        "(classify runs: test error and accuracy)",
    )
    _add_runtime_options(ev)
    ev.add_argument("-n", "--n-test", type=int, default=20000, help="fresh held-out test points for generated (toy) data (default: 20000); file, UCI and image data use their whole test split")
    ev.add_argument("--logdet", choices=("auto", "exact", "unbiased"), default="auto",
                    help="log-determinants of residual/implicit blocks: exact, the unbiased estimator, or auto = "
                    "exact up to 64 dimensions per example, unbiased above (default: auto)")
    ev.add_argument("--repeats", type=int, default=4,
                    help="seeded passes of the unbiased estimator; their spread gives its standard error "
                    "(default: 4)")
    ev.set_defaults(handler=_eval)

    sample = sub.add_parser(
        "sample",
        help="draw samples from a trained run into a .npy file (tabular and array runs: in the data's own units; "
        "image runs: (N, C, H, W) dequantized values x = (level + u)/K, within (-a, 1 + a) with the logit "
        "preprocessing, a = alpha/(1 - 2 alpha), and a PNG grid beside them)",
    )
    _add_runtime_options(sample)
    sample.add_argument("-n", type=int, default=10000, help="number of samples (default: 10000)")
    sample.add_argument("-o", "--output", type=Path, help="output .npy file (default: RUN/samples.npy)")
    sample.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    sample.add_argument("--standardized", action="store_true",
                        help="tabular and array runs: keep the standardised z = (x - mean)/std the model was "
                        "trained on instead of mapping back to the data's units")
    sample.set_defaults(handler=_sample)

    plot = sub.add_parser("plot", help="write PNGs of the learned density, samples and training curve")
    _add_runtime_options(plot)
    plot.set_defaults(handler=_plot)

    from .experiments import EXPERIMENTS

    exp = sub.add_parser("experiment", help="reproduce a paper claim: " + ", ".join(sorted(EXPERIMENTS)))
    exp.add_argument("name", choices=sorted(EXPERIMENTS), metavar="NAME", help=", ".join(sorted(EXPERIMENTS)))
    exp.add_argument("--out", type=Path, default=None, help="output folder (default: runs/experiments/NAME)")
    exp.add_argument("--quick", action="store_true", help="a reduced run (seconds to a minute)")
    exp.add_argument("--seed", type=int, default=0)
    exp.add_argument("--threads", type=_arg_type("threads"), default=FIELDS["threads"].default,
                     help="CPU threads (0: all cores; default 1)")
    exp.set_defaults(handler=_experiment)
    return parser


# --------------------------------------------------------------------------- commands


def _set_threads(threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)


def _jsonable(obj: Any) -> Any:
    """Non-finite floats as null (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _print_plots(paths: dict[str, Path]) -> None:
    print("plots:")
    for name, path in paths.items():
        print(f"  {name}: {path}")


def _fit(config: RunConfig, explicit: dict[str, Any], out: Path, resume: bool) -> tuple[int, str]:
    """Train (or resume) a run and print how it ended. Returns the exit code and the run's device."""
    trainer = Trainer.resume(out, explicit) if resume else Trainer(config, out)
    _set_threads(trainer.config.threads)
    result = trainer.fit()
    if trainer.rank == 0:
        print(result.message, file=sys.stdout if result.status == "done" else sys.stderr)
    return EXIT_CODES[result.status], str(trainer.device)


def _run_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The run settings given as flags (--preset is passed to resolve() on its own: an absent
    --preset must not read as preset=None, or --resume of a preset run would refuse)."""
    return {k: v for k, v in vars(args).items() if k in FIELDS and k != "preset"}


def _train(args: argparse.Namespace) -> int:
    config, explicit = resolve(args.preset, args.config, _run_flags(args))
    if args.devices < 1:
        raise ConfigError(f"--devices must be at least 1, got {args.devices}")
    if args.devices > 1 and distributed.requested_world_size() == 1:  # not already under a launcher
        if not args.resume and config.batch_size % args.devices:
            raise ConfigError(f"batch_size {config.batch_size} is not divisible by --devices {args.devices}")
        return distributed.spawn(args.devices, args.argv)
    try:
        code, device = _fit(config, explicit, args.out, args.resume)
        if distributed.rank() != 0:
            return code
    finally:
        distributed.shutdown()
    if code == 0:
        _print_plots(plot_run(args.out, device=device))
    return code


def _demo(args: argparse.Namespace) -> int:
    config, explicit = resolve("demo", args.config, _run_flags(args))
    code, device = _fit(config, explicit, args.out, resume=has_checkpoint(args.out))
    if code == 0:
        plots = plot_run(args.out, device=device)
        print(json.dumps(_jsonable(evaluate_run(args.out, device=device)), indent=2))
        _print_plots(plots)
    return code


def _prepare(args: argparse.Namespace) -> str:
    """Apply --threads; the device to load on."""
    _set_threads(args.threads)
    return args.device


def _eval(args: argparse.Namespace) -> int:
    if args.n_test < 2:
        raise ConfigError(f"--n-test must be at least 2, got {args.n_test}")
    if args.repeats < 1:
        raise ConfigError(f"--repeats must be at least 1, got {args.repeats}")
    report = evaluate_run(args.run, args.which, args.n_test, _prepare(args), args.logdet, args.repeats)
    print(json.dumps(_jsonable(report), indent=2))
    return 0


def _sample(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise ConfigError(f"-n must be at least 1, got {args.n}")
    path = args.output if args.output is not None else args.run / "samples.npy"
    if path.suffix != ".npy":
        raise ConfigError(f"-o {path}: samples are written as .npy; name a .npy file")
    samples = sample_run(args.run, args.n, args.seed, args.which, _prepare(args), args.standardized)
    shape = saved_image_shape(args.run)
    if shape is not None:
        samples = samples.reshape(-1, *shape)
    np.save(path, samples.numpy())
    print(path)
    if shape is not None:
        print(plot_image_grid({f"samples (seed {args.seed})": samples}, Path(path).with_suffix(".png")))
    return 0


def _plot(args: argparse.Namespace) -> int:
    _print_plots(plot_run(args.run, args.which, _prepare(args)))
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from .experiments import EXPERIMENTS

    _set_threads(args.threads)
    out = args.out if args.out is not None else Path("runs/experiments") / args.name
    out.mkdir(parents=True, exist_ok=True)
    result = EXPERIMENTS[args.name](out, quick=args.quick, seed=args.seed)
    print(json.dumps(_jsonable(result), indent=2, default=str))
    print(f"outputs in {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``impflow`` command with ``argv`` (default: sys.argv[1:]); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse has already printed
        return e.code if isinstance(e.code, int) else 0
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.handler(args)
    except (ConfigError, CheckpointError) as e:
        if int(os.environ.get("RANK", "0")) == 0:  # the same on every data-parallel rank: say it once
            print(f"impflow: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"impflow: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("impflow: interrupted", file=sys.stderr)
        return 130
