"""Does pruning while training make training cheaper? Training wall time against dense, same epochs.

Fashion-MNIST, the methods benchmark's CIFAR ResNet-20 with one input channel and its data and
learning rate (10,000 training images, batch 128, cosine), one seed, run one after another on an
otherwise idle machine. Rows: dense; PFWT and FRS as their recipes run them (hard steps at epoch
ends, the network made smaller after each, ``prune.compact_during_training``); the same PFWT with
the masked full-size network trained to the end (compaction only at the end), which isolates what
compacting during training saves; and HFP (one hard step, then masked training), the cheapest a
masked method gets. Each row: total seconds of training (evaluation included, as the training
command records it), seconds of the last epoch, MACs per image of the model trained in that epoch,
and the median time of one training step (forward, backward, SGD step; batch 128) of the network
trained in the last epoch (the run's model.safetensors), timed after the run: the last epoch's steps times this, against
the epoch's seconds, separates the network's own cost from what the run does around it.

    python benchmarks/train_time.py [--epochs 6] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import methods as bench
import softprune
from common import machine, write
from softprune.train.config import config_from_dict
from softprune.train.engine import train

ROWS = {
    "dense": ("dense", []),
    "pfwt, compacting": ("pfwt", []),
    "pfwt, masked to the end": ("pfwt", ["prune.compact_during_training=false"]),
    "frs, compacting": ("frs", []),
    "hfp, masked to the end": ("hfp", []),
}


def step_seconds(model: torch.nn.Module, batch: int = 128, repeats: int = 20) -> float:
    """The median wall time of one SGD training step of ``model`` on a random batch of 28x28 images."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 1, 28, 28, generator=g), torch.randint(0, 10, (batch,), generator=g)
    times = []
    for i in range(repeats + 3):
        start = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if i >= 3:  # the first steps allocate
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train-limit", type=int, default=10000)
    parser.add_argument("--runs", default="../runs/bench-train-time")
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true", help="2 epochs on 256 images, for the test suite")
    args = parser.parse_args()
    if args.smoke:
        args.epochs, args.train_limit = 2, 256
    settings = argparse.Namespace(
        budget="short", epochs=args.epochs, train_limit=args.train_limit, test_limit=1000
    )
    rows = []
    for label, (method, overrides) in ROWS.items():
        base = (
            bench.base_config(settings)
            if method in ("dense", "hfp")
            else bench.recipe_config(method, settings)
        )
        if method == "dense":
            base["prune"] = {"method": "dense"}
        name = label.replace(", ", "-").replace(" ", "-")
        run_dir = Path(args.runs) / name
        if run_dir.exists():
            shutil.rmtree(run_dir)
        config = config_from_dict(
            base, [f"name={name}", f"output={args.runs}", "seed=0", "report.latency_repeats=1", *overrides]
        )
        print(label, flush=True)
        summary = train(config, progress=False)
        epochs = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
        rows.append({
            "row": label,
            "method": method,
            "compact_during_training": config.prune.compact_during_training,
            "seconds": summary["seconds"],
            "epoch_seconds": [round(e["seconds"], 2) for e in epochs],
            "trained_params_last_epoch": epochs[-1]["trained_params"],
            "final_macs": (summary.get("compact") or summary["dense"])["macs"],
            "test_acc": (summary.get("compact") or {}).get("test_acc", summary["history_test_acc"][-1]),
            "train_step_seconds": step_seconds(softprune.load(config.run_dir / "model.safetensors")),
            "steps_per_epoch": -(-args.train_limit // 128),
        })  # fmt: skip
    dense = rows[0]["seconds"]
    for r in rows:
        r["time_vs_dense"] = r["seconds"] / dense
    payload = {
        "machine": machine(),
        "settings": {"epochs": args.epochs, "train_images": args.train_limit, "seed": 0},
        "rows": rows,
    }
    lines = [
        f"## Training wall time against dense: ResNet-20 on Fashion-MNIST, {args.epochs} epochs, "
        f"{args.train_limit} images, run one after another",
        "",
        "| row | training seconds | vs dense | last epoch seconds | parameters trained in the last epoch | final MACs "
        "| test accuracy | a training step of the last epoch's network (batch 128) | the last epoch's steps at that speed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['row']} | {r['seconds']:.0f} | {r['time_vs_dense']:.2f} | {r['epoch_seconds'][-1]:.1f} "
            f"| {r['trained_params_last_epoch'] / 1e3:.1f}K | {r['final_macs'] / 1e6:.2f}M | {r['test_acc']:.2f} "
            f"| {r['train_step_seconds'] * 1e3:.1f} ms | {r['train_step_seconds'] * r['steps_per_epoch']:.1f} s |"
        )
    write("train_time_smoke" if args.smoke else "train_time", payload, "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
