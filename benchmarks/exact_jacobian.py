"""Exact log-det Jacobians: reverse mode (batched vjps) against forward mode (batched jvps).

For each residual network g below, J_g(x) is formed both ways — :func:`impflow.logdet.jacobian`
(n vjps batched with ``is_grads_batched``) and :func:`impflow.logdet.forward_jacobian` (n jvps
batched with ``torch.func.vmap``) — and timed

* in training: J with a graph, then log det(I + J) + Σ g(x) backpropagated to x and the
  parameters (reverse-over-reverse against reverse-over-forward);
* in evaluation: J without a graph;

each with the directions in the library's CPU chunks (``impflow.logdet.CPU_CHUNK_ELEMENTS``) and
all at once (``whole``).

The networks: the first block of each scale of ``image_resflow((1, 8, 8))`` (digits; hidden 64,
kernels 3-1-3) on a batch of 64, and the first g of ``resflow(d)`` for d = 2, 16 (hidden 128-128)
on a batch of 1024. The two modes alternate within each repetition; medians are reported with
their ratio, and the two Jacobians are checked to agree. ``residual_logdet`` uses forward mode
for differentiable Jacobians of images (inputs with more than one event dimension) and reverse
mode otherwise, and chunks the directions on CPU: this benchmark is the measurement behind both.

    python benchmarks/exact_jacobian.py [--reps 5] [--threads 1] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import impflow.logdet
from impflow.logdet import forward_jacobian, jacobian
from impflow.models import image_resflow, resflow
from impflow.transforms.residual import ResidualBlock

from common import machine, publish, table


def cases(dtype: torch.dtype) -> list[tuple[str, torch.nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    image = [m for m in image_resflow((1, 8, 8)).to(dtype).modules() if isinstance(m, ResidualBlock)]
    out = [(f"digits scale {i + 1}, event {tuple(image[4 * i].event_shape)}", image[4 * i].g, (64, *image[4 * i].event_shape))
           for i in range(3)]
    for d in (2, 16):
        block = next(m for m in resflow(d).to(dtype).modules() if isinstance(m, ResidualBlock))
        out.append((f"MLP, d = {d}", block.g, (1024, d)))
    return out


def reverse(g: Callable, x: torch.Tensor, create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gx = g(x)
    return gx, jacobian(gx, x, create_graph)


def forward(g: Callable, x: torch.Tensor, create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.set_grad_enabled(create_graph):
        return forward_jacobian(g, x)


def timed(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(g: torch.nn.Module, shape: tuple[int, ...], dtype: torch.dtype, reps: int) -> dict:
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    eye = torch.eye(x[0].numel(), dtype=dtype)

    def train(jac: Callable) -> Callable[[], None]:
        def run() -> None:
            gx, J = jac(g, x, True)
            (torch.linalg.slogdet(eye + J)[1].sum() + gx.sum()).backward()
        return run

    def evaluate(jac: Callable) -> Callable[[], None]:
        def run() -> None:
            xe = x.detach().requires_grad_(True)
            with torch.no_grad() if jac is forward else torch.enable_grad():
                jac(g, xe, False)
        return run

    chunked = impflow.logdet.CPU_CHUNK_ELEMENTS
    runs = {f"{phase}_{mode}{suffix}": (make(jac), elements)
            for phase, make in (("train", train), ("eval", evaluate))
            for mode, jac in (("reverse", reverse), ("forward", forward))
            for suffix, elements in (("", chunked), ("_whole", 2**62))}
    times: dict[str, list[float]] = {k: [] for k in runs}
    try:
        for _ in range(reps + 1):  # the first repetition warms up
            for key, (fn, elements) in runs.items():
                impflow.logdet.CPU_CHUNK_ELEMENTS = elements
                times[key].append(timed(fn))
    finally:
        impflow.logdet.CPU_CHUNK_ELEMENTS = chunked
    row = {k: statistics.median(v[1:]) for k, v in times.items()}
    for phase in ("train", "eval"):
        row[f"{phase}_reverse/forward"] = row[f"{phase}_reverse"] / row[f"{phase}_forward"]
        for mode in ("reverse", "forward"):
            row[f"{phase}_{mode}_whole/chunked"] = row[f"{phase}_{mode}_whole"] / row[f"{phase}_{mode}"]
    Jr = reverse(g, x, False)[1]
    with torch.no_grad():
        Jf = forward_jacobian(g, x.detach())[1]
    row["max_abs_diff"] = float((Jr - Jf).abs().max())
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--no-save", action="store_true", help="print only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows = []
    for name, g, shape in cases(dtype):
        rows.append({"network": name, "batch": shape[0], **measure(g, shape, dtype, args.reps)})
        print(rows[-1], flush=True)
    cols = ["network", "batch", "train_reverse", "train_forward", "train_reverse/forward",
            "eval_reverse", "eval_forward", "eval_reverse/forward", "max_abs_diff"]
    chunk_cols = ["network", "batch"] + [f"{p}_{m}_whole/chunked" for p in ("train", "eval")
                                         for m in ("reverse", "forward")]
    command = "python benchmarks/exact_jacobian.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "no_save")
    md = "\n".join([
        "# Exact Jacobians: reverse mode against forward mode",
        "",
        f"`{command}` — seconds per call (median of {args.reps}), {args.dtype}, {args.threads} thread(s).",
        "`train_*`: J with a graph, log det(I + J) backpropagated; `eval_*`: J without a graph.",
        "A ratio above 1 means forward mode is faster.",
        "",
        table(rows, cols),
        "",
        f"## Chunked directions (CPU_CHUNK_ELEMENTS = {impflow.logdet.CPU_CHUNK_ELEMENTS}) against all at once",
        "",
        "Seconds all at once / seconds in chunks (the table above): above 1 means chunking is faster.",
        "",
        table(rows, chunk_cols),
        "",
    ])
    publish("exact_jacobian", {"machine": machine(), "command": command, "settings": vars(args), "rows": rows},
            md, save=not args.no_save)


if __name__ == "__main__":
    main()
