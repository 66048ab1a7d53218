"""Data-parallel training over several processes (``torchrun --nproc_per_node N -m impflow train``
or ``impflow train --devices N``).

A process joins a process group when the launcher's environment says so (``WORLD_SIZE`` > 1):
gloo for CPU runs, NCCL for CUDA ones (rank ``LOCAL_RANK`` then uses ``cuda:LOCAL_RANK``). Every
rank draws the same global batch from the shared data stream and trains on its own contiguous
slice of it; DistributedDataParallel averages the gradients, so the optimiser steps - and hence
the weights and the spectral-norm vectors refined from them - stay identical on every rank.
Outside such an environment every helper here is a no-op and training is single-process.
"""

from __future__ import annotations

import gc
import inspect
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .nn.lipschitz import SpectralLinear

__all__ = [
    "requested_world_size",
    "init",
    "active",
    "rank",
    "world_size",
    "barrier",
    "all_reduce",
    "all_gather_object",
    "broadcast_buffers",
    "wrap",
    "rank_seed",
    "spawn",
    "shutdown",
]


INIT_METHOD = "IMPFLOW_INIT_METHOD"  # rendezvous URL set by ``spawn`` (torchrun's ``env://`` otherwise)


def requested_world_size() -> int:
    """WORLD_SIZE from the launcher's environment (1 when not launched by torchrun/--devices)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def init(device: torch.device) -> torch.device:
    """Join the process group the environment describes (once) and return this rank's device:
    ``cuda`` without an index becomes ``cuda:LOCAL_RANK``. Single-process: ``device`` unchanged."""
    if requested_world_size() <= 1:
        return device
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            init_method=os.environ.get(INIT_METHOD, "env://"),
            rank=int(os.environ.get("RANK", local)),
            world_size=requested_world_size(),
        )
    return device


def shutdown() -> None:
    """Leave the process group. Wrappers that hold it (DDP and its reducer form reference cycles)
    are collected first: one left to interpreter exit took the gloo threads down with it there,
    and the process aborted ("terminate called without an active exception", 2 of 40 runs)."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce(value: float | int, device: torch.device, op: str = "mean") -> float:
    """``value`` combined over the ranks (``mean``, ``sum`` or ``max``), in float64."""
    if not active():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    out = float(t.item())
    return out / dist.get_world_size() if op == "mean" else out


def all_gather_object(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` single-process)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def broadcast_buffers(module: nn.Module) -> None:
    """Copy every buffer of ``module`` (e.g. spectral-norm ``u``, ``v``) from rank 0 to all ranks.

    The buffers already agree when every rank ran the same deterministic refinements on the same
    weights; this makes it hold even where a kernel is not bitwise reproducible."""
    if not active():
        return
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for buf in module.buffers():
        groups.setdefault((buf.dtype, buf.device), []).append(buf)
    for bufs in groups.values():  # one broadcast per dtype instead of one per buffer
        flat = torch.cat([b.reshape(-1) for b in bufs])
        dist.broadcast(flat, 0)
        for b, part in zip(bufs, flat.split([b.numel() for b in bufs])):
            b.copy_(part.view_as(b))


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel (its ``forward`` is the flow's ``log_prob``).

    Buffers are not re-broadcast at every forward (``broadcast_buffers=False``): the spectral-norm
    vectors are refined in place inside the forward, identically on every rank, and the trainer
    broadcasts them after each optimiser step instead."""
    ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel
    current = [m for m in model.modules() if isinstance(m, SpectralLinear) and m.current]
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:  # newer torch's spelling
        wrapped = ddp(model, device_ids=ids, forward_sync_buffers=False)
    else:
        wrapped = ddp(model, device_ids=ids, broadcast_buffers=False)
    # construction broadcasts rank 0's parameters in place: the values every rank already has, but
    # new version counters, which would make the spectral layers refine u, v once more than a run
    # that was never wrapped (or wrapped at another step) and break bit-exact resumption
    for m in current:
        m.mark_current()
    return wrapped


def rank_seed(seed: int, rank: int) -> int:
    """The global-RNG seed of rank ``rank`` > 0 (independent estimator noise per rank)."""
    return int(np.random.SeedSequence([seed, 1000 + rank]).generate_state(1, np.uint64)[0] >> 1)


# --------------------------------------------------------------------------- local launcher


def _worker(rank: int, world: int, rendezvous: str, argv: list[str]) -> None:
    os.environ.update(
        {INIT_METHOD: rendezvous},
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
    )
    from .cli import main

    sys.exit(main(argv))  # multiprocessing turns SystemExit into the process's exit code


def spawn(n: int, argv: Sequence[str]) -> int:
    """Run ``impflow ARGV`` in ``n`` local processes forming one process group (what
    ``impflow train --devices N`` does). Returns the first non-zero exit code (0 when all
    succeed); when one rank fails the others are terminated rather than left waiting."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    # A fresh file per launch: no TCP port to pick, so no race with other processes for one.
    folder = tempfile.mkdtemp(prefix="impflow-rendezvous-")
    rendezvous = Path(folder, "store").as_uri()
    procs = [ctx.Process(target=_worker, args=(r, n, rendezvous, list(argv))) for r in range(n)]
    for p in procs:
        p.start()
    code = 0
    try:
        while any(p.is_alive() for p in procs):
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if failed:
                code = failed[0]
                for p in procs:
                    if p.is_alive():
                        p.terminate()
                break
            time.sleep(0.05)
    except KeyboardInterrupt:  # the workers got the same SIGINT; they stop and save together
        pass
    for p in procs:
        p.join()
    shutil.rmtree(folder, ignore_errors=True)
    if code == 0:
        code = next((p.exitcode for p in procs if p.exitcode), 0)
    return 130 if code < 0 and code == -2 else (1 if code < 0 else code)
