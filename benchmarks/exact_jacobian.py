"""Exact log-det Jacobians: how to batch the n vector-Jacobian products.

For each residual network g below, the per-sample Jacobian J_g(x) (n directions) is formed three
ways:

* ``loop``: one plain vjp per direction (n autograd calls);
* ``batched``: all n vjps in one call (``is_grads_batched``, i.e. vmap over the backward);
* ``chunked``: the batched call in chunks of k directions, k·batch·n ≤
  ``impflow.logdet.CPU_CHUNK_ELEMENTS``;

and timed in training (J with a graph, then log det(I + J) + Σ g(x) backpropagated to x and the
parameters) and in evaluation (J without a graph). :func:`impflow.logdet.jacobian` uses
``chunked`` for vectors and ``loop`` for images (event dims > 1): this benchmark is the
measurement behind that rule. The networks: the first block of each scale of
``image_resflow((1, 8, 8))`` (digits; hidden 64, kernels 3-1-3) on a batch of 64, and the first g
of ``resflow(d)`` for d = 2, 16 (hidden 128-128) on a batch of 1024. The variants alternate
within each repetition; medians are reported, and the three Jacobians are checked to agree.

    python benchmarks/exact_jacobian.py [--reps 5] [--threads 1] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from impflow.logdet import CPU_CHUNK_ELEMENTS, _chunk
from impflow.models import image_resflow, resflow
from impflow.transforms.residual import ResidualBlock

from common import publish_rows

VARIANTS = ("loop", "batched", "chunked")


def cases(dtype: torch.dtype) -> list[tuple[str, torch.nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    image = [m for m in image_resflow((1, 8, 8)).to(dtype).modules() if isinstance(m, ResidualBlock)]
    firsts = image[::4]  # the first block of each scale
    out = [(f"digits scale {i + 1}, event {b.event_shape}", b.g, (64, *b.event_shape)) for i, b in enumerate(firsts)]
    for d in (2, 16):
        block = next(m for m in resflow(d).to(dtype).modules() if isinstance(m, ResidualBlock))
        out.append((f"MLP, d = {d}", block.g, (1024, d)))
    return out


def jacobian(gx: torch.Tensor, x: torch.Tensor, create_graph: bool, variant: str) -> torch.Tensor:
    """J (batch, n, n) by the vjps of ``variant``."""
    B, n = x.shape[0], x[0].numel()
    basis = torch.eye(n, dtype=x.dtype).unsqueeze(1).expand(n, B, n).reshape(n, *gx.shape)
    grad = lambda b, batched: torch.autograd.grad(  # noqa: E731
        gx, x, b, retain_graph=True, create_graph=create_graph, is_grads_batched=batched)[0]
    if variant == "loop":
        rows = torch.stack([grad(b, False) for b in basis])
    else:
        k = n if variant == "batched" else _chunk(x)  # the library's rule
        rows = torch.cat([grad(b, True) for b in basis.split(k)])
    return rows.reshape(n, B, n).transpose(0, 1)


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(g: torch.nn.Module, shape: tuple[int, ...], dtype: torch.dtype, reps: int) -> dict:
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    eye = torch.eye(x[0].numel(), dtype=dtype)

    def train(variant: str) -> None:
        gx = g(x)
        J = jacobian(gx, x, True, variant)
        (torch.linalg.slogdet(eye + J)[1].sum() + gx.sum()).backward()

    def evaluate(variant: str) -> torch.Tensor:
        xe = x.detach().requires_grad_(True)
        return jacobian(g(xe), xe, False, variant)

    times: dict[str, list[float]] = {f"{p}_{v}": [] for p in ("train", "eval") for v in VARIANTS}
    for _ in range(reps + 1):  # the first repetition warms up
        for v in VARIANTS:
            times[f"train_{v}"].append(timed(lambda: train(v)))
            times[f"eval_{v}"].append(timed(lambda: evaluate(v)))
    row = {k: statistics.median(t[1:]) for k, t in times.items()}
    used = "loop" if len(shape) > 2 else "chunked"
    row["library"] = used
    for p in ("train", "eval"):
        row[f"{p}: best other / library"] = min(row[f"{p}_{v}"] for v in VARIANTS if v != used) / row[f"{p}_{used}"]
    Js = [evaluate(v) for v in VARIANTS]
    row["max_abs_diff"] = max(float((J - Js[0]).abs().max()) for J in Js[1:])
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
    cols = ["network", "batch", *(f"{p}_{v}" for p in ("train", "eval") for v in VARIANTS), "library",
            "train: best other / library", "eval: best other / library", "max_abs_diff"]
    publish_rows(
        "exact_jacobian", args, "Exact Jacobians: one vjp per direction, all batched, or batched in chunks",
        f"seconds per call (median of {args.reps}), {args.dtype}, {args.threads} thread(s), "
        f"CPU_CHUNK_ELEMENTS = {CPU_CHUNK_ELEMENTS}.\n"
        "`train_*`: J with a graph, log det(I + J) backpropagated; `eval_*`: J without a graph.\n"
        "`library`: the variant `impflow.logdet.jacobian` uses; a ratio above 1 means it is the fastest.",
        rows, cols)


if __name__ == "__main__":
    main()
