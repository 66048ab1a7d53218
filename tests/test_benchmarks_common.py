"""The benchmark scripts' shared result plumbing (``benchmarks/common.py``)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import common  # noqa: E402


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    return tmp_path


def test_publish_writes_json_and_markdown(results, capsys):
    common.publish("b", {"x": 1}, "# B\n\n| a |\n")
    assert json.loads((results / "b.json").read_text()) == {"x": 1}
    assert (results / "b.md").read_text() == "# B\n\n| a |\n"
    assert "| a |" in capsys.readouterr().out


def test_publish_keeps_hand_written_observations(results, capsys):
    notes = "## Observations (written by hand after the runs)\n\n- ImpFlow ahead on 3/5 seeds.\n"
    (results / "b.md").write_text("# B\n\nold table\n\n" + notes)
    common.publish("b", {}, "# B\n\nnew table\n")
    text = (results / "b.md").read_text()
    assert text == "# B\n\nnew table\n\n" + notes  # the table replaced, the notes kept once
    assert "check them against the numbers" in capsys.readouterr().out
    common.publish("b", {}, "# B\n\nnewer table\n")  # a second rewrite does not duplicate them
    assert (results / "b.md").read_text() == "# B\n\nnewer table\n\n" + notes


def test_publish_without_save_writes_nothing(results):
    common.publish("b", {}, "# B\n", save=False)
    assert not list(results.iterdir())


def test_machine_names_cpu_and_kernel_level(monkeypatch):
    import torch

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    m = common.machine()
    assert m["onednn_max_cpu_isa"] == "AVX2"
    assert isinstance(m["cpu"], str) and m["cpu"]
    assert m["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert m["threads"] == torch.get_num_threads()


A = {"torch": "2.13.0+cpu", "threads": 1, "cpu": "AMD EPYC", "cpu_capability": "AVX512", "date": "2026-12-07 07:00"}
B = dict(A, cpu="x86_64", cpu_capability="AVX2", date="2026-11-23 15:00")


def part(results, stem, machine, runs):
    (results / f"{stem}.json").write_text(json.dumps({"settings": {"steps": 5}, "machine": machine, "runs": runs}))


def test_load_parts_tags_runs_with_their_machine(results):
    part(results, "p0", A, [{"model": "impflow", "seed": 0}])
    part(results, "p1", B, [{"model": "resflow", "seed": 0}, {"model": "resflow", "seed": 1, "machine": A}])
    _, runs = common.load_parts(["p0", "p1"], ("steps",), ("model", "seed"))
    assert [r["machine"]["cpu"] for r in runs] == ["AMD EPYC", "x86_64", "AMD EPYC"]  # a merged file's own record wins


def test_machines_note_only_for_several_machines():
    assert common.same_machine(A, dict(A, date="later"))  # dates aside
    assert not common.same_machine(A, dict(A, onednn_max_cpu_isa="AVX2"))
    assert common.machines_note([{"machine": A}, {"machine": dict(A, date="later")}, {}]) is None
    note = common.machines_note([{"machine": A}, {"machine": B}, {"machine": A}])
    assert note.startswith("The merged runs come from 2 machines") and "AVX512" in note and "AVX2" in note


def test_digits_time_ratios_pair_runs_of_one_machine():
    import digits

    runs = [
        {"model": "impflow", "seed": 0, "train_time_s": 30.0, "machine": A},
        {"model": "resflow", "seed": 0, "train_time_s": 10.0, "machine": dict(A, date="x")},
        {"model": "impflow", "seed": 1, "train_time_s": 60.0, "machine": B},  # its ResFlow ran elsewhere
        {"model": "resflow", "seed": 1, "train_time_s": 10.0, "machine": A},
        {"model": "impflow", "seed": 2, "train_time_s": 20.0},  # one process: no records, one machine
        {"model": "resflow", "seed": 2, "train_time_s": 10.0},
        {"model": "impflow", "seed": 3, "train_time_s": 20.0},  # unpaired
    ]
    assert digits.time_ratios(runs) == {0: 3.0, 2: 2.0}


def test_roulette_replay_refuses_a_decaying_schedule():
    """replay trains to --until, so a cosine schedule would decay to 0 there instead of at --steps."""
    import roulette

    for flag in ("--schedule", "--warmup"):
        with pytest.raises(SystemExit):
            roulette.parse(["replay", "--model", "impflow", "--until", "6", "--", "--variance-margin", "none",
                            flag, "cosine" if flag == "--schedule" else "5"])


def test_roulette_replay_resumes_bit_for_bit(results, tmp_path, monkeypatch):
    """benchmarks/roulette.py: a checkpointed replay continued by ``resume`` takes the same steps
    (losses and gradient norms) as the uninterrupted replay, and ``measure`` reads the checkpoint."""
    import roulette

    monkeypatch.setattr(roulette, "CHECKPOINTS", tmp_path / "ckpt")
    digits_args = ["--", "--steps", "100", "--eval-every", "3", "--hidden", "4", "--variance-margin", "none"]
    full = roulette.main(["replay", "--model", "impflow", "--seed", "1", "--until", "6", "--save-at", "4", *digits_args])
    ckpt = tmp_path / "ckpt" / "impflow_s1_4.pt"
    resumed = roulette.main(["resume", str(ckpt), "--until", "6"])
    tail = lambda run: [(r["step"], r["loss"], r["grad_norm"]) for r in run["run"]["steps"]]
    assert tail(resumed) == tail(full)[4:] and len(tail(resumed)) == 2
    assert resumed["run"]["curve"][-1] == full["run"]["curve"][-1]
    assert (results / "roulette_impflow_s1_from4.md").exists()
    m = roulette.main(["measure", str(ckpt), "--draws", "2", "--warmup", "0", "--variance-margin", "0.8"])
    assert m["run"]["variance_margin"] == 0.8 and len(m["run"]["relative_gradient_error"]) == 2
    assert {x["map"].rsplit(".", 1)[-1] for x in m["run"]["maps"]} == {"g_x", "g_z"}


@pytest.mark.parametrize("name", ["impflow", "resflow", "glow", "nsf"])
def test_digits_volume_splits_the_log_det_by_layer_kind(name):
    """benchmarks/digits.py ``per_image`` over ``impflow.transforms.recording``: per-kind log-dets that add up
    to log p(y) − log p_Z(z), computed here without hooks, and the kinds each model is made of."""
    import torch
    import digits

    torch.manual_seed(0)
    args = digits.parse(["--hidden", "4", "--flow-steps", "1"])
    model = digits.build(name, args, hidden=None if name in ("impflow", "resflow") else 4).double()
    y = torch.randn(7, *digits.SHAPE, dtype=torch.float64)
    x = digits.to_input(name, y)
    with torch.no_grad():  # ActNorms initialised from data, then every layer moved off its start
        model.log_prob(x)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with digits.recording([*digits.layers(model), model.transform]) as calls, torch.no_grad(), digits.exact_logdet():
        for i in range(0, len(y), 3):
            model.log_prob(digits.to_input(name, y[i : i + 3]))
    parts = digits.per_image(calls, model.transform, len(y), name)
    with torch.no_grad(), digits.exact_logdet():
        z, _ = model.transform(x)
        whole = (model.log_prob(x) - model.base.log_prob(z)).mean()
    assert sum(parts.values()) == pytest.approx(float(whole), rel=1e-9, abs=1e-9)
    expected = {"impflow": {"ActNorm", "ImplicitBlock", "Squeeze"}, "resflow": {"ActNorm", "ResidualBlock", "Squeeze"},
                "glow": {"ActNorm", "InvertibleConv1x1", "Coupling", "Squeeze", "Split"}, "nsf": {"Coupling", "LULinear"}}
    assert set(parts) == expected[name]
    assert all(abs(v) > 0 for k, v in parts.items() if k != "Squeeze")


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_digits_learning_rate_follows_the_schedule(schedule):
    """benchmarks/digits.py ``train``: every Adam step runs at --lr × impflow.train.lr_factor of its
    step (warm-up, then constant or cosine to 0 at --steps), and the settings line says which."""
    import digits
    import torch
    from impflow.train import lr_factor

    args = digits.parse(["--steps", "5", "--hidden", "4", "--schedule", schedule, "--warmup", "2", "--lr", "0.01"])
    data, pre, test = digits.prepare(args)
    torch.manual_seed(0)
    model = digits.build("resflow", args)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    seen = []
    digits.train(args, "resflow", model, opt, torch.Generator().manual_seed(0), data, pre, test,
                 after_step=lambda step: seen.append(opt.param_groups[0]["lr"]))
    expected = [0.01 * lr_factor(s, 2, 5, schedule) for s in range(5)]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert seen[:2] == pytest.approx([0.005, 0.01]) and (seen[-1] < 0.005) == (schedule == "cosine")
    text = digits.schedule_text(vars(args))
    assert text == (", cosine decay to 0 after 2 warm-up steps" if schedule == "cosine" else ", constant after 2 warm-up steps")
    assert digits.schedule_text({}) == ""  # older files: constant, no warm-up, the text they were written with
    with pytest.raises(SystemExit):
        digits.parse(["--warmup", "-1"])


@pytest.mark.parametrize("name", ["impflow", "resflow"])
def test_digits_estimator_flags_reach_every_block(name):
    """benchmarks/digits.py: --n-exact-terms and --variance-margin set the training estimator of
    every residual map (ImpFlow's g_x and g_z included); the settings line names both."""
    import digits
    from impflow import ResidualBlock

    args = digits.parse(["--hidden", "4", "--n-exact-terms", "5", "--variance-margin", "none"])
    blocks = [m for m in digits.build(name, args).modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == 12 and {(b.logdet.mode, b.logdet.n_exact_terms, b.logdet.variance_margin)
                                  for b in blocks} == {("neumann", 5, None)}
    assert digits.roulette_text(vars(args)) == "5 exact terms, geometric roulette, p = 0.5 fixed, no variance rule"
    assert digits.roulette_text({"variance_margin": 0.8}).startswith("2 exact terms")  # older files: the default
    for bad in ("0", "2.5", "x"):
        with pytest.raises(SystemExit):  # a usage error, not a traceback from the builder
            digits.parse(["--n-exact-terms", bad])


def test_digits_gaussian_baseline_counts_each_images_logit_jacobian():
    """benchmarks/digits.py ``baselines``: the best affine flow's bits/dim are the mean over images of
    −(log N(y_i; ML fit) + ladj_i − 64 ln 17)/(64 ln 2), each image with its own logit log-det (train:
    the training images' own), and the test s.e. is the std of that per-image figure over √n."""
    import math

    import digits
    import torch

    args = digits.parse([])
    data, pre, (test_y, test_ladj) = digits.prepare(args)
    base = digits.baselines(pre, data, test_y, test_ladj, gen_seed=3)
    x_tr = digits.dequantize(data.train_images, data.levels, torch.Generator().manual_seed(3))
    y_tr, train_ladj = pre(x_tr)
    y_tr, y_te = y_tr.double().flatten(1), test_y.double().flatten(1)
    mean = y_tr.mean(0)
    cov = (y_tr - mean).T @ (y_tr - mean) / len(y_tr)  # the ML covariance (full rank here: no floor)
    gauss = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
    scale, term = 64 * math.log(2), 64 * math.log(data.levels)
    per_test = (-gauss.log_prob(y_te) - test_ladj.double() + term) / scale
    per_train = (-gauss.log_prob(y_tr) - train_ladj.double() + term) / scale
    assert base["gaussian_test_bpd"] == pytest.approx(per_test.mean().item(), abs=1e-9)
    assert base["gaussian_test_bpd_se"] == pytest.approx(per_test.std().item() / math.sqrt(len(per_test)), rel=1e-6)
    assert base["gaussian_train_bpd"] == pytest.approx(per_train.mean().item(), abs=1e-9)
