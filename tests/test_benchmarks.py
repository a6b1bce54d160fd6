"""The benchmark scripts run in smoke mode and write their result files with the numbers they claim."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # trains, or runs scripts and subprocesses: make test-fast leaves it out

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(script, *args, timeout=600):
    """Run benchmarks/SCRIPT with ARGS; it must succeed."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _run(script, out, *extra):
    return _script(script, "--smoke", "--out", str(out), "--threads", "1", *extra)


def test_overhead_smoke(tmp_path):
    _run("overhead.py", tmp_path)
    data = json.loads((tmp_path / "overhead_smoke.json").read_text())
    presets = ("hfp", "sfp", "asfp", "srfp", "asrfp", "ghfp", "ghfp-masks-only")
    assert set(data["preset_ratios"]) == set(presets)
    for method in presets:
        ratio = data["train_step"][method]["median_ms"] / data["train_step"]["plain"]["median_ms"]
        assert data["preset_ratios"][method] == pytest.approx(ratio)
    plain = data["train_step"]["plain"]["median_ms"]
    assert data["hook_fraction_of_step"] == pytest.approx(data["hook_only"]["median_ms"] / plain)
    assert {r["criterion"] for r in data["pruning_step"]} == {"l2", "fpgm"}
    for row in data["pruning_step"]:
        assert row["fraction_of_epoch"] == pytest.approx(row["step_ms"] / data["epoch_ms_estimate"])
    md = (tmp_path / "overhead_smoke.md").read_text()
    assert (
        data["machine"]["torch"] in md
        and "| pruning step (fpgm) |" in md
        and "| training step, ghfp hooks |" in md
    )


def test_speedup_smoke(tmp_path):
    _run("speedup.py", tmp_path)
    data = json.loads((tmp_path / "speedup_smoke.json").read_text())
    assert set(data["runs"]) == {"stock", "tuned"}
    for run in data["runs"].values():
        resnet = [r for r in run["rows"] if r["model"] == "resnet20"]
        assert [r["residual"] for r in resnet] == ["independent", "coupled"]
        (mobilenet,) = [r for r in run["rows"] if r["model"] == "mobilenet_v2"]
        assert 0.4 <= mobilenet["compact"]["macs"] / mobilenet["dense"]["macs"] <= 0.6  # about half the MACs
        if "torch_pruning" in mobilenet:  # the same MACs within 10%
            assert mobilenet["torch_pruning"]["macs"] == pytest.approx(mobilenet["compact"]["macs"], rel=0.1)
        for r in resnet:
            t = r["timing"]
            best = (
                t[t["best"]["dense"]]["dense"]["median_ms"] / t[t["best"]["compact"]]["compact"]["median_ms"]
            )
            assert r["speedup"] == pytest.approx(best)
            assert (
                r["macs_ratio"] == pytest.approx(r["dense"]["macs"] / r["compact"]["macs"])
                and r["macs_ratio"] > 2
            )
    md = (tmp_path / "speedup_smoke.md").read_text()
    assert "| tuned | coupled |" in md and "| stock | mobilenet_v2 | softprune sfp" in md


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
    _script("zoo.py", "--smoke", "--out", str(out), "--json", str(tmp_path / "zoo.json"))
    rows = json.loads((tmp_path / "zoo.json").read_text())["rows"]
    assert len(rows) == 6 and all(r["ok"] for r in rows)
    for r in rows:
        assert r["params_compact"] < r["params"] and r["macs_compact"] < r["macs"]
    assert "**6 of 6 runs pass** (3 models)" in out.read_text()


def test_methods_smoke(tmp_path):
    _script("methods.py", "--smoke", "--out", str(tmp_path), "--runs", str(tmp_path / "runs"), timeout=900)
    data = json.loads((tmp_path / "methods_smoke.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    expected = {"dense", "sfp", "ghfp", "hrank"} | (
        {"torch-pruning"} if "torch_pruning" in data["machine"] else set()
    )
    assert set(rows) == expected
    for method, row in rows.items():
        summary = json.loads((tmp_path / "runs" / "smoke" / f"{method}-s0" / "summary.json").read_text())
        final = summary.get("compact", {}).get("test_acc", summary.get("test_acc_masked"))
        assert row["finals"] == [final] and len(row["acc_per_epoch_mean"]) == 2
    # the presets meet the same MACs budget (within the budget's 1%), well under dense
    assert rows["sfp"]["macs"] == pytest.approx(rows["ghfp"]["macs"], rel=0.01)
    assert rows["ghfp"]["macs"] < 0.5 * rows["dense"]["macs"]
    # every finished run is recorded in the results, and a checkout without the run folders reuses it
    assert {d.name for d in (tmp_path / "methods_runs" / "smoke").iterdir()} == {f"{m}-s0" for m in rows}
    first = (tmp_path / "methods_smoke.json").read_text()
    _script("methods.py", "--smoke", "--reuse", "--out", str(tmp_path), "--runs", str(tmp_path / "fresh"))
    again = json.loads((tmp_path / "methods_smoke.json").read_text())
    assert again["rows"] == json.loads(first)["rows"]
    # a run that stopped before its summary is resumed from its checkpoint, not trained again
    (tmp_path / "runs" / "smoke" / "ghfp-s0" / "summary.json").unlink()
    marker = (
        tmp_path / "runs" / "smoke" / "ghfp-s0" / "marker"
    )  # a run trained again starts from an empty folder
    marker.write_text("")
    (tmp_path / "methods_runs" / "smoke" / "ghfp-s0" / "summary.json").unlink()
    _script("methods.py", "--smoke", "--reuse", "--out", str(tmp_path), "--runs", str(tmp_path / "runs"))
    resumed = json.loads((tmp_path / "methods_smoke.json").read_text())
    untimed = [{k: v for k, v in r.items() if k != "seconds_mean"} for r in json.loads(first)["rows"]]
    assert [{k: v for k, v in r.items() if k != "seconds_mean"} for r in resumed["rows"]] == untimed
    assert marker.is_file()
    # a recipe row runs under a MACs budget set to the presets' cut: within 1% of their MACs
    assert rows["hrank"]["macs"] == pytest.approx(rows["ghfp"]["macs"], rel=0.01)
    if "torch-pruning" in rows:  # pruned to the MACs of the 40% presets, within 10%
        assert rows["torch-pruning"]["macs"] == pytest.approx(rows["ghfp"]["macs"], rel=0.1)
    report = tmp_path / "methods_smoke"
    assert (report / "report.md").is_file() and (report / "pareto.png").is_file()


def test_soft_dynamics_smoke(tmp_path):
    _run("soft_dynamics.py", tmp_path)
    data = json.loads((tmp_path / "soft_dynamics_smoke.json").read_text())
    rows = {r["way"]: r for r in data["rows"]}
    assert set(rows) == {"parameters", "forward, leaking", "forward"}
    assert rows["parameters"]["moving_share"] == 0.0  # zeroed soft filters behind a ReLU get no gradient
    assert rows["forward"]["moving_share"] >= 0.9
    # the kept filters get what they get in the network without the soft units; leaking, far more
    assert rows["forward"]["kept_grad_max"] == pytest.approx(rows["parameters"]["kept_grad_max"], rel=1e-3)
    assert rows["forward, leaking"]["kept_grad_max"] > 2 * rows["forward"]["kept_grad_max"]
    md = (tmp_path / "soft_dynamics_smoke.md").read_text()
    assert "| forward |" in md and data["machine"]["torch"] in md


def test_train_time_smoke(tmp_path):
    _script("train_time.py", "--smoke", "--out", str(tmp_path), "--runs", str(tmp_path / "runs"), timeout=900)
    data = json.loads((tmp_path / "train_time_smoke.json").read_text())
    rows = {r["row"]: r for r in data["rows"]}
    assert list(rows) == [
        "dense",
        "pfwt, compacting",
        "pfwt, masked to the end",
        "frs, compacting",
        "hfp, masked to the end",
    ]
    assert rows["dense"]["time_vs_dense"] == 1.0
    # compacting during training trains a smaller network in the last epoch; masking trains the full one
    full = rows["dense"]["trained_params_last_epoch"]
    assert rows["pfwt, masked to the end"]["trained_params_last_epoch"] == full
    assert rows["pfwt, compacting"]["trained_params_last_epoch"] < 0.8 * full
    assert rows["frs, compacting"]["trained_params_last_epoch"] < full
    # both end at the same model size: compaction during training changes the cost, not the result's size
    assert rows["pfwt, compacting"]["final_macs"] == rows["pfwt, masked to the end"]["final_macs"]
    assert all(r["steps_per_epoch"] == 2 for r in rows.values())  # 256 images in batches of 128
    md = (tmp_path / "train_time_smoke.md").read_text()
    assert "| pfwt, compacting |" in md and "the last epoch's steps at that speed" in md
