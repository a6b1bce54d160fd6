"""Long runs: killed with SIGKILL at any moment and resumed, they end exactly as uninterrupted runs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import softprune
from softprune.cli import main
from softprune.errors import SoftpruneError
from softprune.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # trains, or runs scripts and subprocesses: make test-fast leaves it out

RECIPE = Path(softprune.__file__).parent / "configs" / "fashion_mnist_ghfp.yaml"


def _args(data_root, out, name, *extra):
    return [
        "train", str(RECIPE), f"output={out}", f"name={name}", f"data.root={data_root}", "data.train_limit=512",
        "data.test_limit=128", "train.epochs=3", "train.batch_size=64", "train.threads=1", "checkpoint.every_iterations=3",
        "prune.recalibrate_bn=2", "report.latency_repeats=1", *extra, "--quiet",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("reference")
    assert main(_args(data_root, out, "run")) == 0
    return out / "run"


def _final(run_dir):
    weights = load_file(str(run_dir / "model.safetensors"))
    pruner = load_checkpoint(run_dir / "checkpoint.pt")["pruner"]
    return weights, pruner


@pytest.mark.parametrize("kill_after", [8, 13], ids=["after-a-pruning-step", "mid-epoch"])
def test_killed_and_resumed_run_ends_like_the_uninterrupted_one(tmp_path, data_root, reference, kill_after):
    """The child is killed soon after its checkpoint reaches iteration ``kill_after`` (8 batches per
    epoch: 8 is the end of epoch 1, right after its pruning step; 13 is in the middle of epoch 2)."""
    env = {**os.environ, "PYTHONPATH": str(Path(softprune.__file__).parents[1])}
    child = subprocess.Popen([sys.executable, "-m", "softprune", *_args(data_root, tmp_path, "run")], env=env)
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and child.poll() is None:
            if checkpoint.exists():
                try:
                    if load_checkpoint(checkpoint)["iteration"] >= kill_after:
                        break
                except SoftpruneError:
                    pass  # never happens with atomic writes; a read racing a rename retries
            time.sleep(0.02)
        assert child.poll() is None, "the run finished before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    state = load_checkpoint(checkpoint)  # the last checkpoint is whole, whenever the kill came
    assert state["iteration"] >= kill_after
    started = time.time()
    assert main([*_args(data_root, tmp_path, "run"), "--resume"]) == 0
    resumed_part = time.time() - started
    # the summary's training time counts the part before the kill too (it counted only the resumed part)
    seconds = json.loads((tmp_path / "run" / "summary.json").read_text())["seconds"]
    assert state["seconds"] + 0.5 * resumed_part <= seconds <= state["seconds"] + resumed_part + 0.1
    weights, pruner = _final(tmp_path / "run")
    ref_weights, ref_pruner = _final(reference)
    assert weights.keys() == ref_weights.keys()
    for key in weights:
        assert torch.equal(weights[key], ref_weights[key]), key
    for mine, ref in zip(pruner["groups"], ref_pruner["groups"]):
        assert torch.equal(mine["hard"], ref["hard"]) and torch.equal(mine["soft"], ref["soft"])
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert rows == (reference / "metrics.jsonl").read_text().splitlines() or len(rows) == 3


def test_resume_of_a_finished_run_changes_nothing(tmp_path, data_root, reference):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(reference, copy)
    before = (copy / "model.safetensors").read_bytes()
    assert main([*_args(data_root, tmp_path, "run"), "--resume"]) == 0
    assert (copy / "model.safetensors").read_bytes() == before


def test_resume_with_another_prune_section_is_refused(tmp_path, data_root, reference, capsys):
    import shutil

    shutil.copytree(reference, tmp_path / "run")
    assert main([*_args(data_root, tmp_path, "run"), "prune.rate=0.3", "--resume"]) == 2
    assert "different 'prune' section" in capsys.readouterr().err


def _killed_after(data_root, out, extra, iteration):
    """Start the run in a process of its own and SIGKILL it once a checkpoint at ``iteration`` or
    later exists (while it still runs); returns the checkpoint's path."""
    env = {**os.environ, "PYTHONPATH": str(Path(softprune.__file__).parents[1])}
    child = subprocess.Popen(
        [sys.executable, "-m", "softprune", *_args(data_root, out, "run", *extra)], env=env
    )
    checkpoint = out / "run" / "checkpoint.pt"
    try:
        while child.poll() is None:
            if checkpoint.exists() and load_checkpoint(checkpoint)["iteration"] >= iteration:
                break
            time.sleep(0.02)
        assert child.poll() is None
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    return checkpoint


def test_resume_of_a_run_compacted_during_training(tmp_path, data_root):
    """Killed after its first compaction, the run replays it on resume and ends like the uninterrupted one."""
    extra = ("prune.compact_during_training=true",)
    assert main(_args(data_root, tmp_path / "ref", "run", *extra)) == 0
    checkpoint = _killed_after(data_root, tmp_path, extra, iteration=11)  # compacted at 8
    state = load_checkpoint(checkpoint)
    assert len(state["pruner"]["compactions"]) >= 1
    assert main([*_args(data_root, tmp_path, "run", *extra), "--resume"]) == 0
    mine, ref = _final(tmp_path / "run"), _final(tmp_path / "ref" / "run")
    for key in ref[0]:
        assert torch.equal(mine[0][key], ref[0][key]), key
    trained = [
        __import__("json").loads(line)["trained_params"]
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert trained[0] > trained[-1]
    back = softprune.load(
        tmp_path / "run" / "model.safetensors"
    )  # the network as trained, rebuilt from its plan
    assert sum(p.numel() for p in back.parameters()) == trained[-1]


@pytest.mark.parametrize("method, state_key", [("resrep", "compactors"), ("bwcp", "running")])
def test_a_run_with_plugin_state_killed_midway_resumes_and_ends_like_the_uninterrupted_one(
    tmp_path, data_root, method, state_key
):
    """ResRep's compactors and their momentum, BWCP's running whitening and its masks' noise live in
    the pruner's state (not in the model): a resumed run must carry them on, then merge them as the
    uninterrupted run does."""
    extra = (f"prune.method={method}",)
    assert main(_args(data_root, tmp_path / "ref", "run", *extra)) == 0
    checkpoint = _killed_after(data_root, tmp_path, extra, iteration=11)
    saved = load_checkpoint(checkpoint)["pruner"]["plugins"][0]
    assert saved["kind"] == method and len(saved["state"][state_key]) == 9 and not saved["state"]["merged"]
    assert main([*_args(data_root, tmp_path, "run", *extra), "--resume"]) == 0
    mine, ref = _final(tmp_path / "run"), _final(tmp_path / "ref" / "run")
    for key in ref[0]:
        assert torch.equal(mine[0][key], ref[0][key]), key
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["plugins"][method]["merged"] == 9
