"""Does pruning make the model faster? Compact vs dense latency on CPU, measured side by side.

ResNet-56 (CIFAR, batch 128) pruned by SFP at 40% in both residual modes: "independent" (the papers'
compact ResNet: each branch prunes its own filters and adds its kept channels back) and "coupled"
(a residual stream keeps one mask, so it narrows too). Each model runs in both memory formats
(NCHW and channels_last) and is taken at its faster one; all timings of one model pair alternate in
one run. The ideal speed-up is the MACs ratio.

The allocator matters on CPU: with glibc's default malloc every large activation is a fresh mmap
and pays page faults, which hurts the dense model (larger tensors) more than the compact one. The
script measures both the stock allocator and a tuned one (large blocks kept in the heap, as jemalloc
or tcmalloc do) in separate processes, and reports both.

    python benchmarks/speedup.py [--smoke] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import torchvision

import softprune
from common import machine, write
from softprune.cost import FORMATS, compare_latency


def compare(dense: torch.nn.Module, small: torch.nn.Module, x: torch.Tensor, rounds: int) -> dict:
    timed = compare_latency({"dense": dense, "compact": small}, x, rounds=rounds)
    out: dict = {f: {name: timed[name][f] for name in timed} for f in FORMATS}
    out["best"] = {name: timed[name]["best"] for name in timed}
    out["speedup"] = timed["dense"]["median_ms"] / timed["compact"]["median_ms"]
    out["speedup_same_format"] = {
        f: out[f]["dense"]["median_ms"] / out[f]["compact"]["median_ms"] for f in FORMATS
    }
    return out


TUNED = "glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=1073741824"


def _bisect(evaluate, target: float, lo: float = 0.0, hi: float = 0.9, steps: int = 9) -> float:
    """The rate whose MACs fraction (evaluate(rate), decreasing in rate) is closest to ``target``."""
    best, best_gap = lo, float("inf")
    for _ in range(steps):
        mid = (lo + hi) / 2
        fraction = evaluate(mid)
        if abs(fraction - target) < best_gap:
            best, best_gap = mid, abs(fraction - target)
        lo, hi = (mid, hi) if fraction > target else (lo, mid)
    return best


def torchvision_row(name: str, x: torch.Tensor, rounds: int, target: float) -> dict:
    """softprune (coupled, SFP) at about ``target`` of the dense MACs, and Torch-Pruning's magnitude
    pruning at the same MACs, timed side by side with the dense model."""

    def fresh():
        torch.manual_seed(0)
        return torchvision.models.get_model(name, weights=None, num_classes=1000).eval()

    one = x[:1]
    dense = fresh()
    dense_cost = softprune.profile(dense, one)

    def ours(rate: float):
        pruner = softprune.Pruner(fresh(), "sfp", rate, 1, example_inputs=one)
        pruner.step()
        return pruner

    rate = _bisect(lambda r: ours(r).profile()["macs"] / dense_cost["macs"], target)
    pruner = ours(rate)
    small = pruner.compact()
    small_cost = softprune.profile(small, one)
    row = {
        "model": name,
        "method": f"sfp {rate:.1%}",
        "residual": "coupled",
        "dense": dense_cost,
        "compact": small_cost,
        "macs_ratio": dense_cost["macs"] / small_cost["macs"],
    }
    models = {"dense": dense, "compact": small}
    try:
        import torch_pruning as tp
    except ImportError:
        tp = None
    if tp is not None:

        def theirs(ratio: float):
            model = fresh()
            ignored = [
                m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1000
            ]
            tp.pruner.MagnitudePruner(
                model,
                one,
                importance=tp.importance.MagnitudeImportance(p=2),
                pruning_ratio=ratio,
                ignored_layers=ignored,
            ).step()
            return model

        ratio = _bisect(
            lambda r: softprune.profile(theirs(r), one)["macs"] / dense_cost["macs"],
            small_cost["macs"] / dense_cost["macs"],
        )
        models["torch_pruning"] = theirs(ratio)
        row["torch_pruning"] = {**softprune.profile(models["torch_pruning"], one), "pruning_ratio": ratio}
    timed = compare_latency(models, x, rounds=rounds)
    row["timing"] = {f: {k: timed[k][f] for k in timed} for f in FORMATS}
    row["timing"]["best"] = {k: timed[k]["best"] for k in timed}
    row["speedup"] = timed["dense"]["median_ms"] / timed["compact"]["median_ms"]
    if "torch_pruning" in timed:
        row["torch_pruning"]["speedup"] = timed["dense"]["median_ms"] / timed["torch_pruning"]["median_ms"]
        row["torch_pruning"]["macs_ratio"] = dense_cost["macs"] / row["torch_pruning"]["macs"]
    return row


def measure(smoke: bool) -> dict:
    name, batch, rounds = ("resnet20", 4, 3) if smoke else ("resnet56", 128, 20)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32)
    rows = []
    for residual in ("independent", "coupled"):
        model = softprune.create_model(name)
        pruner = softprune.Pruner(model, "sfp", 0.4, 1, residual=residual)
        pruner.step()
        small = pruner.compact()
        dense_cost = softprune.profile(model, x[:1])
        small_cost = softprune.profile(small, x[:1])
        result = compare(model, small, x, rounds)
        rows.append(
            {
                "model": name,
                "method": "sfp 40%",
                "residual": residual,
                "dense": dense_cost,
                "compact": small_cost,
                "macs_ratio": dense_cost["macs"] / small_cost["macs"],
                "timing": result,
                "speedup": result["speedup"],
            }
        )
    size, tv_batch, tv_rounds = (32, 2, 2) if smoke else (224, 16, 8)
    for tv_name in ("mobilenet_v2",) if smoke else ("resnet50", "mobilenet_v2"):
        rows.append(torchvision_row(tv_name, torch.randn(tv_batch, 3, size, size), tv_rounds, target=0.5))
    return {"model": name, "batch": batch, "torchvision_batch": tv_batch, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(args.smoke)))
        return
    runs = {}
    for allocator in ("stock", "tuned"):
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        if allocator == "tuned":
            env["GLIBC_TUNABLES"] = TUNED
        cmd = [sys.executable, __file__, "--child"] + (["--smoke"] if args.smoke else [])
        cmd += ["--threads", str(args.threads)] if args.threads else []
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        runs[allocator] = json.loads(out.strip().splitlines()[-1])
    name, batch = runs["stock"]["model"], runs["stock"]["batch"]
    payload = {"machine": machine(), "runs": runs}
    lines = [
        f"## Compact vs dense, {name}, batch {batch}, CPU eager mode, SFP 40%",
        "",
        "| allocator | residual mode | MACs dense -> compact | ideal (MACs ratio) | dense ms (format) | compact ms (format) | speed-up | same format: NCHW / channels_last |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for allocator, run in runs.items():
        for r in run["rows"]:
            if r["model"] != name:
                continue
            t = r["timing"]
            bd, bc = t["best"]["dense"], t["best"]["compact"]
            lines.append(
                f"| {allocator} | {r['residual']} | {r['dense']['macs'] / 1e6:.1f}M -> {r['compact']['macs'] / 1e6:.1f}M "
                f"| x{r['macs_ratio']:.2f} | {t[bd]['dense']['median_ms']:.1f} ({bd}) | {t[bc]['compact']['median_ms']:.1f} ({bc}) "
                f"| **x{r['speedup']:.2f}** | x{t['speedup_same_format']['contiguous']:.2f} / x{t['speedup_same_format']['channels_last']:.2f} |"
            )
    lines += [
        "",
        f"## torchvision models at about half the MACs, batch {runs['stock'].get('torchvision_batch')}, 224x224, CPU",
        "",
        "| allocator | model | tool | MACs dense -> pruned | ideal (MACs ratio) | pruned ms (format) | speed-up over dense | dense ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for allocator, run in runs.items():
        for r in run["rows"]:
            if r["model"] == name:
                continue
            t = r["timing"]
            bd = t["best"]["dense"]
            dense_ms = t[bd]["dense"]["median_ms"]
            tools = [("softprune " + r["method"], r["compact"], r["macs_ratio"], "compact", r["speedup"])]
            if "torch_pruning" in r:
                tp = r["torch_pruning"]
                tools.append(
                    (
                        f"Torch-Pruning {tp['pruning_ratio']:.1%}",
                        tp,
                        tp["macs_ratio"],
                        "torch_pruning",
                        tp["speedup"],
                    )
                )
            for label, cost, ideal, key, speed in tools:
                best = t["best"][key]
                lines.append(
                    f"| {allocator} | {r['model']} | {label} | {r['dense']['macs'] / 1e9:.2f}G -> {cost['macs'] / 1e9:.2f}G "
                    f"| x{ideal:.2f} | {t[best][key]['median_ms']:.1f} ({best}) | **x{speed:.2f}** | {dense_ms:.1f} ({bd}) |"
                )
    lines += [
        "",
        "Medians of interleaved rounds; each model at its faster memory format. stock: glibc's default malloc;",
        f"tuned: `GLIBC_TUNABLES={TUNED}` (large blocks stay in the heap, as with jemalloc/tcmalloc).",
        "The floor in the issue: the compact ResNet-56 of SFP at 40% at least x1.6 faster than the dense one",
        "on CPU at batch 128. At 10-40 channels these convolutions are memory-bound (time grows with C, not",
        "C^2), so the MACs ratio is out of reach on CPU.",
    ]
    write("speedup" + ("_smoke" if args.smoke else ""), payload, "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
