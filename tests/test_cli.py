"""`softprune train` end to end on a small Fashion-MNIST subset, and the command line's errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import softprune
from softprune.cli import main
from softprune.data import BatchLoader, load_dataset
from softprune.train.engine import evaluate

RECIPE = Path(softprune.__file__).parent / "configs" / "fashion_mnist_ghfp.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("runs")
    # prune.finetune_epochs=0: a step at every epoch's end, which the schedules test below reads
    args = [
        "train", str(RECIPE), f"output={out}", "name=e2e", f"data.root={data_root}", "data.train_limit=1024",
        "data.test_limit=400", "train.epochs=3", "train.batch_size=64", "report.latency_repeats=3",
        "prune.recalibrate_bn=4", "prune.finetune_epochs=0", "--quiet",
    ]  # fmt: skip
    assert main(args) == 0
    return out / "e2e"


@pytest.mark.slow
def test_run_folder_holds_every_artifact(trained):
    names = {p.name for p in trained.iterdir()}
    assert {
        "config.yaml",
        "metrics.jsonl",
        "checkpoint.pt",
        "model.safetensors",
        "compact.safetensors",
        "summary.json",
    } <= names


@pytest.mark.slow  # the trained run (a module fixture) takes half a minute
def test_metrics_log_one_line_per_epoch_with_the_schedules(trained):
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    T = 3
    for t, r in enumerate(rows):
        ramp = 1 - (1 - (t + 1) / T) ** 3  # GHFP's code: the rate and the hardness ramp alike
        assert r["rate"] == pytest.approx(0.4 if t >= 0.95 * T else 0.4 * ramp) and r["alpha"] == 0.0
        assert r["hardness"] == pytest.approx(ramp)
        assert r["kept"] + r["soft"] + r["hard"] == rows[0]["kept"] + rows[0]["soft"] + rows[0]["hard"]
        assert 0.0 <= r["test_acc"] <= 100.0 and r["macs"] > 0
    assert rows[-1]["soft"] == 0 and rows[-1]["hard"] > rows[0]["hard"]
    assert rows[-1]["macs"] < 0.6 * json.loads((trained / "summary.json").read_text())["dense"]["macs"]


@pytest.mark.slow  # the trained run (a module fixture) takes half a minute
def test_summary_numbers_match_the_saved_compact_model(trained, data_root):
    summary = json.loads((trained / "summary.json").read_text())
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    compact = summary["compact"]
    # the compact model is the masked model's function: same accuracy on the same test set
    assert abs(compact["test_acc"] - rows[-1]["test_acc"]) <= 0.25
    assert summary["equivalence"]["max_abs_diff"] <= 1e-5 * summary["equivalence"]["output_scale"]
    model = softprune.load(trained / "compact.safetensors")
    assert sum(p.numel() for p in model.parameters()) == compact["params"]
    x = torch.randn(1, 1, 28, 28)
    assert softprune.profile(model, x)["macs"] == compact["macs"]
    assert summary["reduction"]["params"] == pytest.approx(1 - compact["params"] / summary["dense"]["params"])
    assert summary["reduction"]["macs"] == pytest.approx(1 - compact["macs"] / summary["dense"]["macs"])
    test = load_dataset("fashion_mnist", data_root, "test", limit=400)
    _, acc = evaluate(model, BatchLoader(test, 200, shuffle=False, augment=False), torch.device("cpu"))
    assert acc == pytest.approx(compact["test_acc"], abs=1e-9)
    assert round(summary["paper_flops_reduction"], 3) == 0.540  # ResNet-20 at 40%, METHODS.md
    assert compact["latency"]["median_ms"] > 0 and summary["dense"]["latency"]["best"] in (
        "contiguous",
        "channels_last",
    )


@pytest.mark.slow  # the trained run (a module fixture) takes half a minute
def test_existing_run_is_never_overwritten(trained, capsys):
    before = (trained / "checkpoint.pt").stat().st_mtime_ns
    code = main(["train", str(RECIPE), f"output={trained.parent}", "name=e2e", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "already holds a run; pass --resume" in err
    assert (trained / "checkpoint.pt").stat().st_mtime_ns == before


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "prune.method=gfhp",
            "config key 'prune.method' has value 'gfhp'; expected one of 'dense', 'adsc', 'asfp', .*Did you mean 'ghfp'",
        ),
        ("prune.rate=1.5", r"config key 'prune.rate' must lie in \[0, 1\), got 1.5"),
        ("prune.rte=0.3", "unknown config key 'prune.rte'. Did you mean 'prune.rate'?"),
        ("train.epochs=0", "config key 'train.epochs' must be positive, got 0"),
        ("train.epochs=three", "config key 'train.epochs' has value 'three'; expected an integer"),
        (
            "prune.criterion=l3",
            "unknown criterion 'l3'; choose one of: activation, bn_scale, bwcp, c2s2, compactor, conet, dmcp, ezcrop, fpgm, fpgm_mix, hrank, l1, l2, l2_bn, lrf, random, relevance, similarity, taylor",
        ),
        ("data.root=/nonexistent/fmnist", "/nonexistent/fmnist"),
        ("model.name=resnet21", "unknown model 'resnet21'"),
        ("epochs=3", "unknown config key 'epochs'"),
        ("prune", "an override looks like section.key=value"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, override, message):
    code = main(
        [
            "train",
            str(RECIPE),
            f"output={tmp_path}",
            "data.train_limit=64",
            "data.test_limit=64",
            override,
            "--quiet",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("softprune: error: ") and "\n" not in err
    assert __import__("re").search(message, err), err


def test_missing_config_file(capsys):
    assert main(["train", "/nonexistent/config.yaml"]) == 2
    assert "config file '/nonexistent/config.yaml' not found" in capsys.readouterr().err


@pytest.mark.slow
def test_no_traceback_from_the_real_command(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prune: [1, 2\n")
    proc = subprocess.run(
        [sys.executable, "-m", "softprune", "train", str(bad)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(softprune.__file__).parents[1])},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"softprune: error: config file '{bad}' is not valid YAML at line 2"
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_report_draws_every_plot_and_links_them(trained, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(trained), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    pngs = {"e2e_curves.png", "e2e_schedules.png", "e2e_widths.png"}
    assert {p.name for p in out.glob("*.png")} == pngs
    for name in pngs:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"({name})" in md
    summary = json.loads((trained / "summary.json").read_text())
    assert f"{summary['compact']['test_acc']:.2f}%" in md
    widths = summary["layers"]
    assert (
        widths
        and all(r["compact"] <= r["dense"] for r in widths)
        and any(r["compact"] < r["dense"] for r in widths)
    )


@pytest.mark.slow
def test_report_over_several_runs_adds_the_pareto_view(trained, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(trained), str(trained), "--out", str(out)]) == 0
    names = {p.name for p in out.glob("*.png")}
    assert {"pareto.png", "accuracy_by_epoch.png"} <= names
    assert "(pareto.png)" in (out / "report.md").read_text()


def test_report_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err


@pytest.mark.slow
def test_tensorboard_logging(tmp_path, data_root):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = [
        "train", str(RECIPE), f"output={tmp_path}", "name=tb", f"data.root={data_root}", "data.train_limit=256",
        "data.test_limit=128", "train.epochs=2", "train.batch_size=64", "report.latency_repeats=2",
        "report.tensorboard=true", "prune.recalibrate_bn=2", "--quiet",
    ]  # fmt: skip
    assert main(args) == 0
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    rows = [json.loads(line) for line in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()]
    logged = [e.value for e in events.Scalars("test_acc")]
    assert logged == pytest.approx([r["test_acc"] for r in rows], rel=1e-6)
    assert [e.value for e in events.Scalars("hardness")] == pytest.approx(
        [r["hardness"] for r in rows], rel=1e-6
    )
