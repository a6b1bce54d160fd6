"""Every torchvision classification model through softprune: prune, compact, check, measure.

For each model of torchvision.models.list_models(module=torchvision.models) and each rate: SFP at
that rate on every convolution, Linear layer and attention head (layers="all"; the classifier and
LayerNorm-normalized channels are kept, see docs/methods.md), one pruning step, compaction, and the
compact model's outputs compared with the masked model's on a fresh input. Parameters and MACs are
measured with torch.utils.flop_counter at the model's standard input size.

    python benchmarks/zoo.py [--rates 0.3 0.5] [--models resnet18 ...] [--out docs/zoo.md] [--smoke]
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import traceback
import warnings
from pathlib import Path

import torch
import torchvision

import softprune
from common import RESULTS, machine
from softprune.check import max_difference

SIZES = {"inception_v3": 299}  # everything else at 224
SMOKE = ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5"]


def run_one(name: str, rate: float, size: int) -> dict:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=1000).eval()
    with torch.no_grad():  # torchvision zero-initializes some heads; an all-zero output proves nothing
        for p in model.parameters():
            if p.dim() > 0 and not p.any():
                p.normal_(0, 0.02)
    x = torch.randn(1, 3, size, size)
    return {"model": name, "rate": rate, "size": size, **prune_and_check(model, x, rate, layers="all")}


def prune_and_check(model: torch.nn.Module, x: torch.Tensor, rate: float, **settings) -> dict:
    """SFP at ``rate``, one step, compaction; the compact model against the masked one on a fresh
    input, and both measured: the zoo's row."""
    row: dict = {}
    start = time.perf_counter()
    pruner = softprune.Pruner(model, "sfp", rate, 1, example_inputs=x, **settings)
    row["analyze_s"] = time.perf_counter() - start
    start = time.perf_counter()
    pruner.step()
    small = pruner.compact()
    row["prune_compact_s"] = time.perf_counter() - start
    diff, scale = max_difference(model, small, (torch.randn_like(x),))
    dense, compact = softprune.profile(model, x), softprune.profile(small, x)
    exact = bool(diff <= 1e-5 * max(scale, 1e-12))
    row.update(
        exact=exact,
        ok=exact and compact["params"] < dense["params"],  # exact and smaller: a pass removes something
        max_abs_diff=diff,
        output_scale=scale,
        params=dense["params"],
        params_compact=compact["params"],
        macs=dense["macs"],
        macs_compact=compact["macs"],
        groups=len(pruner.groups),
        prunable_groups=len(pruner.prunable),
        result_type="GraphModule" if isinstance(small, torch.fx.GraphModule) else type(small).__name__,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--out", default="docs/zoo.md")
    parser.add_argument("--json", default=str(RESULTS / "zoo.json"))
    parser.add_argument(
        "--smoke", action="store_true", help="three small models at 64x64, for the test suite"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    names = args.models or (
        SMOKE if args.smoke else torchvision.models.list_models(module=torchvision.models)
    )
    rows = []
    for name in names:
        size = 64 if args.smoke else SIZES.get(name, 224)
        for rate in args.rates:
            try:
                row = run_one(name, rate, size)
            except Exception as exc:  # a failure is a result of the benchmark, not the end of it
                row = {
                    "model": name,
                    "rate": rate,
                    "size": size,
                    "ok": False,
                    "error": f"{type(exc).__name__}: {exc}",
                }
                row["where"] = traceback.format_exc(limit=-1).strip().splitlines()[-1][:200]
            rows.append(row)
            status = "ok" if row["ok"] else f"FAILED {row.get('error', 'outputs differ')[:120]}"
            print(f"{name:24s} {rate:.1f} {status}", flush=True)
            gc.collect()
    payload = {"machine": machine(), "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(payload, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table(payload, names, args.rates))
    print(f"wrote {args.out} and {args.json}")


def table(payload: dict, names: list[str], rates: list[float]) -> str:
    rows = payload["rows"]
    m = payload["machine"]
    ok = sum(r["ok"] for r in rows)
    lines = [
        "# The torchvision zoo",
        "",
        f"Every classification model of torchvision {torchvision.__version__}, pruned by SFP at "
        + " and ".join(f"{int(r * 100)}%" for r in rates)
        + ' of every convolution, Linear layer and attention head (`layers="all"`), compacted, and checked:'
        " the compact model's outputs against the masked model's on a fresh input (max difference at most"
        " 1e-5 of the output scale). The classifier keeps its classes; channels normalized by a LayerNorm"
        " and attention blocks whose code computes the head size from the width (Swin, MaxViT) are kept"
        " whole, since removing them could not be exact. Parameters and MACs are measured with"
        " torch.utils.flop_counter at the input size given. Produced by `make zoo`"
        f" (benchmarks/zoo.py) on {m['date']}, {m['cpu']}, {m['cores']} cores, torch {m['torch']}.",
        "",
        f"**{ok} of {len(rows)} runs pass** ({len(names)} models).",
        "",
        "| model | input | rate | params | compact | MACs | compact | max diff / scale | analysis | prune + compact + check | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['model']} | {r['size']} | {r['rate']:.0%} | | | | | | | | **failed**: {r['error'][:100]} |"
            )
            continue
        lines.append(
            f"| {r['model']} | {r['size']} | {r['rate']:.0%} | {size_cells(r)} "
            f"| {r['analyze_s']:.1f} s | {r['prune_compact_s']:.1f} s | {'ok' if r['ok'] else '**differs**'} ({r['result_type']}) |"
        )
    return "\n".join(lines) + "\n"


def size_cells(r: dict) -> str:
    """A zoo row's params, compact params, MACs, compact MACs and max diff / scale cells."""
    return (
        f"{r['params'] / 1e6:.2f}M | {r['params_compact'] / 1e6:.2f}M | {r['macs'] / 1e9:.2f}G "
        f"| {r['macs_compact'] / 1e9:.2f}G | {r['max_abs_diff']:.1e} / {r['output_scale']:.1e}"
    )


if __name__ == "__main__":
    main()
