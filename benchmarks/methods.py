"""The methods side by side on one budget: Fashion-MNIST, a CIFAR ResNet-20 with one input channel.

Every method trains for the same number of epochs on the same data with the same recipe (SGD with
Nesterov momentum, batch 128) and seeds, and ends at the same MACs: the cut a 40%-per-layer preset
makes of a fresh ResNet-20 (about 60%), met by a MACs budget (softprune.budgets). Rows: dense; the
presets HFP, SFP, ASFP, SRFP, ASRFP, GHFP (as its authors' code runs it, and as its paper describes
it) and FPGM under SFP (coupled residuals, softprune's default); SFP and GHFP with their code's step
before training; on the short budget also the literature's recipes; and
Torch-Pruning's magnitude pruning with fine-tuning (dense training for half the budget, one-shot
pruning to the same MACs, fine-tuning for the other half).

Budgets: ``short`` is 6 epochs with a cosine learning rate; ``long`` is 24 epochs with the papers'
step schedule scaled to it (lr 0.1, x0.2 at 30%, 60% and 80% of training: 60/120/160 of 200).
Reported: final accuracy (of the compact model), accuracy per epoch (GHFP's claim is faster
convergence), MACs, parameters and wall time, mean and spread over the seeds; and the report (plots,
accuracy by epoch) over the first seed's runs. ``--reuse`` keeps finished runs, so a long budget can
be spread over several invocations. ``--preset-budget layer`` runs the presets at 40% of every layer
instead (the papers' budget; their MACs then differ a little), into methods_layer.json.

    python benchmarks/methods.py [--budget short|long] [--seeds 0 1 2] [--only sfp ghfp] [--reuse]
                                 [--preset-budget macs|layer] [--smoke]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import statistics
import sys
import time
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

import softprune
from common import RESULTS, machine, write
from softprune.calibrate import recalibrate_batchnorm
from softprune.data import DATASETS, BatchLoader, load_dataset
from softprune.report import make_report
from softprune.train.config import config_from_dict, load_config, read_yaml
from softprune.train.engine import evaluate, train

METHODS = {
    "dense": ["prune.method=dense"],
    "hfp": ["prune.method=hfp"],
    "sfp": ["prune.method=sfp"],
    "asfp": ["prune.method=asfp"],
    "srfp": ["prune.method=srfp"],
    "asrfp": ["prune.method=asrfp"],
    "ghfp": ["prune.method=ghfp"],
    # GHFP as the paper describes it: a constant rate and plain L2 (the preset follows the authors'
    # code instead; docs/methods.md, "GHFP")
    "ghfp-paper": [
        "prune.method=ghfp",
        "prune.rate_schedule=constant",
        "prune.criterion=l2",
        "prune.min_steps=1",
        "prune.finetune_epochs=0",
    ],  # fmt: skip
    "fpgm": ["prune.method=sfp", "prune.criterion=fpgm"],
    # GHFP with one pruning step per epoch and no step-free last epoch, as its code (the preset spreads
    # 24 steps over a short run and ends it with an epoch without steps)
    "ghfp-epoch-steps": ["prune.method=ghfp", "prune.min_steps=1", "prune.finetune_epochs=0"],
}
# Ablations, run only when named in --only: each changes one knob of a preset ({third}: a third of
# the budget's epochs).
ABLATIONS = {
    "ghfp-tail": ["prune.method=ghfp", "prune.finetune_epochs={third}"],  # ramps end at 2/3
    "ghfp-no-tail": ["prune.method=ghfp", "prune.finetune_epochs=0"],  # steps until the last epoch ends
    "ghfp-comp": ["prune.method=ghfp", "prune.compensate=activations"],
    "ghfp-l2": ["prune.method=ghfp", "prune.criterion=l2"],  # the code's ramps, the plain L2 norm
    "sfp-steps": ["prune.method=sfp", "prune.min_steps=24"],  # 24 steps spread over a short run
    # the step before training that SFP's and GHFP's code take
    "sfp-code": ["prune.method=sfp", "prune.initial_step=true"],
    "ghfp-init": ["prune.method=ghfp", "prune.initial_step=true"],
    # FPGM with the MACs budget ranking each layer's units by position, not by score over the mean
    "fpgm-rank": ["prune.method=sfp", "prune.criterion=fpgm", "prune.normalize=rank"],
    # FPGM whose re-selection stops at 2/3 of the budget: the last third trains the kept structure
    "fpgm-tail": ["prune.method=sfp", "prune.criterion=fpgm", "prune.finetune_epochs={third}"],
}
BUDGETS = {
    "short": {"epochs": 6, "schedule": "cosine"},
    "long": {"epochs": 24, "schedule": "multistep", "milestones": (0.3, 0.6, 0.8), "gamma": 0.2},
}
# The literature's methods, each from its recipe in configs/methods/ (their schedules are fractions
# of training, so they stretch to this budget) with a MACs budget set to the cut the 40% presets
# reach, so that every row ends at the same cost.
RECIPES = ["slimming", "hrank", "ezcrop", "tick_tock", "lrf", "similarity", "greg1", "greg2", "random",
           "resrep", "adsc", "pfwt", "frs", "dmcp", "bwcp", "conet", "c2s2"]  # fmt: skip
RECIPE_DIR = Path(__file__).resolve().parents[1] / "configs" / "methods"
SMOKE_METHODS = ["dense", "sfp", "ghfp", "hrank"]


def schedule(args) -> dict:
    """The training section's learning-rate schedule for the budget."""
    budget = BUDGETS[args.budget]
    if budget["schedule"] == "cosine":
        return {"schedule": "cosine"}
    milestones = sorted({max(1, round(f * args.epochs)) for f in budget["milestones"]})
    return {"schedule": "multistep", "milestones": milestones, "gamma": budget["gamma"]}


def lr_at(args, epoch: int) -> float:
    """The learning rate of ``epoch`` under the budget's schedule (for the Torch-Pruning loop)."""
    plan = schedule(args)
    if plan["schedule"] == "cosine":
        return 0.05 * (1 + math.cos(math.pi * epoch / args.epochs))
    return 0.1 * plan["gamma"] ** sum(epoch >= m for m in plan["milestones"])


def base_config(args) -> dict:
    recipe = resources.files("softprune") / "configs" / "fashion_mnist_ghfp.yaml"
    with resources.as_file(recipe) as path:
        base = read_yaml(path)
    base["data"].update(train_limit=args.train_limit, test_limit=args.test_limit)
    base["train"].update(epochs=args.epochs, **schedule(args))
    base["prune"].update(rate=0.4, residual="coupled")
    base["report"] = {"latency_batch": 64, "latency_repeats": 5}
    return base


def recipe_config(label: str, args) -> dict:
    """The benchmark's data, training and report settings with a recipe's pruning section."""
    config = base_config(args)
    config["prune"] = read_yaml(RECIPE_DIR / f"{label}.yaml")["prune"]
    return config


def run_softprune(label: str, seed: int, args, out: Path, macs_cut: float) -> Path:
    preset = label in METHODS or label in ABLATIONS
    base = base_config(args) if preset else recipe_config(label, args)
    overrides = [o.format(third=args.epochs // 3) for o in METHODS.get(label) or ABLATIONS.get(label, [])]
    name = f"{label}-s{seed}"
    if label != "dense":
        if preset and args.preset_budget == "layer":
            name = f"{label}-layer-s{seed}"  # 40% of every layer (base_config), wherever the MACs land
        else:
            overrides += ["prune.budget=macs", f"prune.rate={macs_cut}"]
    config = config_from_dict(base, [f"name={name}", f"output={out}", f"seed={seed}", *overrides])
    if args.reuse:
        restore(config.run_dir, args)
        done = config.run_dir / "summary.json"
        if done.is_file() and same_settings(load_config(config.run_dir / "config.yaml"), config):
            record(config.run_dir, args)
            return config.run_dir  # finished by an earlier invocation with the same settings
    unfinished = (config.run_dir / "checkpoint.pt").is_file() and (config.run_dir / "config.yaml").is_file()
    if args.reuse and unfinished and same_settings(load_config(config.run_dir / "config.yaml"), config):
        train(config, resume=True, progress=False)  # stopped midway: resume is exact, so go on from there
    else:
        if config.run_dir.exists():
            shutil.rmtree(config.run_dir)
        train(config, progress=False)
    (config.run_dir / "machine.json").write_text(json.dumps(machine(), indent=2))
    record(config.run_dir, args)
    return config.run_dir


def same_settings(a, b) -> bool:
    """Two runs' configs agree on everything that changes the result (not on where the run was)."""
    return dataclasses.replace(a, output=b.output) == b


# machine.json: the CPU a run trained on. The same seed is bit-identical on one CPU model, not across
# them (kernels differ), so a table whose runs came from several machines says so.
RECORD_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "machine.json")


def record(run_dir: Path, args) -> None:
    """Keep a finished run's small files (about 10 KB) in the committed results, so that ``--reuse``
    in a later checkout, without the run folders, goes on where the last one stopped."""
    kept = Path(args.record) / run_dir.parent.name / run_dir.name
    kept.mkdir(parents=True, exist_ok=True)
    for name in RECORD_FILES:
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, kept / name)


def restore(run_dir: Path, args) -> None:
    """A run recorded by an earlier checkout comes back as a run folder when this one has none."""
    kept = Path(args.record) / run_dir.parent.name / run_dir.name
    if (run_dir / "summary.json").is_file() or not (kept / "summary.json").is_file():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in RECORD_FILES:
        if (kept / name).is_file():
            shutil.copyfile(kept / name, run_dir / name)


def run_torch_pruning(seed: int, args, out: Path, target_macs: int) -> Path | None:
    """Dense training for half the epochs, Torch-Pruning to ``target_macs``, fine-tuning to the end."""
    try:
        import torch_pruning as tp
    except ImportError:
        print(
            "torch-pruning is not installed: its row is left out (pip install torch-pruning)", file=sys.stderr
        )
        return None
    run_dir = out / f"torch-pruning-s{seed}"
    settings = {"epochs": args.epochs, "train_limit": args.train_limit, "test_limit": args.test_limit,
                "schedule": schedule(args), "target_macs": target_macs}  # fmt: skip
    done = run_dir / "summary.json"
    if args.reuse:
        restore(run_dir, args)
        if done.is_file() and json.loads(done.read_text()).get("settings") == settings:
            record(run_dir, args)
            return run_dir
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    torch.manual_seed(seed)
    spec = DATASETS["fashion_mnist"]
    train_set = load_dataset("fashion_mnist", None, "train", limit=args.train_limit)
    test_set = load_dataset("fashion_mnist", None, "test", limit=args.test_limit)
    loader = BatchLoader(train_set, 128, shuffle=True, augment=spec.augment, seed=seed)
    test_loader = BatchLoader(test_set, 512, shuffle=False, augment=False)
    model = softprune.create_model("resnet20", num_classes=10, in_channels=1, input_size=28)
    x = torch.randn(1, 1, 28, 28)
    dense_cost = softprune.profile(model, x)

    def optimizer_for(m, epoch):
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
        for group in opt.param_groups:  # the budget's schedule over the whole run, from this epoch on
            group["lr"] = lr_at(args, epoch)
        return opt

    opt = optimizer_for(model, 0)
    rows, start, ratio = [], time.time(), None
    for epoch in range(args.epochs):
        if epoch == args.epochs // 2:
            ratio = _tp_ratio(tp, model, x, target_macs)
            tp.pruner.MagnitudePruner(
                model, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
                ignored_layers=_tp_ignored(model),
            ).step()  # fmt: skip
            model(x)  # Torch-Pruning's model must still run
            recalibrate_batchnorm(model, loader, 20)
            opt = optimizer_for(model, epoch)
        for group in opt.param_groups:
            group["lr"] = lr_at(args, epoch)
        t0 = time.time()
        model.train()
        loader.set_epoch(epoch)
        total = correct = 0
        loss_sum = 0.0
        for xb, yb in loader:
            out_b = model(xb)
            loss = F.cross_entropy(out_b, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += yb.numel()
            loss_sum += float(loss.detach()) * yb.numel()
            correct += int((out_b.argmax(1) == yb).sum())
        test_loss, test_acc = evaluate(model, test_loader, torch.device("cpu"))
        cost = softprune.profile(model, x)
        rows.append(
            {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "train_loss": loss_sum / total,
             "train_acc": 100.0 * correct / total, "test_loss": test_loss, "test_acc": test_acc,
             "params": cost["params"], "macs": cost["macs"], "seconds": time.time() - t0}
        )  # fmt: skip
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    final = softprune.profile(model, x)
    summary = {
        "name": run_dir.name, "model": "resnet20", "data": "fashion_mnist", "method": "torch-pruning",
        "rate": ratio, "epochs": args.epochs, "seconds": round(time.time() - start, 1), "dense": dense_cost,
        "compact": {**final, "test_acc": rows[-1]["test_acc"]}, "test_acc_masked": rows[-1]["test_acc"],
        "settings": settings,
    }  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (run_dir / "machine.json").write_text(json.dumps(machine(), indent=2))
    record(run_dir, args)
    return run_dir


def _tp_ignored(model) -> list:
    """Torch-Pruning 1.6 does not follow the option-A shortcut (an F.pad with constant widths): pruning
    the residual streams breaks the model (the classifier expects fewer inputs than it gets). It prunes
    the channels inside each block, harder, to reach the same MACs; the stream's producers are ignored."""
    stream = [
        model.conv1,
        *(block.conv2 for stage in (model.layer1, model.layer2, model.layer3) for block in stage),
    ]
    return [model.fc, *stream]


def _tp_ratio(tp, model, x, target_macs: int) -> float:
    """Torch-Pruning's ratio that reaches ``target_macs`` (bisection on copies of the model)."""
    import copy

    lo, hi, best, gap = 0.0, 0.9, 0.0, float("inf")
    for _ in range(9):
        mid = (lo + hi) / 2
        trial = copy.deepcopy(model)
        tp.pruner.MagnitudePruner(
            trial,
            x,
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=mid,
            ignored_layers=_tp_ignored(trial),
        ).step()
        macs = softprune.profile(trial, x)["macs"]
        if abs(macs - target_macs) < gap:
            best, gap = mid, abs(macs - target_macs)
        lo, hi = (mid, hi) if macs > target_macs else (lo, mid)
    return best


def _cpu(run_dir: Path) -> str:
    path = run_dir / "machine.json"
    return json.loads(path.read_text())["cpu"] if path.is_file() else "an unrecorded CPU"


def summarize(runs: dict[str, list[Path]]) -> list[dict]:
    rows = []
    for label, dirs in runs.items():
        summaries = [json.loads((d / "summary.json").read_text()) for d in dirs]
        metrics = [
            [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in dirs
        ]
        finals = [s.get("compact", {}).get("test_acc", s.get("test_acc_masked")) for s in summaries]
        cost = summaries[0].get("compact", summaries[0]["dense"])
        per_epoch = [statistics.mean(m[e]["test_acc"] for m in metrics) for e in range(len(metrics[0]))]
        rows.append(
            {
                "method": label,
                "seeds": len(dirs),
                "final_acc_mean": statistics.mean(finals),
                "final_acc_std": statistics.pstdev(finals) if len(finals) > 1 else 0.0,
                "finals": finals,
                "acc_per_epoch_mean": per_epoch,
                "macs": cost["macs"],
                "params": cost["params"],
                "seconds_mean": statistics.mean(s["seconds"] for s in summaries),
                "cpus": sorted({_cpu(d) for d in dirs}),
                "rate": summaries[0].get("rate"),
            }
        )
    return rows


# The rows of the accuracy-by-epoch plot over seeds: the rows (the family, FPGM, Torch-Pruning).
PLOTTED = ("dense", "hfp", "sfp", "asfp", "srfp", "asrfp", "ghfp", "fpgm", "torch-pruning")


def plot_mean_accuracy(rows: list[dict], title: str, out: Path) -> Path | None:
    """Mean test accuracy by epoch over the seeds, one line per row of PLOTTED (GHFP's claim is that
    it converges faster than the SFP family)."""
    shown = [r for r in rows if r["method"] in PLOTTED]
    if not shown:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8))
    for i, r in enumerate(shown):
        epochs = range(1, len(r["acc_per_epoch_mean"]) + 1)
        width = 2.4 if r["method"] in ("ghfp", "hfp") else 1.2
        ax.plot(epochs, r["acc_per_epoch_mean"], "-" if i < 10 else "--", lw=width,
                label=f"{r['method']} ({r['final_acc_mean']:.2f})")  # fmt: skip
    ax.set(xlabel="epoch", ylabel="test accuracy (%), mean over seeds", title=title)
    low = min(min(r["acc_per_epoch_mean"]) for r in shown)
    ax.set_ylim(max(low - 2, 0), 92)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="short")
    parser.add_argument("--epochs", type=int, help="override the budget's epochs")
    parser.add_argument("--train-limit", type=int, default=10000)
    parser.add_argument("--test-limit", type=int, default=5000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--runs", default="../runs/bench-methods", help="where the run folders go (not committed)"
    )
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    parser.add_argument(
        "--record",
        help="where each finished run's config, metrics and summary are kept for --reuse (default: "
        "methods_runs/ in the results folder, committed)",
    )
    parser.add_argument("--smoke", action="store_true", help="2 epochs on 256 images, 4 methods, one seed")
    parser.add_argument("--only", nargs="+", help="run only these methods (and Torch-Pruning)")
    parser.add_argument(
        "--macs-cut", type=float, help="the recipes' MACs target (default: where a fresh 40%% preset ends)"
    )
    parser.add_argument(
        "--preset-budget",
        choices=("macs", "layer"),
        default="macs",
        help="the presets at the recipes' MACs cut (default), or at 40%% of every layer as the papers "
        "(results in methods[_long]_layer.json)",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep softprune runs that already finished (same settings) and resume the ones that stopped midway",
    )
    args = parser.parse_args()
    args.epochs = args.epochs or BUDGETS[args.budget]["epochs"]
    if args.smoke:
        args.epochs, args.train_limit, args.test_limit, args.seeds = 2, 256, 128, [0]
    args.record = args.record or str(Path(args.out) / "methods_runs")
    labels = SMOKE_METHODS if args.smoke else [*METHODS, *(RECIPES if args.budget == "short" else [])]
    if args.only:
        labels = [label for label in [*labels, *ABLATIONS] if label in args.only]
    runs_root, out = Path(args.runs) / ("smoke" if args.smoke else args.budget), Path(args.out)
    torch.manual_seed(0)  # which stream channels a 40% preset removes, so its MACs, depend on weights
    dense = softprune.create_model("resnet20", in_channels=1, input_size=28)
    dense_macs = softprune.profile(dense, torch.randn(1, 1, 28, 28))["macs"]
    fresh = softprune.Pruner(dense, "sfp", 0.4, 1)
    fresh.step()
    target = fresh.profile()["macs"]  # about where the 40% presets end (coupled residuals)
    macs_cut = args.macs_cut if args.macs_cut is not None else round(1 - target / dense_macs, 4)
    target = (1 - macs_cut) * dense_macs
    runs: dict[str, list[Path]] = {label: [] for label in labels}
    runs["torch-pruning"] = []
    for seed in args.seeds:
        for label in labels:
            print(f"seed {seed}: {label}", flush=True)
            runs[label].append(run_softprune(label, seed, args, runs_root, macs_cut))
        print(f"seed {seed}: torch-pruning", flush=True)
        tp_dir = run_torch_pruning(seed, args, runs_root, target)
        if tp_dir is not None:
            runs["torch-pruning"].append(tp_dir)
    runs = {k: v for k, v in runs.items() if v}
    rows = summarize(runs)
    name = (
        "methods_smoke" if args.smoke else ("methods" if args.budget == "short" else f"methods_{args.budget}")
    )
    if args.preset_budget == "layer" and not args.smoke:
        name += "_layer"
    payload = {
        "machine": machine(),
        "budget": {
            "name": args.budget,
            "epochs": args.epochs,
            **schedule(args),
            "train_images": args.train_limit,
            "test_images": args.test_limit,
            "seeds": args.seeds,
            "recipes_macs_cut": macs_cut,
            "presets": "40% of every layer" if args.preset_budget == "layer" else "the recipes' MACs cut",
        },
        "rows": rows,
    }
    report_dir = out / name
    if report_dir.exists():
        shutil.rmtree(report_dir)
    make_report(
        [dirs[0] for dirs in runs.values()],
        report_dir,
        title=f"Methods on Fashion-MNIST (seed {args.seeds[0]})",
    )
    seeds = ", ".join(map(str, args.seeds))
    mean_plot = plot_mean_accuracy(
        rows, f"{args.epochs} epochs, mean of seeds {seeds}", report_dir / "accuracy_by_epoch_mean.png"
    )
    lines = [
        f"## Methods on Fashion-MNIST, ResNet-20 (1 input channel), {args.epochs} epochs ({schedule(args)['schedule']} "
        f"learning rate) on {args.train_limit} images, test on {args.test_limit}, seeds {', '.join(map(str, args.seeds))}, "
        f"every pruned row at {100 * macs_cut:.1f}% fewer MACs",
        "",
        "| method | final test accuracy (compact) | per seed | accuracy by epoch (mean) | MACs | params | wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        by_epoch = " ".join(f"{a:.1f}" for a in r["acc_per_epoch_mean"])
        lines.append(
            f"| {r['method']} | **{r['final_acc_mean']:.2f}** ± {r['final_acc_std']:.2f} | {', '.join(f'{a:.2f}' for a in r['finals'])} "
            f"| {by_epoch} | {r['macs'] / 1e6:.2f}M | {r['params'] / 1e3:.1f}K | {r['seconds_mean']:.0f} s |"
        )
    cpus = sorted({cpu for r in rows for cpu in r["cpus"]})
    lines += [
        "",
        f"Runs trained on: {', '.join(cpus)} (one seed is bit-identical on one CPU model, not across models).",
        "",
        *(
            [f"Accuracy by epoch, mean over the seeds: [{mean_plot.name}]({name}/{mean_plot.name})."]
            if mean_plot is not None
            else []
        ),
        f"Plots over the runs of seed {args.seeds[0]}: [report]({name}/report.md), "
        f"with the [accuracy against MACs]({name}/pareto.png) and [accuracy per epoch]({name}/accuracy_by_epoch.png).",
    ]
    write(name, payload, "\n".join(lines), out)


if __name__ == "__main__":
    main()
