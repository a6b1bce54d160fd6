"""The command line: it parses, calls the library, and prints. Errors are one line, never a traceback.

softprune train CONFIG.yaml [section.key=value ...] [--resume]
softprune demo
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path

from .errors import SoftpruneError


def _echo(line: str) -> None:
    print(line, flush=True)


def cmd_train(args: argparse.Namespace) -> int:
    from .train.config import load_config
    from .train.engine import train

    config = load_config(args.config, args.overrides)
    summary = train(config, resume=args.resume, echo=_echo, progress=not args.quiet and sys.stderr.isatty())
    _echo(f"run folder: {config.run_dir}")
    _print_result(summary)
    return 0


def _fmt_count(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _print_result(summary: dict) -> None:
    dense = summary["dense"]
    if "compact" not in summary:
        _echo(
            f"test accuracy {summary['test_acc_masked']:.2f}%  params {_fmt_count(dense['params'])}  MACs {_fmt_count(dense['macs'])}"
        )
        return
    c, r = summary["compact"], summary["reduction"]
    _echo(
        f"compact: test accuracy {c['test_acc']:.2f}%  params {_fmt_count(c['params'])} (-{100 * r['params']:.1f}%)  "
        f"MACs {_fmt_count(c['macs'])} (-{100 * r['macs']:.1f}%)  CPU latency x{r['latency']:.2f}  "
        f"max |masked - compact| = {summary['equivalence']['max_abs_diff']:.2e}"
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from .train.config import config_from_dict, read_yaml
    from .train.engine import train

    recipe = resources.files("softprune") / "configs" / "fashion_mnist_ghfp.yaml"
    with resources.as_file(recipe) as path:
        base = read_yaml(path)
    root = Path(args.output) / time.strftime("demo-%Y%m%d-%H%M%S")
    extra = list(args.overrides)
    if args.quick:
        extra += ["data.train_limit=2000", "data.test_limit=1000", "train.epochs=2"]
    results = {}
    for label, method in (("dense", "dense"), ("ghfp", "ghfp")):
        config = config_from_dict(base, [f"name={label}", f"output={root}", f"prune.method={method}", *extra])
        _echo(f"== {label}: {config.model.name} on {config.data.name}, {config.train.epochs} epochs")
        results[label] = train(config, echo=_echo, progress=not args.quiet and sys.stderr.isatty())
    dense, ghfp = results["dense"], results["ghfp"]
    small = ghfp["compact"]
    rate = int(round(100 * ghfp["rate"]))
    rows = [
        ("test accuracy", f"{dense['test_acc_masked']:.2f}%", f"{small['test_acc']:.2f}%", ""),
        ("parameters", _fmt_count(dense["dense"]["params"]), _fmt_count(small["params"]),
         f"-{100 * (1 - small['params'] / dense['dense']['params']):.1f}%"),
        ("MACs per image", _fmt_count(dense["dense"]["macs"]), _fmt_count(small["macs"]),
         f"-{100 * (1 - small['macs'] / dense['dense']['macs']):.1f}%"),
        (f"CPU latency (batch {ghfp['latency_batch']}, best format)",
         f"{dense['dense']['latency']['median_ms']:.2f} ms", f"{small['latency']['median_ms']:.2f} ms",
         f"x{dense['dense']['latency']['median_ms'] / small['latency']['median_ms']:.2f}"),
    ]  # fmt: skip
    _echo("")
    _echo(f"{'':<24}{'dense':>14}{f'GHFP {rate}% compact':>22}{'change':>10}")
    for name, a, b, change in rows:
        _echo(f"{name:<24}{a:>14}{b:>22}{change:>10}")
    _echo(f"\nmax |masked - compact| on the example input: {ghfp['equivalence']['max_abs_diff']:.2e}")
    _echo(f"runs: {root}")
    (root / "demo.json").write_text(json.dumps({"dense": dense, "ghfp": ghfp}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softprune", description="Soft-to-hard filter pruning for PyTorch CNNs"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (and prune, compact) a model from a YAML config")
    p.add_argument("config", help="YAML file (see configs/)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=5 prune.method=sfp")
    p.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="dense vs GHFP 40%% on Fashion-MNIST: accuracy, size, MACs, CPU latency")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the demo recipe")
    p.add_argument("--output", default="runs", help="folder for the demo's runs (default: runs)")
    p.add_argument("--quick", action="store_true", help="a tiny version (2 epochs on 2,000 images)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SoftpruneError as exc:
        if args.debug:
            raise
        print(f"softprune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("softprune: interrupted; the last checkpoint is kept (continue with --resume)", file=sys.stderr)
        return 130
    except Exception as exc:  # the promise is one line, never a traceback; --debug shows it
        if args.debug:
            raise
        print(
            f"softprune: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
            "(run with --debug for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
