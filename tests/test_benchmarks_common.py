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
