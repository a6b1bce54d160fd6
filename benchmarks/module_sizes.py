"""Lines per module of the package at a git revision and now, side by side.

The layout test (tests/test_layout.py) holds every module under 700 lines; this shows where the
lines went when the layout changed:

    python benchmarks/module_sizes.py --base 5c9ae3f   # before the methods got a home (issue 12)
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from common import RESULTS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "src/softprune"


def sizes_at(revision: str | None) -> dict[str, int]:
    """Lines of every .py file under the package, at ``revision`` (None: the working tree)."""
    if revision is None:
        return {
            str(p.relative_to(ROOT / PACKAGE)): len(p.read_text().splitlines())
            for p in sorted((ROOT / PACKAGE).rglob("*.py"))
        }
    listed = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", revision, PACKAGE], cwd=ROOT, check=True, capture_output=True,
        text=True,
    ).stdout.split()  # fmt: skip
    out = {}
    for path in listed:
        if path.endswith(".py"):
            text = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=ROOT, check=True,
                                  capture_output=True, text=True).stdout  # fmt: skip
            out[path[len(PACKAGE) + 1 :]] = len(text.splitlines())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the git revision to compare with")
    parser.add_argument("--out", default=str(RESULTS / "module_sizes"), help="results, without suffix")
    args = parser.parse_args()
    before, after = sizes_at(args.base), sizes_at(None)
    rows = [
        {"module": m, "before": before.get(m), "after": after.get(m)}
        for m in sorted(set(before) | set(after))
    ]
    payload = {
        "base": args.base,
        "total_before": sum(before.values()),
        "total_after": sum(after.values()),
        "largest_before": max(before.items(), key=lambda kv: kv[1]),
        "largest_after": max(after.items(), key=lambda kv: kv[1]),
        "rows": rows,
    }
    Path(args.out + ".json").write_text(json.dumps(payload, indent=2))
    lines = [
        f"# Lines per module of src/softprune: at {args.base} and now",
        "",
        f"Total {payload['total_before']} -> {payload['total_after']}; largest module "
        f"{payload['largest_before'][0]} ({payload['largest_before'][1]}) -> "
        f"{payload['largest_after'][0]} ({payload['largest_after'][1]}).",
        "",
        "| module | before | now |",
        "|---|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['module']} | {r['before'] if r['before'] is not None else '-'} | "
                     f"{r['after'] if r['after'] is not None else '-'} |")  # fmt: skip
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:3]))


if __name__ == "__main__":
    main()
