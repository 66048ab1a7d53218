"""Run directories and crash-safe checkpoints.

Layout of a run directory::

    RUN/config.json                       the RunConfig and the builder's kwargs (rebuilds the model)
    RUN/history.json                      the training records (for people and plots)
    RUN/checkpoints/step-00000500/        one checkpoint: model.safetensors (weights and buffers)
                                          and trainer.pt (optimiser, scheduler, RNG states, step, history)
    RUN/last.json, RUN/best.json          pointers: {"step", "path", ...}

A checkpoint is written into a temporary folder, every file fsync'ed, and the folder renamed
into place; only then is the pointer replaced (an atomic ``os.replace`` of a fsync'ed file).
A crash at any moment leaves the previous pointers and the folders they name intact. Folders
no pointer names are deleted after each save.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import safetensors.torch
import torch
from safetensors import SafetensorError

__all__ = [
    "CheckpointError",
    "CONFIG",
    "HISTORY",
    "POINTERS",
    "atomic_write",
    "write_json",
    "read_json",
    "save_checkpoint",
    "pointer",
    "load_weights",
    "load_trainer_state",
    "has_checkpoint",
]

CONFIG = "config.json"
HISTORY = "history.json"
CHECKPOINTS = "checkpoints"
WEIGHTS = "model.safetensors"
STATE = "trainer.pt"
POINTERS = ("last", "best")


class CheckpointError(RuntimeError):
    """A missing, unreadable or incompatible run/checkpoint; the message is one line."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` via ``write(file)`` into a temporary file beside it, fsync, then ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        _write_file(Path(tmp), write)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent} has no {path.name} ({what})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path} ({what}): {e}") from None


def _write_weights(f: IO[bytes], state: Mapping[str, torch.Tensor], step: int) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    f.write(safetensors.torch.save(tensors, metadata={"format": "impflow", "step": str(step)}))


def _write_state(f: IO[bytes], state: Mapping[str, Any]) -> None:
    torch.save(dict(state), f)


def save_checkpoint(
    run: str | Path,
    step: int,
    weights: Mapping[str, torch.Tensor],
    trainer_state: Mapping[str, Any],
    tags: Iterable[str] = ("last",),
    info: Mapping[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` and point ``tags`` (``last``/``best``) at it; returns its folder.

    ``info`` is copied into the pointer files (e.g. the validation NLL).
    """
    run = Path(run)
    root = run / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    referenced = _referenced(run)
    if final.name in referenced:
        raise CheckpointError(f"checkpoint {final} already exists and is in use")
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        _write_file(tmp / WEIGHTS, lambda f: _write_weights(f, weights, step))
        _write_file(tmp / STATE, lambda f: _write_state(f, trainer_state))
        _fsync_dir(tmp)
        if final.exists():  # left by a save that crashed before its pointer was written
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    for tag in tags:
        write_json(run / f"{tag}.json", {"step": step, "path": f"{CHECKPOINTS}/{final.name}", **(info or {})})
    _collect_garbage(run)
    return final


def _referenced(run: Path) -> set[str]:
    names = set()
    for tag in POINTERS:
        try:
            names.add(Path(json.loads((run / f"{tag}.json").read_text())["path"]).name)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return names


def _collect_garbage(run: Path) -> None:
    """Delete checkpoint folders (and leftovers of crashed saves) that no pointer names."""
    keep = _referenced(run)
    for entry in (run / CHECKPOINTS).iterdir():
        if entry.name not in keep and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def has_checkpoint(run: str | Path) -> bool:
    """Whether ``run`` holds a ``last`` checkpoint pointer."""
    return (Path(run) / "last.json").is_file()


def pointer(run: str | Path, which: str = "best") -> dict[str, Any]:
    """The pointer ``which`` (``best`` or ``last``) of ``run``, with ``dir`` the checkpoint folder."""
    run = Path(run)
    if which not in POINTERS:
        raise CheckpointError(f"unknown checkpoint {which!r}; valid: {', '.join(POINTERS)}")
    if not run.is_dir():
        raise CheckpointError(f"run directory {run} does not exist")
    if not (run / f"{which}.json").is_file():
        hint = ""
        if which == "best" and (run / "last.json").is_file():  # stopped before its first evaluation
            hint = "; no evaluation has finished (--which last loads the last checkpoint)"
        raise CheckpointError(f"{run} has no {which} checkpoint yet{hint}")
    ptr = read_json(run / f"{which}.json", f"the {which} checkpoint pointer")
    if not isinstance(ptr, dict) or "path" not in ptr:
        raise CheckpointError(f"{run / (which + '.json')} is not a checkpoint pointer")
    return ptr | {"dir": run / ptr["path"]}


def load_weights(run: str | Path, which: str = "best", device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The model state dict of checkpoint ``which`` of ``run``."""
    path = pointer(run, which)["dir"] / WEIGHTS
    try:
        return safetensors.torch.load_file(path, device=str(device))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot read weights {path}: {e}") from None


def load_trainer_state(run: str | Path, which: str = "last") -> dict[str, Any]:
    """The trainer state (optimiser, scheduler, RNGs, step, history) of checkpoint ``which``."""
    path = pointer(run, which)["dir"] / STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"cannot read trainer state {path}: {str(e).splitlines()[0]}") from None
