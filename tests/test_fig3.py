"""fig3 (checkerboard, ResFlow-8 vs ImpFlow-4) in quick mode: files, table, reuse of finished runs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from impflow.checkpoint import CheckpointError
from impflow.cli import main
from impflow.experiments import EXPERIMENTS, fig3


def test_fig3_quick_writes_table_plot_and_runs(tmp_path, capsys):
    out = tmp_path / "fig3"
    assert main(["experiment", "fig3", "--quick", "--out", str(out)]) == 0
    capsys.readouterr()
    assert EXPERIMENTS["fig3"] is fig3.run
    for name in ("fig3.json", "fig3.md", "fig3.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    result = json.loads((out / "fig3.json").read_text())
    assert [r["model"] for r in result["rows"]] == ["resflow-8", "impflow-4"]
    assert {s["model"] for s in result["summary"]} == {"resflow-8", "impflow-4"}
    assert result["entropy_bits"] == pytest.approx(5.0)
    for r in result["rows"]:
        assert r["nll_bits"] == pytest.approx(r["nll"] / 0.6931471805599453)
        assert r["gap"] == pytest.approx(r["nll"] - result["entropy"])
        assert r["wall_seconds"] > 0 and not r["reused"]
        run = out / f"{r['model'].split('-')[0]}-seed0"
        assert (run / "config.json").is_file() and (run / "best.json").is_file()
        history = json.loads((run / "history.json").read_text())
        assert any("volume" in h for h in history)  # the Trainer's volume monitor ran
    # same networks: the parameter counts differ only by the ActNorms
    res, imp = result["rows"]
    assert abs(res["params"] - imp["params"]) == 4 * 2 * 2  # 9 vs 5 ActNorm(2) layers, 4 parameters each
    md = (out / "fig3.md").read_text()
    assert "resflow-8" in md and "impflow-4" in md and "5.00 bits" in md and "3.466" in md

    # a second call reuses the finished runs (no training) and reports the recorded wall time
    again = fig3.run(out, quick=True)
    assert all(r["reused"] for r in again["rows"])
    assert [r["wall_seconds"] for r in again["rows"]] == [r["wall_seconds"] for r in result["rows"]]
    assert [r["nll"] for r in again["rows"]] == pytest.approx([r["nll"] for r in result["rows"]])
    # other settings in the same folder are refused, not mixed
    with pytest.raises(CheckpointError, match="steps"):
        fig3.run(out, config=replace(fig3.QUICK, steps=fig3.QUICK.steps + 1))
