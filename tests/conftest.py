import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def jacobian_logdet(fn, x):
    """Brute-force log|det| of the per-sample Jacobian of fn at each row of x (float64)."""
    out = []
    for xi in x:
        J = torch.autograd.functional.jacobian(lambda v: fn(v.unsqueeze(0))[0].reshape(-1), xi)
        J = J.reshape(J.shape[0], -1)
        out.append(torch.linalg.slogdet(J)[1])
    return torch.stack(out)


def assert_resumes_exactly(config, root, until: int, compare_after: int) -> None:
    """Training straight through equals training to ``until``, stopping and resuming: same weights, and the
    same logged losses after step ``compare_after`` (the log window that straddles ``until`` averages fewer
    steps in the resumed run)."""
    from impflow.train import Trainer

    straight = Trainer(config, root / "straight")
    assert straight.fit().status == "done"
    first = Trainer(config, root / "split")
    assert first.fit(until=until).status == "done"
    del first
    torch.manual_seed(1234)  # the resumed run must not depend on the global RNG
    resumed = Trainer.resume(root / "split")
    assert resumed.fit().status == "done"
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    later = lambda trainer: [r["loss"] for r in trainer.history if r["step"] > compare_after]
    assert later(straight) == later(resumed) and later(straight)


@pytest.fixture
def no_plots(monkeypatch):
    """Skip the end-of-training plots (slow matplotlib rendering) where a test is not about them."""
    from impflow import cli

    monkeypatch.setattr(cli, "plot_run", lambda *args, **kwargs: {})


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``impflow ARGV`` in-process: (exit code, stdout, stderr)."""
    from impflow.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def eval_json(capsys, *argv) -> dict:
    """The JSON that ``impflow eval ARGV --device cpu`` prints (asserting it succeeded)."""
    import json

    code, out, err = run_cli(capsys, "eval", *argv, "--device", "cpu")
    assert code == 0, err
    return json.loads(out)
