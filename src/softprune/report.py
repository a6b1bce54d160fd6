"""Reports of training runs: PNG plots and a Markdown page that links them.

``make_report([run_dir, ...], out_dir)`` reads each run folder written by ``softprune train``
(metrics.jsonl, summary.json, config.yaml) and draws:

- per run: accuracy and loss per epoch (train and test); P_t, alpha_t, lambda_t over training and the
  counts of kept, soft and hard filters; the width of every layer, dense against compact;
- over all runs: accuracy against MACs (the Pareto view, with the front drawn) and test accuracy
  per epoch, one line per run.

Needs matplotlib (``pip install 'softprune[report]'``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import SoftpruneError


@dataclass
class RunData:
    path: Path
    name: str
    rows: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        method = self.summary.get("method") or self.config.get("prune", {}).get("method", "?")
        if method == "dense":
            return f"{self.name} (dense)"
        prune = self.config.get("prune", {})
        rate = self.summary.get("rate", prune.get("rate"))
        if not isinstance(rate, (int, float)):
            return self.name
        criterion = self.summary.get("criterion") or prune.get("criterion")
        budget = self.summary.get("budget") or prune.get("budget") or "layer"
        what = {"macs": " of MACs", "params": " of params", "global": " of channels"}.get(budget, "")
        how = f"{method}, {criterion}" if criterion and criterion != "l2" else method
        return f"{self.name} ({how} {rate:.0%}{what})"

    @property
    def final_accuracy(self) -> float | None:
        compact = self.summary.get("compact", {})
        if "test_acc" in compact:
            return compact["test_acc"]
        return self.rows[-1]["test_acc"] if self.rows else None

    @property
    def macs(self) -> float | None:
        if "compact" in self.summary:
            return self.summary["compact"]["macs"]
        if "dense" in self.summary:
            return self.summary["dense"]["macs"]
        return self.rows[-1].get("macs") if self.rows else None


def load_run(path: str | Path) -> RunData:
    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise SoftpruneError(f"{str(path)!r} is not a run folder of softprune train (no metrics.jsonl)")
    rows = []
    for number, line in enumerate(metrics.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise SoftpruneError(f"{str(metrics)!r} line {number} is not JSON") from None
    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").is_file() else {}
    config = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else {}
    return RunData(path=path, name=path.name, rows=rows, summary=summary, config=config or {})


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SoftpruneError("reports need matplotlib: pip install 'softprune[report]'") from None
    return plt


def _save(fig, out: Path) -> Path:
    """Lay out, write the PNG and free the figure (pyplot keeps every open figure alive)."""
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    _pyplot().close(fig)
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


def plot_curves(run: RunData, out: Path) -> Path:
    plt = _pyplot()
    epochs = [r["epoch"] for r in run.rows]
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(10, 3.6))
    acc.plot(epochs, [r["train_acc"] for r in run.rows], label="train")
    acc.plot(epochs, [r["test_acc"] for r in run.rows], label="test")
    acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    loss.plot(epochs, [r["train_loss"] for r in run.rows], label="train")
    loss.plot(epochs, [r["test_loss"] for r in run.rows], label="test")
    loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    for ax in (acc, loss):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(run.label)
    return _save(fig, out)


def plot_schedules(run: RunData, out: Path) -> Path:
    plt = _pyplot()
    rows = [r for r in run.rows if "rate" in r]
    epochs = [r["epoch"] for r in rows]
    fig, (sched, counts) = plt.subplots(1, 2, figsize=(10, 3.6))
    if rows:
        sched.plot(epochs, [r["rate"] for r in rows], label="rate $P_t$")
        sched.plot(epochs, [r["alpha"] for r in rows], label=r"decay $\alpha_t$")
        sched.plot(epochs, [r["hardness"] for r in rows], label=r"hardness $\lambda_t$")
        counts.stackplot(
            epochs,
            [r["kept"] for r in rows],
            [r["soft"] for r in rows],
            [r["hard"] for r in rows],
            labels=["kept", "soft", "hard"],
            alpha=0.8,
        )
    else:
        sched.text(0.5, 0.5, "dense run: no pruning", ha="center", va="center", transform=sched.transAxes)
    sched.set(xlabel="epoch", ylim=(-0.05, 1.05), title="schedules")
    counts.set(xlabel="epoch", ylabel="filters", title="kept, soft and hard filters")
    for ax in (sched, counts):
        ax.grid(alpha=0.3)
        if rows:
            ax.legend(loc="best")
    fig.suptitle(run.label)
    return _save(fig, out)


def plot_widths(run: RunData, out: Path) -> Path:
    plt = _pyplot()
    layers = run.summary.get("layers", [])
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(layers) + 2), 4))
    if layers:
        xs = range(len(layers))
        ax.bar(xs, [r["dense"] for r in layers], color="#c8c8c8", label="dense")
        ax.bar(xs, [r["compact"] for r in layers], color="#3b6ea5", label="compact")
        ax.set_xticks(list(xs), [r["name"] for r in layers], rotation=90, fontsize=7)
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no compact model", ha="center", va="center", transform=ax.transAxes)
    ax.set(ylabel="output channels (heads for attention)", title=f"kept width of every layer: {run.label}")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out)


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten by one with fewer (or equal) MACs and higher (or equal) accuracy."""
    front, best = [], float("-inf")
    for macs, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((macs, acc))
            best = acc
    return front


_LABELS_AT_POINTS = 8
_MARKERS = "os^Dv<>PXp*h"


def plot_pareto(runs: list[RunData], out: Path) -> Path:
    plt = _pyplot()
    shown = [run for run in runs if run.macs is not None and run.final_accuracy is not None]
    # beyond a handful of runs the points crowd together: a legend instead of labels at the points
    crowded = len(shown) > _LABELS_AT_POINTS
    fig, ax = plt.subplots(figsize=(10, 5) if crowded else (7, 4.5))
    points = []
    for i, run in enumerate(shown):
        x, y = run.macs / 1e6, run.final_accuracy
        points.append((x, y))
        ax.scatter([x], [y], s=36, marker=_MARKERS[i % len(_MARKERS)], label=run.label if crowded else None)
        if not crowded:
            ax.annotate(run.label, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    front = _pareto(points)
    if len(front) > 1:
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="gray", lw=1, label="Pareto front")
    if crowded:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    elif len(front) > 1:
        ax.legend()
    ax.set(xlabel="MACs per image (millions)", ylabel="test accuracy (%)", title="accuracy against cost")
    ax.grid(alpha=0.3)
    return _save(fig, out)


def plot_accuracy_by_epoch(runs: list[RunData], out: Path) -> Path:
    plt = _pyplot()
    crowded = len(runs) > _LABELS_AT_POINTS
    fig, ax = plt.subplots(figsize=(10, 5) if crowded else (7, 4.5))
    for i, run in enumerate(runs):
        style = "-" if i < 10 else "--"  # matplotlib's cycle has 10 colours
        ax.plot([r["epoch"] for r in run.rows], [r["test_acc"] for r in run.rows], style, label=run.label)
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy per epoch")
    ax.grid(alpha=0.3)
    if crowded:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=7)
    return _save(fig, out)


def runs_table(runs: list[RunData]) -> list[str]:
    lines = [
        "| run | method | epochs | final test acc. | compact acc. | params | MACs | CPU speed-up | time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        s = run.summary
        dense, compact = s.get("dense", {}), s.get("compact", {})
        params = compact.get("params", dense.get("params"))
        speed = s.get("reduction", {}).get("latency")
        last = run.rows[-1]["test_acc"] if run.rows else None
        cells = [
            run.name,
            s.get("method", "?") + (f" {s['rate']:.0%}" if s.get("method") not in (None, "dense") else ""),
            str(len(run.rows)),
            f"{last:.2f}%" if last is not None else "",
            f"{compact['test_acc']:.2f}%" if "test_acc" in compact else "",
            f"{params / 1e6:.3f}M" if params else "",
            f"{run.macs / 1e6:.2f}M" if run.macs else "",
            f"x{speed:.2f}" if speed else "",
            f"{s['seconds']:.0f} s" if "seconds" in s else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def make_report(run_dirs: list[str | Path], out_dir: str | Path, title: str = "softprune report") -> Path:
    """Write the plots and ``report.md`` into ``out_dir``; return the Markdown file's path."""
    if not run_dirs:
        raise SoftpruneError("report needs at least one run folder")
    runs = [load_run(p) for p in run_dirs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", *runs_table(runs), ""]
    if len(runs) > 1:
        pareto = plot_pareto(runs, out / "pareto.png")
        by_epoch = plot_accuracy_by_epoch(runs, out / "accuracy_by_epoch.png")
        lines += [
            "## Accuracy against MACs",
            "",
            f"![accuracy against MACs]({pareto.name})",
            "",
            "## Test accuracy per epoch",
            "",
            f"![test accuracy per epoch]({by_epoch.name})",
            "",
        ]
    names = [_slug(r.name) for r in runs]
    if len(set(names)) < len(names):  # the same run name in several folders: prefix their parents
        names = [_slug(f"{r.path.parent.name}-{r.name}") for r in runs]
    for run, slug in zip(runs, names):
        curves = plot_curves(run, out / f"{slug}_curves.png")
        schedules = plot_schedules(run, out / f"{slug}_schedules.png")
        widths = plot_widths(run, out / f"{slug}_widths.png")
        lines += [
            f"## {run.label}",
            "",
            f"![accuracy and loss]({curves.name})",
            "",
            f"![schedules and filter counts]({schedules.name})",
            "",
            f"![layer widths]({widths.name})",
            "",
        ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
