"""torchrun: two processes with gloo on CPU train like one process with the same global batch."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import softprune
from softprune.cli import main
from softprune.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # trains, or runs scripts and subprocesses: make test-fast leaves it out

RECIPE = Path(softprune.__file__).parent / "configs" / "fashion_mnist_ghfp.yaml"


def _args(data_root, out, name, *extra):
    # LeNet-5 has no BatchNorm: per-process batch statistics would otherwise differ from one process's
    return [
        "train", str(RECIPE), f"output={out}", f"name={name}", f"data.root={data_root}", "model.name=lenet5",
        "data.train_limit=512", "data.test_limit=128", "train.epochs=3", "train.batch_size=64", "train.lr=0.05",
        "train.threads=1", "report.latency_repeats=1", *extra, "--quiet",
    ]  # fmt: skip


NO_BATCHNORM_NET = """
from torch import nn

def net(num_classes=10):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, num_classes),
    )
"""


def _free_port() -> int:
    """A port no one listens on now: fixed ports collide when tests run in parallel (xdist)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _folder_args(tmp_path):
    """An image folder read by worker processes, and a user's factory (no BatchNorm, as LeNet-5)."""
    from softprune.data.fixtures import write_image_folder

    (tmp_path / "usernet.py").write_text(NO_BATCHNORM_NET)
    images = write_image_folder(tmp_path / "images", classes=4, per_class={"train": 16, "val": 4})
    # evaluation transforms for training too: the crops would differ between 1 and 2 processes
    return ("data.name=imagefolder", f"data.root={images}", "data.image_size=24", "data.workers=1",
            "data.augment=false", "model.name=usernet:net", "train.batch_size=16", "data.train_limit=null")  # fmt: skip


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
    reason="no torchrun",
)
@pytest.mark.parametrize(
    "extra",
    [(), ("prune.compact_during_training=true",), "imagefolder"],
    ids=["masked", "compacting", "imagefolder"],
)
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, data_root, extra, monkeypatch):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    path = str(Path(softprune.__file__).parents[1])
    if extra == "imagefolder":
        extra = _folder_args(tmp_path)
        path += os.pathsep + str(tmp_path)
        monkeypatch.syspath_prepend(str(tmp_path))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    cmd = [
        torchrun,
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "softprune",
        *_args(data_root, tmp_path, "two", *extra),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(_args(data_root, tmp_path, "one", *extra)) == 0

    two, one = tmp_path / "two", tmp_path / "one"
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2
    assert summary["data"] == ("imagefolder" if "data.name=imagefolder" in extra else "fashion_mnist")
    # every rank holds rank 0's weights and masks, exactly
    assert summary["replicas"] == {"processes": 2, "max_weight_difference": 0.0, "masks_agree": True}
    # and they match one process with the same global batch (up to the order of float sums)
    w2, w1 = load_file(str(two / "model.safetensors")), load_file(str(one / "model.safetensors"))
    for key in w1:
        assert torch.allclose(w2[key], w1[key], atol=1e-5, rtol=1e-4), key
    p2, p1 = (
        load_checkpoint(two / "checkpoint.pt")["pruner"],
        load_checkpoint(one / "checkpoint.pt")["pruner"],
    )
    for a, b in zip(p2["groups"], p1["groups"]):
        assert torch.equal(a["hard"], b["hard"]) and torch.equal(a["soft"], b["soft"])
    # only rank 0 wrote: one log line per epoch, not two
    rows = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    if "prune.compact_during_training=true" in extra:  # the replicas trained the compacted network,
        # re-wrapped in DDP after each compaction
        assert rows[0]["trained_params"] > rows[-1]["trained_params"]


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
    reason="no torchrun",
)
@pytest.mark.parametrize("method", ["resrep", "bwcp", "c2s2"])
def test_methods_with_their_own_trained_state_keep_the_replicas_identical(tmp_path, data_root, method):
    """ResRep's compactors, C2S2's factors (gradients averaged by hand: they are not the DDP module's
    parameters) and BWCP's running whitening (averaged before it merges) must leave every process
    with rank 0's weights and masks. Per-process BatchNorm statistics make two processes differ from
    one, so only the replicas are compared."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "PYTHONPATH": str(Path(softprune.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    # ResRep merges at its last hard step (a fine-tuning epoch after it), BWCP at two thirds: in training
    extra = [f"prune.method={method}", *(["prune.finetune_epochs=1"] if method == "resrep" else [])]
    args = [a for a in _args(data_root, tmp_path, "two", *extra) if a != "model.name=lenet5"]
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "softprune", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["model"] == "resnet20"
    assert summary["replicas"] == {"processes": 2, "max_weight_difference": 0.0, "masks_agree": True}
    assert summary["compact"]["macs"] < 0.7 * summary["dense"]["macs"]  # the method did prune
    if method != "c2s2":  # merged during training, before the replicas were compared
        assert summary["plugins"][method]["merged"] > 0
