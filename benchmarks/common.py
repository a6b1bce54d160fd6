"""Shared by the benchmark scripts: machine description and result files (timing: softprune.cost)."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import softprune

    info = {
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "softprune": softprune.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:  # the installed distribution's version: torch_pruning.__version__ says 1.6.0 in 1.6.1
        info["torch_pruning"] = importlib.metadata.version("torch-pruning")
    except importlib.metadata.PackageNotFoundError:
        pass
    return info


def write(name: str, payload: dict, table: str, out: str | Path | None = None) -> Path:
    """Write NAME.json and NAME.md (the table, with the machine and the date) into ``out`` (default
    results/), print the Markdown, and return its path."""
    out = Path(out) if out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    m = payload["machine"]
    header = (
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads), "
        f"Python {m['python']}, torch {m['torch']}, softprune {m['softprune']}"
        + (f", torch-pruning {m['torch_pruning']}" if "torch_pruning" in m else "")
        + ".\n\n"
    )
    (out / f"{name}.md").write_text(header + table.rstrip() + "\n")
    print(header + table.rstrip())
    return out / f"{name}.md"
