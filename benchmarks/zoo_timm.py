"""timm's CNNs and conv/attention hybrids through softprune: prune, compact, check; Torch-Pruning beside.

A family is a model name's leading word once framework prefixes are dropped (``tf_mixnet_s`` ->
mixnet, ``seresnext26d_32x4d`` -> seresnext). For each family the smallest variant by parameter
count (counted on the meta device, nothing allocated) is taken, if the family is a CNN or a hybrid:
three or more convolutions in the model (a plain ViT or MLP-Mixer has one, its patch embedding).
Every model's size is cached in results/zoo_timm_families.json (``--rescan`` counts again).

Each model: SFP at ``--rate`` (40%) with the default layer selection, one pruning step, compaction,
and the compact model's outputs against the masked model's on a fresh input (max difference at most
1e-5 of the output scale). A failure is recorded with its exception type: a SoftpruneError is a
refusal with a reason, anything else a bug. With ``--torch-pruning`` the same models go through
Torch-Pruning's MagnitudePruner at the same rate (classifier ignored), passing when the pruned model
runs and keeps its output shape.

    python benchmarks/zoo_timm.py [--families resnet mixnet] [--smoke] [--torch-pruning]
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import re
import statistics
import time
import traceback
import warnings
from pathlib import Path

import torch

import softprune
from common import RESULTS, machine
from zoo import prune_and_check, size_cells

PREFIXES = ("tf_", "gluon_", "legacy_", "ssl_", "swsl_", "ig_", "timm_")
# families named by two words (inception_v3, inception_resnet, wide_resnet, ...)
TWO_WORDS = ("inception", "wide", "efficientvit", "efficientformer", "swin", "vit", "eca", "nf")
FAMILIES_FILE = RESULTS / "zoo_timm_families.json"
# The CI subset (tests/test_zoo.py): the trickiest layer kinds, one model each.
SMOKE = [
    "resnet", "mixnet", "cspresnet", "dpn", "repvgg", "ghostnet", "skresnet", "resnest",
    "nfnet", "regnetx", "convnext", "efficientnet",
]  # fmt: skip
SIZE_CAP = 256  # the input side used (models that declare a larger default run at 256, where allowed)


def family_of(name: str) -> str:
    """``tf_mixnet_s`` -> mixnet, ``resnet18d`` -> resnet, ``mobilenetv3_small_050`` -> mobilenetv3,
    ``inception_resnet_v2`` -> inception_resnet: the name's first word without framework prefixes
    and without its size digits (a version such as v3 stays)."""
    base = name
    for prefix in PREFIXES:
        base = base.removeprefix(prefix)
    words = base.split("_")

    def strip(word: str) -> str:
        return re.sub(r"(?<![v\d])\d+[a-z]{0,2}$", "", word) or word

    head = strip(words[0])
    if head in TWO_WORDS and len(words) > 1:
        head += "_" + strip(words[1])
    return head


def scan() -> dict[str, dict]:
    """{model: {"params", "convs"}} for every timm model that builds (on the meta device)."""
    import timm

    models: dict[str, dict] = {}
    for name in timm.list_models():
        if name.startswith("test_"):  # timm's tiny test versions, not models anyone fine-tunes
            continue
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False)
        except Exception:  # noqa: BLE001  (a model timm cannot build without extra packages)
            continue
        models[name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "convs": sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()),
        }
        del model
    return models


def families(rescan: bool) -> dict[str, dict]:
    """{family: {"model", "params", "convs"}}: each CNN or hybrid family's smallest model."""
    if rescan or not FAMILIES_FILE.is_file():
        import timm

        FAMILIES_FILE.write_text(json.dumps({"timm": timm.__version__, "models": scan()}, indent=1))
    best: dict[str, dict] = {}
    for name, row in json.loads(FAMILIES_FILE.read_text())["models"].items():
        family = family_of(name)
        if family not in best or row["params"] < best[family]["params"]:
            best[family] = {"model": name, **row}
    return {f: row for f, row in sorted(best.items()) if row["convs"] >= 3}


def build(name: str, size: int) -> tuple[torch.nn.Module, torch.Tensor]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=1000).eval()
    with torch.no_grad():  # zero-initialized heads or residual gains prove nothing
        for p in model.parameters():
            if p.dim() > 0 and not p.any():
                p.normal_(0, 0.02)
    return model, torch.randn(1, 3, size, size)


def input_size(name: str) -> int:
    import timm

    cfg = timm.get_pretrained_cfg(name)
    size = (cfg.input_size if cfg is not None else (3, 224, 224))[-1]
    fixed = cfg is not None and getattr(cfg, "fixed_input_size", False)
    return size if fixed else min(size, SIZE_CAP)


def run_softprune(name: str, rate: float) -> dict:
    size = input_size(name)
    model, x = build(name, size)
    return {"size": size, **prune_and_check(model, x, rate)}


def run_torch_pruning(name: str, rate: float) -> dict:
    import torch_pruning as tp

    size = input_size(name)
    model, x = build(name, size)
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    ignored = [m for m in [head] if isinstance(m, torch.nn.Module)]
    out_shape = model(x).shape
    pruner = tp.pruner.MagnitudePruner(
        model,
        x,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=rate,
        ignored_layers=ignored,
    )
    pruner.step()
    with torch.no_grad():
        ok = model(torch.randn_like(x)).shape == out_shape
    return {"ok": bool(ok), "params_compact": sum(p.numel() for p in model.parameters())}


def _attempt_here(fn, name: str, rate: float) -> dict:
    try:
        return fn(name, rate)
    except Exception as exc:  # noqa: BLE001  (a failure is a result of the benchmark, not the end of it)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return {
            "ok": False,
            "error_type": type(exc).__name__,
            "refused": isinstance(exc, softprune.SoftpruneError),
            "error": message[:300],
            "where": traceback.format_exc(limit=-1).strip().splitlines()[-3][:200],
        }


def _child(fn, name: str, rate: float, conn) -> None:
    warnings.filterwarnings("ignore")
    conn.send(_attempt_here(fn, name, rate))
    conn.close()


def attempt(fn, name: str, rate: float, limit: float) -> dict:
    """``fn(name, rate)`` in a forked process: a tool that runs for more than ``limit`` seconds or
    exhausts memory on one model is that model's result, not the end of the run."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(fn, name, rate, send))
    start = time.perf_counter()
    child.start()
    send.close()
    row = receive.recv() if receive.poll(limit) else None
    child.join(5)
    if child.is_alive():
        child.kill()
        child.join()
    if row is None:
        killed = time.perf_counter() - start >= limit
        return {
            "ok": False,
            "error_type": "Timeout" if killed else f"exit {child.exitcode}",
            "refused": False,
            "error": f"ran past {limit:.0f} s" if killed else "the process died (out of memory?)",
        }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=0.4)
    parser.add_argument("--families", nargs="*", default=None)
    parser.add_argument("--smoke", action="store_true", help="the CI subset (a dozen families)")
    parser.add_argument("--rescan", action="store_true", help="list timm's families again")
    parser.add_argument("--torch-pruning", action="store_true", help="Torch-Pruning on the same models")
    parser.add_argument(
        "--reuse",
        nargs="+",
        default=[],
        metavar="TOOL[=FILE]",
        help="take a tool's results (softprune, torch-pruning) from an earlier run's JSON file (the --json"
        " file unless FILE is given; same timm and rate) instead of running it",
    )
    parser.add_argument("--limit", type=float, default=120, help="seconds per model and tool")
    parser.add_argument("--out", default="../docs/zoo_timm.md")
    parser.add_argument("--json", default=str(RESULTS / "zoo_timm.json"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import timm

    found = families(args.rescan)
    chosen = args.families or (SMOKE if args.smoke else list(found))
    reused: dict[str, dict] = {}  # tool -> that run's payload
    for spec in args.reuse:
        tool, _, path = spec.partition("=")
        if tool not in ("softprune", "torch-pruning"):
            parser.error(f"--reuse takes softprune or torch-pruning, not {tool!r}")
        reused[tool] = _previous(Path(path or args.json), timm.__version__, args.rate)
    before = {
        tool: {row["model"]: row for row in payload.get("rows", [])} for tool, payload in reused.items()
    }
    if "torch-pruning" in reused:
        tp_limit = reused["torch-pruning"].get("torch_pruning_limit")
    else:
        tp_limit = args.limit if args.torch_pruning else None
    try:
        from importlib.metadata import version

        tp_version = version("torch-pruning")
    except Exception:  # noqa: BLE001  (not installed: no comparison)
        tp_version = None
    payload = {
        "machine": machine(),
        "timm": timm.__version__,
        "torch_pruning": tp_version,
        "rate": args.rate,
        "limit": args.limit,
        "torch_pruning_limit": tp_limit,
        "rows": [],
    }
    rows = payload["rows"]
    for family in chosen:
        if family not in found:
            print(f"{family}: not a CNN or hybrid family of timm {timm.__version__}", flush=True)
            continue
        name = found[family]["model"]
        ours = before.get("softprune", {}).get(name, {})
        theirs = before.get("torch-pruning", {}).get(name, {})
        if ours.get("ok"):  # a failure is run again: it may be fixed since
            row = {k: v for k, v in ours.items() if k != "torch_pruning"}
        else:
            row = {"family": family, "model": name, **attempt(run_softprune, name, args.rate, args.limit)}
        if "torch_pruning" in theirs:
            row["torch_pruning"] = theirs["torch_pruning"]
        elif args.torch_pruning:
            row["torch_pruning"] = attempt(run_torch_pruning, name, args.rate, args.limit)
        rows.append(row)
        status = (
            "ok" if row["ok"] else f"FAILED {row.get('error_type', 'differs')}: {row.get('error', '')[:100]}"
        )
        tp_status = ""
        if "torch_pruning" in row:
            tp_status = "  TP ok" if row["torch_pruning"]["ok"] else "  TP failed"
        print(f"{family:22s} {name:36s} {status}{tp_status}", flush=True)
        # an hour-long run shows what it has done so far (the results file is written at the end: it may
        # hold the rows this run reuses)
        Path(args.json + ".partial").write_text(json.dumps(payload, indent=2))
        gc.collect()
    Path(args.json).write_text(json.dumps(payload, indent=2))
    Path(args.json + ".partial").unlink(missing_ok=True)
    Path(args.out).write_text(table(payload))
    print(f"wrote {args.out} and {args.json}")


def _previous(path: Path, timm_version: str, rate: float) -> dict:
    """An earlier run's results with the same timm version and rate (empty if none)."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    if old.get("timm") != timm_version or old.get("rate") != rate:
        return {}
    return old


def table(payload: dict) -> str:
    rows, m = payload["rows"], payload["machine"]
    ok = sum(r["ok"] for r in rows)
    refused = sum(r.get("refused", False) for r in rows)
    with_tp = [r for r in rows if "torch_pruning" in r]
    lines = [
        "# The timm zoo",
        "",
        f"The smallest model of every CNN or conv/attention-hybrid family of timm {payload['timm']}, pruned by"
        f" SFP at {payload['rate']:.0%} with the default layer selection, compacted, and checked: the compact"
        " model's outputs against the masked model's on a fresh input (max difference at most 1e-5 of the"
        " output scale). Produced by `make zoo-timm` (benchmarks/zoo_timm.py) on"
        f" {m['date']}, {m['cpu']}, {m['cores']} cores, torch {m['torch']}.",
        "",
        f"**{ok} of {len(rows)} families pass** (exact, and smaller than the dense model); {refused} refuse"
        f" with a reason (SoftpruneError); {len(rows) - ok - refused} fail otherwise.",
    ]
    if with_tp:
        tp_ok = sum(r["torch_pruning"]["ok"] for r in with_tp)
        both = [r for r in with_tp if r["ok"] and r["torch_pruning"]["ok"]]
        ours = statistics.median(r["params_compact"] / r["params"] for r in both) if both else float("nan")
        theirs = (
            statistics.median(r["torch_pruning"]["params_compact"] / r["params"] for r in both)
            if both
            else float("nan")
        )
        timeouts = sum(r["torch_pruning"].get("error_type") == "Timeout" for r in with_tp)
        lines += [
            "",
            f"Torch-Pruning {payload.get('torch_pruning') or ''} (MagnitudePruner, same rate, classifier ignored,"
            f" {payload.get('torch_pruning_limit') or 0:.0f} s per model) runs on **{tp_ok} of {len(with_tp)}** ({timeouts} ran"
            ' out of time). It has no masked model to compare with, so its pass is only "the pruned model runs'
            ' and keeps its output shape". On the'
            f" {len(both)} models both handle, the median compact model keeps {ours:.0%} of the parameters with"
            f" softprune and {theirs:.0%} with Torch-Pruning (softprune keeps whatever the analysis cannot remove"
            " exactly; Torch-Pruning's default groups differ).",
        ]
    lines += [
        "",
        "| family | model | input | params | compact | MACs | compact | max diff / scale | result |"
        + (" Torch-Pruning |" if with_tp else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if with_tp else ""),
    ]
    for r in rows:
        tp = ""
        if with_tp:
            t = r["torch_pruning"]
            tp = (
                f" {t['params_compact'] / 1e6:.2f}M |"
                if t["ok"]
                else f" failed: {t.get('error_type', 'shape')} |"
            )
        if "error_type" in r:
            kind = "refused" if r["refused"] else "**failed**"
            lines.append(
                f"| {r['family']} | {r['model']} | | | | | | | {kind}: {r['error_type']}: {r['error'][:90]} |{tp}"
            )
            continue
        result = "ok" if r["ok"] else ("**differs**" if not r.get("exact", True) else "nothing removed")
        lines.append(f"| {r['family']} | {r['model']} | {r['size']} | {size_cells(r)} | {result} |{tp}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
