"""Shared pieces of the benchmark scripts: timing, a briefly trained toy model, result files."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import impflow
from impflow.config import ConfigError
from impflow.data import toy2d

RESULTS = Path(__file__).parent / "results"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the architecture where that is unreadable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What a result was measured on. Seeded runs reproduce bitwise only where the kernels round
    alike: the CPU's instruction set decides which oneDNN convolution kernels run (training
    amplifies their last-bit differences), so the ISA cap ``ONEDNN_MAX_CPU_ISA`` (e.g. ``AVX2``
    on an AVX-512 machine) is recorded with the CPU and ATen's own dispatch level."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def train_briefly(flow: impflow.Flow, steps: int, batch: int = 1000, lr: float = 2e-3, seed: int = 0) -> float:
    """Adam on fresh checkerboard batches; returns the last minibatch NLL (nats)."""
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    dtype = next(flow.parameters()).dtype
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        x = toy2d.sample("checkerboard", batch, generator=g, dtype=dtype)
        loss = -flow.log_prob(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def arg_type(parse):
    """``parse`` (an :mod:`impflow.config` parser such as ``parse_hidden`` or ``parse_switch``) as
    an argparse type whose ConfigError message becomes the usage error."""

    def wrapped(text: str):
        try:
            return parse(text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    wrapped.__name__ = parse.__name__
    return wrapped


def command_line(script: str, args: argparse.Namespace, skip: tuple[str, ...] = ("no_save",)) -> str:
    """The command that reruns ``benchmarks/SCRIPT.py`` with every setting of ``args`` spelled out."""
    return f"python benchmarks/{script}.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in skip)


def write(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


OBSERVATIONS = "## Observations"


def publish(name: str, payload: dict, md: str, save: bool = True) -> None:
    """Print the markdown report and, if ``save``, write results/NAME.json and results/NAME.md.
    A hand-written section of the old NAME.md that starts with ``## Observations`` (to the end of
    the file) is carried over to the new one, with a reminder to check it against the new numbers."""
    print()
    print(md)
    if save:
        path = write(name, payload)
        md_path = RESULTS / f"{name}.md"
        old = md_path.read_text() if md_path.exists() else ""
        at = old.find("\n" + OBSERVATIONS)
        if at >= 0:
            md = md.rstrip("\n") + "\n" + old[at:]
            print(f"kept the hand-written observations of {md_path}: check them against the numbers above")
        md_path.write_text(md)
        print(f"wrote {path} and {md_path}")


def publish_rows(script: str, args: argparse.Namespace, title: str, note: str, rows: list[dict], cols: list[str]) -> None:
    """:func:`publish` the report of a benchmark that measures one row per case: ``# title``, the
    rerun command followed by ``note`` (what the numbers are), the table of ``cols``; the JSON
    holds the machine, the command, the settings and the rows. ``args.no_save``: print only."""
    command = command_line(script, args)
    md = "\n".join([f"# {title}", "", f"`{command}` — {note}", "", table(rows, cols), ""])
    publish(script, {"machine": machine(), "command": command, "settings": vars(args), "rows": rows}, md,
            save=not args.no_save)


def load_parts(
    stems: list[str], keys: tuple[str, ...], run_id: tuple[str, ...], defaults: dict | None = None
) -> tuple[list[dict], list[dict]]:
    """Read results/STEM.json for each stem; check that ``keys`` of their settings agree (a key
    missing from an older file reads as ``defaults[key]``) and that no run repeats (runs are
    identified by their ``run_id`` fields); returns (parts, pooled runs), each run carrying its
    part's ``machine`` record."""
    parts = [json.loads((RESULTS / f"{stem}.json").read_text()) for stem in stems]
    defaults = defaults or {}
    get = lambda q, k: q["settings"].get(k, defaults.get(k))
    for q in parts[1:]:
        bad = [k for k in keys if get(q, k) != get(parts[0], k)]
        if bad:
            raise SystemExit(f"the merged results were run with different settings: {', '.join(bad)}")
    for q in parts:  # each run remembers where it ran (a merged file's runs already do)
        for r in q["runs"]:
            r.setdefault("machine", q["machine"])
    runs = [r for q in parts for r in q["runs"]]
    ids = [tuple(r[k] for k in run_id) for r in runs]
    if len(set(ids)) != len(ids):
        raise SystemExit(f"the merged results repeat a ({', '.join(run_id)}) run")
    return parts, runs


MACHINE_KEYS = ("cpu", "cpu_capability", "onednn_max_cpu_isa", "torch", "threads")


def same_machine(a: dict, b: dict) -> bool:
    """Whether two ``machine()`` records describe the same hardware and software (dates aside)."""
    return all(a.get(k) == b.get(k) for k in MACHINE_KEYS)


def machines_note(runs: list[dict]) -> str | None:
    """A sentence naming the machines that merged ``runs`` came from, or None when one machine ran
    them all; times are then comparable only between runs of one machine."""
    records: list[dict] = []
    for r in runs:
        if "machine" in r and not any(same_machine(r["machine"], m) for m in records):
            records.append(r["machine"])
    if len(records) < 2:
        return None
    describe = lambda m: (
        f"{m.get('cpu')}, ATen kernels {m.get('cpu_capability', 'not recorded')}, "
        f"oneDNN ISA cap {m.get('onednn_max_cpu_isa') or ('none' if 'onednn_max_cpu_isa' in m else 'not recorded')}, "
        f"{m.get('date')}"
    )
    return (f"The merged runs come from {len(records)} machines ({'; '.join(map(describe, records))}): "
            "times are comparable only between runs of one machine.")


def merged_command(command: str, parts: list[dict]) -> str:
    return command + "  (merging: " + "; ".join(q["command"] for q in parts) + ")"


def seeds_text(runs: list[dict]) -> str:
    """The seeds of ``runs``: "0..4" when contiguous, else "0, 3" (merged runs may skip some)."""
    seeds = sorted({r["seed"] for r in runs})
    if seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}..{seeds[-1]}"
    return ", ".join(map(str, seeds))


def table(rows: list[dict], cols: list[str]) -> str:
    """A markdown table of ``rows`` restricted to ``cols``."""
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def train_steps(
    model: torch.nn.Module,
    loss_fn,
    data: torch.Tensor,
    steps: int,
    batch: int = 256,
    lr: float = 1e-3,
    labels: torch.Tensor | None = None,
    seed: int = 0,
) -> float:
    """Adam on minibatches drawn (seeded) from ``data`` (and ``labels``);
    ``loss_fn(model, x_batch, labels_batch_or_None)``; returns the last minibatch loss."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        i = torch.randint(len(data), (batch,), generator=g)
        loss = loss_fn(model, data[i].to(dtype), None if labels is None else labels[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def digits_vectors(digits, split: str = "train", seed: int = 0) -> torch.Tensor:
    """64-D digits vectors: uniformly dequantised (seeded) images of ``digits`` (an
    :class:`impflow.data.images.ImageData`) flattened and standardised with the training
    split's per-pixel mean and std (constant pixels: std 1)."""
    x, _ = digits.tensors(split, generator=torch.Generator().manual_seed(seed))
    ref, _ = digits.tensors("train", generator=torch.Generator().manual_seed(0))
    ref = ref.flatten(1)
    std = ref.std(dim=0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return (x.flatten(1) - ref.mean(dim=0)) / std
