"""Building the dependency graph and compacting: softprune against Torch-Pruning, side by side.

For resnet50, mobilenet_v2, densenet121 and vit_b_16 (224x224, batch 1, 50% of the channels of every
prunable layer, L2 magnitude, classifier kept): Torch-Pruning's MagnitudePruner (graph build, then
prune) and softprune's Pruner (analysis, pruning step, compaction), alternating in one run over
several rounds, each round on fresh models; medians. softprune also checks the compact model against
the masked one (two forward passes); that check is timed separately, since Torch-Pruning does none.

torch-pruning is a benchmark-only dependency: pip install torch-pruning (or softprune[bench]).

    python benchmarks/vs_torch_pruning.py [--rounds 5] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch
import torchvision

import softprune
from common import machine, write
from softprune.check import max_difference

MODELS = ["resnet50", "mobilenet_v2", "densenet121", "vit_b_16"]


def fresh(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, num_classes=1000).eval()


def torch_pruning_once(tp, name: str, x: torch.Tensor) -> dict:
    model = fresh(name)
    kw: dict = {}
    if name.startswith("vit"):
        ignored = [model.heads.head]
        layers = [blk.self_attention for blk in model.encoder.layers]
        kw = {
            "num_heads": {a: a.num_heads for a in layers},
            "prune_num_heads": True,
            "prune_head_dims": False,
        }
    else:
        ignored = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1000]
    start = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(
        model,
        x,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=ignored,
        **kw,
    )
    built = time.perf_counter()
    pruner.step()
    done = time.perf_counter()
    return {
        "build": built - start,
        "prune": done - built,
        "params": sum(p.numel() for p in model.parameters()),
    }


def softprune_once(name: str, x: torch.Tensor) -> dict:
    model = fresh(name)
    start = time.perf_counter()
    pruner = softprune.Pruner(model, "sfp", 0.5, 1, example_inputs=x, layers="all")
    analysed = time.perf_counter()
    pruner.step()
    stepped = time.perf_counter()
    small = pruner.compact(verify=False)
    compacted = time.perf_counter()
    diff, scale = max_difference(model, small, (x,))
    checked = time.perf_counter()
    return {
        "analyze": analysed - start,
        "step": stepped - analysed,
        "compact": compacted - stepped,
        "verify": checked - compacted,
        "params": sum(p.numel() for p in small.parameters()),
        "exact": diff <= 1e-5 * max(scale, 1e-12),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="one small model, one round, 64x64")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import torch_pruning as tp
    except ImportError:
        print("this benchmark compares with Torch-Pruning: pip install torch-pruning", file=sys.stderr)
        sys.exit(2)
    warnings.filterwarnings("ignore")
    names, size, rounds = (["resnet18"], 64, 1) if args.smoke else (MODELS, 224, args.rounds)
    x = torch.randn(1, 3, size, size)
    rows = []
    for name in names:
        tp_runs, sp_runs = [], []
        for _ in range(rounds + 1):  # the first round warms both up and is not counted
            tp_runs.append(torch_pruning_once(tp, name, x))
            sp_runs.append(softprune_once(name, x))
        tp_runs, sp_runs = tp_runs[1:] or tp_runs, sp_runs[1:] or sp_runs

        def med(runs, key):
            return statistics.median(r[key] for r in runs)

        row = {
            "model": name,
            "rounds": len(tp_runs),
            "torch_pruning": {k: med(tp_runs, k) for k in ("build", "prune")}
            | {"params": tp_runs[0]["params"]},
            "softprune": {k: med(sp_runs, k) for k in ("analyze", "step", "compact", "verify")}
            | {"params": sp_runs[0]["params"], "exact": all(r["exact"] for r in sp_runs)},
        }
        row["torch_pruning"]["total"] = statistics.median(r["build"] + r["prune"] for r in tp_runs)
        row["softprune"]["total"] = statistics.median(
            r["analyze"] + r["step"] + r["compact"] for r in sp_runs
        )
        row["softprune"]["total_with_check"] = statistics.median(
            r["analyze"] + r["step"] + r["compact"] + r["verify"] for r in sp_runs
        )
        row["ratio"] = row["torch_pruning"]["total"] / row["softprune"]["total"]
        rows.append(row)
        print(
            f"{name}: Torch-Pruning {row['torch_pruning']['total']:.3f}s, softprune {row['softprune']['total']:.3f}s",
            flush=True,
        )
    payload = {"machine": machine(), "size": size, "rows": rows}
    lines = [
        f"## Graph and compaction time: softprune vs Torch-Pruning ({size}x{size}, 50%, medians of {rows[0]['rounds']} rounds)",
        "",
        "| model | Torch-Pruning build + prune | softprune analysis + step + compaction | Torch-Pruning / softprune | softprune's equivalence check | params after (TP / softprune) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, s = r["torch_pruning"], r["softprune"]
        lines.append(
            f"| {r['model']} | {t['build']:.3f} + {t['prune']:.3f} = **{t['total']:.3f} s** "
            f"| {s['analyze']:.3f} + {s['step']:.3f} + {s['compact']:.3f} = **{s['total']:.3f} s** | x{r['ratio']:.2f} "
            f"| +{s['verify']:.3f} s ({'exact' if s['exact'] else 'DIFFERS'}) | {t['params'] / 1e6:.1f}M / {s['params'] / 1e6:.1f}M |"
        )
    lines += [
        "",
        "A ratio above 1 means softprune is faster. The two prune different channel sets: Torch-Pruning also",
        "prunes LayerNorm-normalized embedding dimensions of the ViT (an approximation), softprune keeps them",
        "(docs/methods.md), so parameter counts differ.",
    ]
    write("vs_torch_pruning" + ("_smoke" if args.smoke else ""), payload, "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
