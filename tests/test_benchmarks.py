"""The benchmark scripts run in smoke mode and write their result files with the numbers they claim."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script, out, *extra):
    env = {**os.environ, "PYTHONPATH": str(BENCH)}
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--smoke", "--out", str(out), "--threads", "1", *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_pruning_cost_smoke(tmp_path):
    _run("pruning_cost.py", tmp_path)
    data = json.loads((tmp_path / "pruning_cost_smoke.json").read_text())
    plain = data["train_step"]["plain"]["median_ms"]
    assert data["hook_fraction_of_step"] == pytest.approx(data["hook_only"]["median_ms"] / plain)
    assert {r["criterion"] for r in data["pruning_step"]} == {"l2", "fpgm"}
    for row in data["pruning_step"]:
        assert row["fraction_of_epoch"] == pytest.approx(row["step_ms"] / data["epoch_ms_estimate"])
    md = (tmp_path / "pruning_cost_smoke.md").read_text()
    assert data["machine"]["torch"] in md and "| pruning step (fpgm) |" in md


def test_speedup_smoke(tmp_path):
    _run("speedup.py", tmp_path)
    data = json.loads((tmp_path / "speedup_smoke.json").read_text())
    assert set(data["runs"]) == {"stock", "tuned"}
    for run in data["runs"].values():
        assert [r["residual"] for r in run["rows"]] == ["independent", "coupled"]
        for r in run["rows"]:
            t = r["timing"]
            best = (
                t[t["best"]["dense"]]["dense"]["median_ms"] / t[t["best"]["compact"]]["compact"]["median_ms"]
            )
            assert r["speedup"] == pytest.approx(best)
            assert (
                r["macs_ratio"] == pytest.approx(r["dense"]["macs"] / r["compact"]["macs"])
                and r["macs_ratio"] > 2
            )
    assert "| tuned | coupled |" in (tmp_path / "speedup_smoke.md").read_text()


def test_vs_torch_pruning_smoke(tmp_path):
    pytest.importorskip("torch_pruning")
    _run("vs_torch_pruning.py", tmp_path)
    data = json.loads((tmp_path / "vs_torch_pruning_smoke.json").read_text())
    (row,) = data["rows"]
    s, t = row["softprune"], row["torch_pruning"]
    assert s["exact"] is True
    assert s["total"] == pytest.approx(s["analyze"] + s["step"] + s["compact"])
    assert row["ratio"] == pytest.approx(t["total"] / s["total"])
    assert 0 < s["params"] < 11.7e6 and 0 < t["params"] < 11.7e6  # both halved resnet18's channels


def test_zoo_smoke(tmp_path):
    out = tmp_path / "zoo.md"
    env = {**os.environ, "PYTHONPATH": str(BENCH)}
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "zoo.py"),
            "--smoke",
            "--out",
            str(out),
            "--json",
            str(tmp_path / "zoo.json"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "zoo.json").read_text())["rows"]
    assert len(rows) == 6 and all(r["ok"] for r in rows)
    for r in rows:
        assert r["params_compact"] < r["params"] and r["macs_compact"] < r["macs"]
    assert "**6 of 6 runs pass** (3 models)" in out.read_text()
