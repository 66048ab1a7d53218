"""The training loop: Adam with warm-up and cosine decay, gradient clipping, periodic evaluation
(validation NLL for density runs, classification error for classify runs), best-model tracking,
crash-safe checkpoints and exact resumption."""

from __future__ import annotations

import math
import random
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import HISTORY, CheckpointError, has_checkpoint, load_trainer_state, load_weights, pointer
from ..checkpoint import save_checkpoint, write_json
from .. import distributed
from ..config import RESUMABLE, ConfigError, RunConfig, model_kwargs
from ..logdet import exact_logdet
from .monitor import Progress, ProgressMode, SolverMonitor, VolumeMonitor, WarningCounter, summarize_solves
from ..nn.lipschitz import sync_spectral
from ..transforms.base import NonFiniteError
from .runs import EXACT_EVAL_MAX_DIM, build_model, data_spec, dataset, evaluate, evaluate_classifier, labelled
from .runs import draw_batch, load_model_state, read_run, refresh_spectral, resolve_device, saved_spec
from .runs import stream_seed, train_pool, write_config

__all__ = ["Trainer", "FitResult", "lr_factor"]


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Learning-rate multiplier at ``step`` (0-based): linear warm-up over ``warmup`` steps, then
    constant or a cosine decay reaching 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class FitResult:
    """How :meth:`Trainer.fit` ended: ``status`` ``"done"``, ``"interrupted"`` or ``"non-finite"``."""

    status: Literal["done", "interrupted", "non-finite"]
    step: int
    message: str
    best: dict[str, Any] | None


class _NonFinite(ArithmeticError):
    """Training must stop: ``str(self)`` says what went non-finite, ``when`` at which point."""

    def __init__(self, message: str, when: str) -> None:
        super().__init__(message)
        self.when = when


class _StopOnSigint:
    """While active (main thread only), a first Ctrl-C sets :attr:`requested` so training stops at the
    next step boundary with a checkpoint; a second one raises KeyboardInterrupt at once."""

    def __enter__(self) -> "_StopOnSigint":
        self.requested = False
        self._previous: Any = None
        self._installed = threading.current_thread() is threading.main_thread()
        if self._installed:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)


def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "python": random.getstate(),
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    random.setstate(state["python"])


SYNC_MAX_ENTRIES = 2**20
"""Spectral-norm layers whose dense operator has at most this many entries get the exact SVD
sync at scheduled evaluations (all dense layers of the vector flows; convolutions on small
images); larger convolutions keep their power-iteration estimates."""


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class Trainer:
    """Maximum-likelihood training of a :class:`~impflow.Flow` on a toy 2-D dataset, a tabular set
    (UCI or a ``.npy``/``.csv`` file) or dequantized images, as vectors or (C, H, W) (see
    :mod:`impflow.train.runs`); or, for ``config.task == "classify"``, cross-entropy training of a
    :func:`~impflow.models.classifier` on labelled images. The two differ only in the loss, the
    batches and the evaluation (:meth:`_loss`, :meth:`_batch`, :meth:`evaluate`); optimisation,
    checkpoints, resumption and data parallelism are shared.

    ``Trainer(config, out)`` starts a new run in directory ``out`` (which must not hold one),
    seeding torch, numpy and ``random`` with ``config.seed``; ``Trainer.resume(out)`` continues
    one exactly where its last checkpoint left it (RNG states included). Then :meth:`fit` trains
    to ``config.steps``.

    Logged per record (``history``): ``loss`` (the training objective averaged over the steps
    since the previous record - with a stochastic log-det estimator it is not the NLL), ``lr``,
    ``solver_iterations`` (mean forward root-solver iterations of the last step, where the
    model solves any), and at evaluations ``val_nll`` (exact log-det, nats), its standard error
    ``val_se`` and ``volume``: the per-block log-det mean/std and Lipschitz estimates of each
    residual/implicit block and its inverse on the first ``volume_points`` validation points
    (:class:`~impflow.train.monitor.VolumeMonitor`; drawn by ``impflow plot``), and at scheduled
    evaluations ``spectral_lag``: the largest σ/σ̂ found when the spectral-norm estimates were
    replaced by exact top singular pairs (:func:`sync_spectral`: every layer whose dense operator
    has at most :data:`SYNC_MAX_ENTRIES` entries; 1.0 = no drift).
    Above 64 dimensions ``val_nll`` uses the unbiased log-det estimator with seeded noise
    (:func:`~impflow.train.runs.evaluate`). Classify runs record instead ``val_loss``,
    ``val_error`` (the best checkpoint has the lowest, ties broken by the loss) and ``test_loss``,
    ``test_error`` (cross-entropy in nats, errors as fractions; the test set never selects).

    Args:
        config: the run's settings.
        out: the run directory.
        progress: ``"auto"`` (a bar on a terminal, else lines), ``"bar"``, ``"lines"`` or ``"none"``;
            ``config.quiet`` forces ``"none"``.
        volume_points: validation points the volume monitor uses at each evaluation (0: off). It
            draws no random numbers, so it does not change the training trajectory.
    """

    def __init__(
        self, config: RunConfig, out: str | Path, progress: ProgressMode = "auto", volume_points: int = 256
    ) -> None:
        out = Path(out)
        if has_checkpoint(out):
            step = pointer(out, "last")["step"]
            raise CheckpointError(
                f"{out} already holds a run (step {step}); resume it (--resume) or choose another output directory"
            )
        kwargs = model_kwargs(config)
        spec = data_spec(config)
        torch.manual_seed(config.seed)
        np.random.seed(config.seed % 2**32)
        random.seed(config.seed)
        self._setup(config, out, kwargs, spec, progress, volume_points)
        if self.rank:
            _seed_all(distributed.rank_seed(config.seed, self.rank))  # own estimator noise per rank
        else:
            out.mkdir(parents=True, exist_ok=True)
            write_config(out, config, kwargs, spec)
        distributed.barrier()

    @classmethod
    def resume(
        cls,
        out: str | Path,
        overrides: Mapping[str, Any] | None = None,
        progress: ProgressMode = "auto",
        volume_points: int = 256,
    ) -> "Trainer":
        """Continue the run in ``out`` from its last checkpoint; ``overrides`` may change only the
        settings in :data:`impflow.config.RESUMABLE` (e.g. ``steps``)."""
        out = Path(out)
        config, kwargs = read_run(out)
        given = config.replace(**(overrides or {}))  # normalised as the run's own (paths absolute)
        changed = {k: getattr(given, k) for k in overrides or {} if getattr(given, k) != getattr(config, k)}
        fixed = [k for k in changed if k not in RESUMABLE]
        if fixed:
            k = fixed[0]
            raise CheckpointError(
                f"{out} was trained with {k}={getattr(config, k)!r}; --resume cannot change it to {changed[k]!r} "
                f"(only {', '.join(RESUMABLE)} can change)"
            )
        config = config.replace(**changed)
        state = load_trainer_state(out, "last")
        self = cls.__new__(cls)
        spec = saved_spec(out)
        self._setup(config, out, kwargs, spec, progress, volume_points)
        load_model_state(self.model, load_weights(out, "last", self.device), str(pointer(out, "last")["dir"]))
        self._load_state(state)
        if changed and self.rank == 0:
            write_config(out, config, kwargs, spec)
        distributed.barrier()
        return self

    def _setup(
        self,
        config: RunConfig,
        out: Path,
        kwargs: dict[str, Any],
        spec: dict[str, Any],
        progress: ProgressMode,
        volume_points: int,
    ) -> None:
        self.config, self.out = config, out
        self.device = distributed.init(resolve_device(config.device))
        self.rank, self.world = distributed.rank(), distributed.world_size()
        if config.batch_size % self.world:
            raise ConfigError(f"batch_size {config.batch_size} is not divisible by the {self.world} processes")
        self.progress_mode: ProgressMode = "none" if config.quiet or self.rank else progress
        self.model = build_model(config, kwargs, spec).to(self.device)
        self.classify = config.task == "classify"
        self.metric = "val_error" if self.classify else "val_nll"  # lower is better
        # data parallel: the DDP wrapper computes the training loss; self.model stays the model.
        # It exists only inside fit(): a wrapper still alive at interpreter exit keeps the gloo
        # process group's threads alive past destroy_process_group, and the process aborted at
        # exit ("terminate called without an active exception") in ~15% of 2-rank runs.
        self._ddp: nn.Module | None = None
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, config.warmup, config.steps, config.schedule)
        )
        self._data_rng = torch.Generator().manual_seed(stream_seed(config.seed, "train"))
        self._train_set = train_pool(config)  # None: fresh toy samples every step
        if self.classify:
            x, labels = labelled(config, "val", config.eval_size)
            self._val, self._val_labels = x.to(self.device), labels
            x, labels = labelled(config, "test", 0)
            self._test, self._test_labels = x.to(self.device), labels
            volume_points = 0  # a classifier has no log-dets to monitor
        else:
            self._val = dataset(config, "val", config.eval_size).to(self.device)
            if math.prod(spec["shape"]) > EXACT_EVAL_MAX_DIM:
                volume_points = 0  # exact per-block log-dets would dominate the run
        self._monitor = SolverMonitor(self.model)
        self._volume = VolumeMonitor(self.model, self._val[:volume_points]) if volume_points > 0 else None
        self.warnings = WarningCounter()
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.train_seconds = 0.0
        self._pending: list[float] = []  # losses since the last history record
        self._last_solves: dict[str, Any] = {"solves": 0}
        self._saved_step = -1
        self._synced_warnings = 0  # convergence warnings already summed over the ranks

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything besides the weights that an exact resumption needs (with several processes,
        a collective: every rank's RNG states are gathered under ``rank_rng``)."""
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(self.device),
            "data_rng": self._data_rng.get_state(),
            "history": self.history,
            "best": self.best,
            "train_seconds": self.train_seconds,
            "pending_losses": self._pending,
            "convergence_warnings": self.warnings.count,
        }
        if self.world > 1:
            state["rank_rng"] = distributed.all_gather_object(_rng_state(self.device))
        return state

    def _load_state(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ranks = state.get("rank_rng")
        if self.world > 1 and ranks is not None and len(ranks) == self.world:
            _set_rng_state(ranks[self.rank])
        else:
            _set_rng_state(state["rng"])
            if self.rank:  # a different process count than the checkpoint's: fresh per-rank noise
                _seed_all(distributed.rank_seed(self.config.seed + state["step"], self.rank))
        self._data_rng.set_state(state["data_rng"])
        self.step = self._saved_step = state["step"]
        self.history = list(state["history"])
        self.best = state["best"]
        self.train_seconds = state["train_seconds"]
        self._pending = list(state["pending_losses"])
        self.warnings = WarningCounter(state["convergence_warnings"])
        self._synced_warnings = self.warnings.count

    def save(self, best: bool = False) -> None:
        """Checkpoint the current step as ``last`` (and ``best``); a step is written once. With
        several processes every rank calls it; rank 0 writes, the others wait on a barrier."""
        if self._saved_step == self.step:
            return
        refresh_spectral(self.model)  # on every rank: it refines u, v, which later steps use
        distributed.broadcast_buffers(self.model)
        latest = next((r[self.metric] for r in reversed(self.history) if self.metric in r), None)
        info = {self.metric: latest, "train_seconds": self.train_seconds}
        tags = ("last", "best") if best else ("last",)
        state = self.state_dict()
        if self.rank == 0:
            save_checkpoint(self.out, self.step, self.model.state_dict(), state, tags, info)
            write_json(self.out / HISTORY, self.history)
        distributed.barrier()
        self._saved_step = self.step

    # ------------------------------------------------------------------ training

    def _batch(self) -> Any:
        """The next global batch (CPU): x, or (x, labels) for classify runs. With several
        processes every rank draws the same one from the shared data stream and trains on its own
        contiguous slice (:meth:`_shard`)."""
        return draw_batch(self.config, self._train_set, self.config.batch_size, self._data_rng)

    def _shard(self, x: Any) -> Any:
        """This rank's slice of global batch ``x`` (all of it single-process), on the device; a
        tuple (x, labels) is sliced alike."""
        if isinstance(x, tuple):
            return tuple(self._shard(part) for part in x)
        if self.world > 1:
            per_rank = x.shape[0] // self.world
            x = x[self.rank * per_rank : (self.rank + 1) * per_rank]
        return x.to(self.device)

    def _loss(self, module: nn.Module, batch: Any) -> Tensor:
        """Per-example training loss of ``module`` (the model or its DDP wrapper, whose forward is
        the flow's ``log_prob`` or the classifier's logits): −log p(x), or the cross-entropy."""
        if self.classify:
            x, labels = batch
            return F.cross_entropy(module(x), labels, reduction="none")
        return -module(batch)

    def _data_init(self, x: Tensor) -> None:
        """Data-parallel only: run the data-dependent initialisations (ActNorm) still pending on
        the whole global batch ``x``, as one process would in its first step, so every rank starts
        from the same values (on its own shard each would initialise differently)."""
        if not any(isinstance(b, Tensor) and not bool(b) for m in self.model.modules()
                   for name, b in m.named_buffers(recurse=False) if name == "initialized"):
            return
        # with grad enabled, as in a training step: the no-grad path of a root solve differs in
        # the last bits, and Adam's first steps on ActNorm's parameters (which sit at a stationary
        # point of the loss after this init) amplify that to ~1e-8. exact_logdet: no RNG draws.
        with torch.enable_grad(), exact_logdet():
            self.model.log_prob(x.to(self.device))

    def _train_step(self) -> float:
        batch = self._batch()
        if self._ddp is not None and not self.classify:
            self._data_init(batch)
        batch = self._shard(batch)
        self._monitor.reset()
        why = None
        try:
            # under DDP the gradients of the per-rank means average to the gradient of the global mean
            loss = self._loss(self.model if self._ddp is None else self._ddp, batch).mean()
            value = loss.item()
        except NonFiniteError as e:  # the loaders return finite data only: a layer's output blew up
            value, why = math.nan, f"a layer produced non-finite values ({e})"
        if self._ddp is not None:
            value = distributed.all_reduce(value, self.device)  # every rank sees the same, and stops alike
        if not math.isfinite(value):
            if self._ddp is not None:  # say what happened on whichever rank it happened
                why = next((w for w in distributed.all_gather_object(why) if w), None)
            raise _NonFinite(why or f"the training loss is {value}", f"step {self.step + 1}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip or math.inf)
        if not torch.isfinite(norm):
            raise _NonFinite(f"the gradient norm is {norm.item()}", f"step {self.step + 1}")
        self.optimizer.step()
        self.scheduler.step()
        # the weights are equal on every rank, so are the u, v refined from them; make it certain
        distributed.broadcast_buffers(self.model)
        self.step += 1
        self._last_solves = summarize_solves(self._monitor.collect())
        return value

    def evaluate(self) -> dict[str, Any]:
        """The record fields of an evaluation, ``self.metric`` among them, and ``solver``:
        density runs ``val_nll`` (nats; exact log-det up to 64 dimensions, else one seeded pass of
        the unbiased estimator) and its standard error ``val_se``; classify runs ``val_loss``,
        ``val_error``, ``test_loss``, ``test_error``."""
        if self.classify:
            val = evaluate_classifier(self.model, self._val, self._val_labels)
            test = evaluate_classifier(self.model, self._test, self._test_labels)
            solver = val["solver"] | {
                "convergence_warnings": val["solver"]["convergence_warnings"] + test["solver"]["convergence_warnings"]
            }
            return {"val_loss": val["loss"], "val_error": val["error"], "test_loss": test["loss"],
                    "test_error": test["error"], "solver": solver}
        result = evaluate(self.model, self._val, seed=stream_seed(self.config.seed, "eval"))
        return {"val_nll": result["nll"], "val_se": result["nll_se"], "solver": result["solver"]}

    def _better(self, record: Mapping[str, Any]) -> bool:
        """Whether evaluation ``record`` beats the best so far (classify: error, then loss)."""
        value = record[self.metric]
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        if self.classify:
            return (value, record["val_loss"]) < (self.best[self.metric], self.best["val_loss"])
        return value < self.best[self.metric]

    def _record(self, evaluate_now: bool) -> None:
        record: dict[str, Any] = {
            "step": self.step,
            "loss": fmean(self._pending),
            "lr": self.scheduler.get_last_lr()[0],
            "seconds": self.train_seconds,  # in training steps; evaluations and checkpoints excluded
        }
        if self._last_solves["solves"]:
            iterations = self._last_solves["mean_iterations"]
            record["solver_iterations"] = (
                iterations if self.world == 1 else distributed.all_reduce(iterations, self.device)
            )
        if self.world > 1:  # the training steps' convergence warnings of all ranks
            new = distributed.all_reduce(self.warnings.count - self._synced_warnings, self.device, "sum")
            self.warnings.count = self._synced_warnings + int(new)
        is_best = False
        if evaluate_now and self.step % self.config.eval_every == 0:
            # the Lipschitz check: exact top singular pairs replace the power-iteration
            # estimates (on the eval schedule only, so a resumed run syncs at the same steps)
            record["spectral_lag"] = sync_spectral(self.model, max_entries=SYNC_MAX_ENTRIES)
            distributed.broadcast_buffers(self.model)
        if evaluate_now:
            # every rank evaluates the whole validation set (the same deterministic computation,
            # which refines the spectral vectors the same way on each), so all keep equal state
            try:
                result = self.evaluate()
            except NonFiniteError as e:  # the validation data is finite: the model is not
                raise _NonFinite(f"a layer produced non-finite values ({e})", f"the evaluation after step {self.step}") from None
            bad = [k for k in (self.metric, "val_loss") if k in result and not math.isfinite(result[k])]
            if bad:  # never checkpoint a model that cannot score the validation data
                raise _NonFinite(f"the validation {bad[0].removeprefix('val_')} is {result[bad[0]]}",
                                 f"the evaluation after step {self.step}")
            solver = result.pop("solver")
            record |= result
            self.warnings.count += solver["convergence_warnings"]
            is_best = self._better(result)
            if is_best:
                self.best = {"step": self.step, self.metric: result[self.metric]}
                if self.classify:
                    self.best["val_loss"] = result["val_loss"]
            if self._volume is not None:
                record["volume"] = self._volume()
        self._synced_warnings = self.warnings.count
        self.history.append(record)
        self._pending = []
        if evaluate_now:
            self.save(best=is_best)

    def _display(self) -> dict[str, str]:
        shown = {"loss": f"{self._pending[-1] if self._pending else self.history[-1]['loss']:.4f}"}
        val = next((r[self.metric] for r in reversed(self.history) if self.metric in r), None)
        if val is not None:
            shown[self.metric] = f"{val:.4f}"
        if self._last_solves["solves"]:
            shown["iters"] = f"{self._last_solves['mean_iterations']:.1f}"
        if self.warnings.count:
            shown["solver_warnings"] = str(self.warnings.count)
        return shown

    def fit(self, until: int | None = None) -> FitResult:
        """Train to step ``until`` (default ``config.steps``), evaluating and checkpointing every
        ``eval_every`` steps and at the end.

        A non-finite loss or gradient stops training (the last good checkpoint is kept); Ctrl-C
        stops at the end of the current step with a checkpoint (a second Ctrl-C aborts at once).
        """
        until = self.config.steps if until is None else until
        progress = Progress(self.progress_mode, until, self.step)
        cfg = self.config
        self._ddp = distributed.wrap(self.model, self.device) if self.world > 1 else None
        try:
            with _StopOnSigint() as sigint:
                while self.step < until:
                    if self._stop_requested(sigint.requested):
                        self.save()
                        return self._result("interrupted", f"interrupted at step {self.step}; checkpoint saved in "
                                            f"{self.out} (continue with: impflow train --out {self.out} --resume)")
                    start = time.perf_counter()
                    with self.warnings.catch():
                        self._pending.append(self._train_step())
                    self.train_seconds += time.perf_counter() - start
                    evaluate_now = self.step % cfg.eval_every == 0 or self.step == until
                    record = evaluate_now or self.step % cfg.log_every == 0
                    if record:
                        self._record(evaluate_now)
                    progress.update(self.step, self._display(), record)
        except _NonFinite as e:
            kept = (
                f"kept the last good checkpoint (step {self._saved_step})"
                if self._saved_step >= 0
                else "no checkpoint was written yet"
            )
            return self._result("non-finite", f"training stopped at {e.when}: {e}; {kept} in {self.out}")
        except KeyboardInterrupt:
            kept = f"the last checkpoint (step {self._saved_step})" if self._saved_step >= 0 else "nothing"
            return self._result("interrupted", f"aborted at step {self.step} without saving; {self.out} keeps {kept}")
        finally:
            self._ddp = None
            progress.close()
        self.save()
        if self.best is None:
            best = ""
        elif self.classify:
            best = f"; best val error {self.best['val_error']:.2%} at step {self.best['step']}"
        else:
            best = f"; best val NLL {self.best['val_nll']:.4f} nats at step {self.best['step']}"
        return self._result("done", f"trained {self.out} to step {self.step} in {self.train_seconds:.0f} s{best}")

    def _stop_requested(self, requested: bool) -> bool:
        """Whether any rank got Ctrl-C (so that all stop at the same step)."""
        if self.world == 1:
            return requested
        return distributed.all_reduce(float(requested), self.device, "max") > 0

    def _result(self, status: str, message: str) -> FitResult:
        if self.warnings.count:
            last = f"; last: {self.warnings.last}" if self.warnings.last else ""
            message += f" ({self.warnings.count} root-solver convergence warnings{last})"
        return FitResult(status, self.step, message, self.best)
