"""Data-parallel training (2 CPU processes, gloo): equal to one process on the same global batch,
identical state on every rank, rank-0 checkpoints, exact resumption, ``impflow train --devices``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from impflow import checkpoint
from impflow.config import RunConfig
from impflow.train import Trainer

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

CONFIG = dict(
    model="impflow", blocks=1, hidden=[8], dtype="float64", train_size=256, batch_size=64, steps=10,
    eval_every=5, log_every=5, eval_size=64, device="cpu", quiet=True, lr=5e-3, schedule="constant",
)  # a constant schedule, so that a run to step 7 resumed to 10 equals one run to 10

WORKER = textwrap.dedent(
    """
    import gc, json, os, sys, torch
    from impflow import distributed
    from impflow.config import RunConfig
    from impflow.train import Trainer

    out, dump, config = sys.argv[1], sys.argv[2], RunConfig.from_dict(json.loads(sys.argv[3]))
    trainer = Trainer(config, out)
    assert trainer.world == 2 and trainer.rank == int(os.environ["RANK"])
    x = torch.arange(config.batch_size, dtype=torch.float64)
    assert trainer._shard(x).tolist() == x.chunk(2)[trainer.rank].tolist()  # each rank its own half
    result = trainer.fit()
    assert result.status == "done", result.message
    state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    torch.save({"state": state, "history": trainer.history}, f"{dump}/rank{trainer.rank}.pt")
    distributed.shutdown()
    # no DDP wrapper outlives shutdown(), not even with the trainer alive: one left to interpreter
    # exit took the gloo threads down with it and aborted the process (~15% of runs)
    assert not any(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())
    """
)


def _env() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _torchrun(*args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _impflow(*args: str, tmp: Path | None = None) -> subprocess.CompletedProcess:
    env = _env() | ({"TMPDIR": str(tmp)} if tmp else {})
    done = subprocess.run([sys.executable, "-m", "impflow", *args], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run trained by one process and by two (torchrun), with every rank's final state."""
    root = tmp_path_factory.mktemp("ddp")
    script = root / "worker.py"
    script.write_text(WORKER)
    (root / "dump").mkdir()
    _torchrun(str(script), str(root / "ddp"), str(root / "dump"), json.dumps(CONFIG))
    single = Trainer(RunConfig.from_dict(CONFIG), root / "single")
    assert single.fit().status == "done"
    ranks = [torch.load(root / "dump" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return root, single, ranks


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    _, single, ranks = runs
    # exact math is the same (the global mean loss; DDP averages the per-rank means' gradients);
    # only the summation order of the gradient differs, ~1e-16 relative per step in float64
    expected = single.model.state_dict()
    for key, value in ranks[0]["state"].items():
        torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-9, msg=key)
    ddp_losses = [r["loss"] for r in ranks[0]["history"]]
    single_losses = [r["loss"] for r in single.history]
    assert ddp_losses == pytest.approx(single_losses, rel=1e-9)
    ddp_val = [r["val_nll"] for r in ranks[0]["history"] if "val_nll" in r]
    assert ddp_val == pytest.approx([r["val_nll"] for r in single.history if "val_nll" in r], rel=1e-9)


def test_every_rank_holds_the_checkpoint_rank_0_wrote(runs):
    root, _, ranks = runs
    saved = checkpoint.load_weights(root / "ddp", "last")
    assert checkpoint.pointer(root / "ddp", "last")["step"] == CONFIG["steps"]
    assert any(k.endswith(".u") for k in saved)  # spectral-norm vectors are part of the state
    for r, rank in enumerate(ranks):
        assert rank["state"].keys() == saved.keys()
        for key, value in rank["state"].items():
            assert torch.equal(value, saved[key]), (r, key)  # parameters and buffers, bit for bit
    timeless = [[{k: v for k, v in r.items() if k != "seconds"} for r in rank["history"]] for rank in ranks]
    assert timeless[0] == timeless[1]  # the same records (losses all-reduced) on every rank
    history = json.loads((root / "ddp" / "history.json").read_text())
    assert [r["step"] for r in history] == [5, 10]


def _flags(config: dict) -> list[str]:
    out = []
    for key, value in config.items():
        flag = "--" + key.replace("_", "-")
        out += [flag] if value is True else [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return out


def test_devices_flag_trains_and_resumes_exactly(runs):
    root, _, ranks = runs
    flags = _flags({k: v for k, v in CONFIG.items() if k != "steps"})
    tmp = root / "tmp"
    tmp.mkdir()
    straight = _impflow("train", "--devices", "2", "--out", str(root / "cli"), "--steps", "10", *flags, tmp=tmp)
    assert straight.stdout.count("trained") == 1  # rank 0 reports alone
    assert not any(tmp.iterdir())  # the launcher's rendezvous folder is removed
    _impflow("train", "--devices", "2", "--out", str(root / "split"), "--steps", "7", *flags)
    _impflow("train", "--devices", "2", "--out", str(root / "split"), "--resume", "--steps", "10")
    cli = checkpoint.load_weights(root / "cli", "last")
    for key, value in ranks[0]["state"].items():
        assert torch.equal(cli[key], value), key  # --devices 2 == torchrun --nproc_per_node 2
    assert checkpoint.pointer(root / "split", "last")["step"] == 10
    resumed = checkpoint.load_weights(root / "split", "last")
    for key, value in cli.items():
        assert torch.equal(resumed[key], value), key


def test_batch_must_split_evenly(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "impflow", "train", "--devices", "2", "--out", str(tmp_path / "x"), "--batch-size", "5",
         "--steps", "1", "--device", "cpu", "--quiet"],
        capture_output=True, text=True, timeout=60, env=_env(),
    )
    assert done.returncode == 2 and "not divisible" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "task_flags",
    [
        ["--task", "classify", "--data", "digits", "--model", "impflow", "--width", "4", "--blocks", "1"],
        ["--data", "digits", "--model", "glow", "--layout", "image", "--blocks", "1", "--hidden", "4"],
    ],
    ids=["classify", "image-density"],
)
def test_devices_2_matches_one_process_for_classify_and_image_runs(tmp_path, task_flags):
    """The Trainer's task hooks (loss, batches with labels, evaluation) under DDP: 2 ranks equal 1."""
    flags = [*task_flags, "--steps", "4", "--batch-size", "16", "--eval-every", "2", "--eval-size", "32",
             "--dtype", "float64", "--lr", "0.01", "--device", "cpu", "--quiet"]
    _impflow("train", "--out", str(tmp_path / "one"), *flags)
    _impflow("train", "--devices", "2", "--out", str(tmp_path / "two"), *flags)
    one, two = (checkpoint.load_weights(tmp_path / r, "last") for r in ("one", "two"))
    # parameters and every buffer but the spectral-norm vectors: a small conv's top singular value
    # can be (nearly) degenerate, so u, v from the exact SVD sync may point anywhere in its subspace
    checked = [k for k in one if not k.endswith((".u", ".v"))]
    assert any(k.endswith(".weight") for k in checked)
    for key in checked:
        torch.testing.assert_close(two[key], one[key], rtol=1e-6, atol=1e-9, msg=key)
    histories = [json.loads((tmp_path / r / "history.json").read_text()) for r in ("one", "two")]
    metric = "val_error" if "classify" in task_flags else "val_nll"
    assert [r[metric] for r in histories[1]] == pytest.approx([r[metric] for r in histories[0]], rel=1e-9)
