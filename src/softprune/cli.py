"""The command line: it parses, calls the library, and prints. Errors are one line, never a traceback.

softprune train CONFIG.yaml [section.key=value ...] [--resume]
softprune profile | export | report ...
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
    if summary:  # under torchrun, only rank 0 reports
        _echo(f"run folder: {config.run_dir}")
        _print_result(summary)
    return 0


def _fmt_count(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _print_result(summary: dict) -> None:
    dense = summary["dense"]
    if summary.get("start"):
        _echo(f"started from a trained model: test accuracy {summary['start']['test_acc']:.2f}%")
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


def load_for_profile(
    target: str, input_size: int | None, num_classes: int, in_channels: int, factory: str | None = None
):
    """A model name, a .safetensors file saved by softprune, or a run folder (its compact model).
    ``factory``: the package.module:function a file was built with, named by the user (a file never
    decides which code is imported)."""
    from .io import read_plan
    from .models import create_model, load, user_factory

    path = Path(target)
    if path.is_dir():
        candidates = [path / "compact.safetensors", path / "model.safetensors"]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise SoftpruneError(f"{target!r} is a folder without compact.safetensors or model.safetensors")
        path = found
    if path.suffix == ".safetensors" or path.is_file():
        if path.suffix != ".safetensors":
            raise SoftpruneError(
                f"{target!r}: profile reads .safetensors files saved by softprune (softprune.save, "
                "or a run's compact.safetensors), a run folder, or a model name"
            )
        plan = read_plan(path)
        spec = plan.get("model") or {}
        builder = None
        if factory is not None:
            if spec.get("name") != factory:
                raise SoftpruneError(
                    f"{str(path)!r} was built by {spec.get('name')!r}, not by --model {factory!r}"
                )
            builder = lambda: create_model(**spec)  # noqa: E731
        elif user_factory(spec) is not None:
            raise SoftpruneError(
                f"{str(path)!r} was built by your factory {spec['name']!r}; name it to rebuild the model: "
                f"--model {spec['name']}"
            )
        model = load(path, builder)
        shape = plan["inputs"][0]["shape"] if plan.get("inputs") else None
        if shape is None:
            size = (
                input_size
                or spec.get("input_size")
                or getattr(model, "example_input_shape", (1, 3, 224, 224))[-1]
            )
            shape = [1, spec.get("in_channels", 3), size, size]
        elif input_size:
            shape = [1, shape[1], input_size, input_size]
        return model, tuple(shape), str(path)
    model = create_model(target, num_classes=num_classes, in_channels=in_channels, input_size=input_size)
    return model, tuple(model.example_input_shape), target


def cmd_profile(args: argparse.Namespace) -> int:
    from .cost import profile_report

    model, shape, source = load_for_profile(args.target, args.input_size, args.num_classes, args.in_channels)
    devices = tuple(args.device) if args.device else None
    report = {
        "model": source,
        **profile_report(
            model, shape, batch_sizes=tuple(args.batch_sizes), repeats=args.repeats, devices=devices
        ),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    _echo(f"{source}: input {'x'.join(str(d) for d in report['input_shape'])}")
    _echo(f"  parameters        {report['params']:>14,}   ({_fmt_count(report['params'])})")
    _echo(f"  MACs per image    {report['macs']:>14,}   ({_fmt_count(report['macs'])})")
    _echo(f"  conv MACs (papers){report['conv_macs']:>14,}   ({_fmt_count(report['conv_macs'])})")
    _echo(f"  weights           {report['weights_bytes'] / 2**20:>11.2f} MiB")
    _echo(f"  peak activations  {report['peak_activation_bytes'] / 2**20:>11.2f} MiB (batch 1, inference)")
    for device, rows in report["latency"].items():
        _echo(f"  latency on {device} (median of {args.repeats}, faster memory format):")
        _echo(f"    {'batch':>6} {'ms':>10} {'ms/image':>10} {'format':>14} {'peak act. MiB':>14}")
        for batch, row in rows.items():
            _echo(
                f"    {batch:>6} {row['median_ms']:>10.2f} {row['per_image_ms']:>10.3f} {row['best_format']:>14} "
                f"{row['peak_activation_bytes'] / 2**20:>14.2f}"
            )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from .io import export_onnx

    model, shape, source = load_for_profile(args.target, args.input_size, 10, 3, args.model)
    out = Path(args.onnx) if args.onnx else Path(source).with_suffix(".onnx")
    result = export_onnx(model, torch.randn(*shape), out, check=not args.no_check)
    _echo(f"{source} -> {result['path']}  input {'x'.join(str(d) for d in shape)} (batch dynamic)")
    if result["max_abs_diff"] is not None:
        _echo(
            f"onnxruntime vs PyTorch: max |difference| {result['max_abs_diff']:.2e} "
            f"(outputs up to {result['output_scale']:.3g})"
        )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import make_report

    out = args.out or (str(Path(args.runs[0]) / "report") if len(args.runs) == 1 else "report")
    path = make_report(args.runs, out, title=args.title)
    _echo(f"report: {path}")
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

    p = sub.add_parser("profile", help="parameters, MACs, memory and latency of a model, file or run folder")
    p.add_argument(
        "target", help="a model name (resnet56, resnet50, ...), a .safetensors file or a run folder"
    )
    p.add_argument("--input-size", type=int, default=None, help="image side (default: the model's)")
    p.add_argument("--num-classes", type=int, default=10, help="for a model name (default 10)")
    p.add_argument("--in-channels", type=int, default=3, help="for a model name (default 3)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 128])
    p.add_argument("--repeats", type=int, default=20, help="timed runs per measurement (after warm-up)")
    p.add_argument(
        "--device", action="append", choices=["cpu", "cuda"], help="default: cpu, and cuda when present"
    )
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("export", help="write a saved or pruned model as ONNX, checked in onnxruntime")
    p.add_argument(
        "target", help="a .safetensors file saved by softprune, or a run folder (its compact model)"
    )
    p.add_argument("--onnx", default=None, help="the ONNX file to write (default: next to the input)")
    p.add_argument(
        "--input-size", type=int, default=None, help="image side (default: the one it was pruned at)"
    )
    p.add_argument(
        "--model", default=None, help="package.module:function, for a model built by your own factory"
    )
    p.add_argument("--no-check", action="store_true", help="skip running the file in onnxruntime")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="Markdown report with plots of one or several run folders")
    p.add_argument("runs", nargs="+", help="run folders written by softprune train")
    p.add_argument(
        "--out", default=None, help="output folder (default: RUN/report, or ./report for several runs)"
    )
    p.add_argument("--title", default="softprune report")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="dense vs GHFP 40%% on Fashion-MNIST: accuracy, size, MACs, CPU latency")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the demo recipe")
    p.add_argument("--output", default="runs", help="folder for the demo's runs (default: runs)")
    p.add_argument("--quick", action="store_true", help="a tiny version (2 epochs on 2,000 images)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # overrides (key=value) may come after flags: `train cfg.yaml --resume train.epochs=5`
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
