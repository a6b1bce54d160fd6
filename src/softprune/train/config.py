"""Run configuration: a YAML file, overridable key by key, checked before anything runs.

Every section is a dataclass; :func:`load_config` reads YAML, applies ``section.key=value`` overrides
(values parsed as YAML), and validates every key against the dataclass types: an unknown key is an
error with the closest valid key, a bad value names the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..errors import SoftpruneError
from ..methods import METHODS, get_method
from ..settings import PruneSettings, build_dataclass


@dataclass
class DataConfig:
    name: str = "fashion_mnist"  # cifar10, cifar100, mnist, fashion_mnist, or imagefolder (with root)
    root: str | None = None
    image_size: int | None = None  # an image folder's training and evaluation side (default 224)
    workers: int = 4  # processes reading an image folder (the in-memory sets use none)
    train_limit: int | None = None  # keep the first N training samples (quick runs, tests)
    test_limit: int | None = None
    augment: bool | None = None  # None: the data set's default (the papers' crop+flip for CIFAR)
    cutout: int = 0  # side of a square zeroed at a random place of each training image (0: off)
    download: bool = False


@dataclass
class ModelConfig:
    # softprune's, torchvision's, timm:NAME, or package.module:function (your factory, on PYTHONPATH)
    name: str = "resnet20"
    input_size: int | None = None  # None: the data set's image size
    checkpoint: str | None = None  # start from these weights: .pt/.pth state_dict, .safetensors
    weights: str | None = None  # or from published ones: torchvision's (DEFAULT, ...), timm's (pretrained)


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: list[int] = field(default_factory=lambda: [60, 120, 160])
    gamma: float = 0.2
    eval_batch_size: int = 512
    device: str = "auto"  # auto, cpu, cuda, cuda:N (under torchrun: cuda picks the local rank's GPU)
    threads: int | None = None  # torch intra-op threads on CPU
    amp: Literal["none", "bf16"] = "none"  # bf16 autocast for forward passes (weights and masks stay fp32)
    channels_last: bool = False  # train in the channels-last memory format
    deterministic: bool = False  # torch.use_deterministic_algorithms: bit-exact resumes on GPUs too


def default_min_steps(method: str) -> int:
    """The pruning steps a run of ``method`` takes at least (prune.min_steps; softprune.methods)."""
    return 1 if method == "dense" else get_method(method).min_steps


def default_finetune_epochs(method: str, epochs: int) -> int:
    """The epochs without pruning steps that end a run of ``method`` (prune.finetune_epochs): the
    method's, but a run keeps at least one epoch to prune in."""
    return 0 if method == "dense" else max(0, min(get_method(method).finetune_epochs, epochs - 1))


@dataclass
class PruneConfig(PruneSettings):
    """The config's prune section: the pruning settings (softprune.settings.PruneSettings, shared
    with the Pruner) and what the training command decides: the method, the rate, when to step."""

    method: str = "ghfp"  # a method (softprune.list_methods()) or dense
    rate: float = 0.4
    every_epochs: int = 1  # a pruning step every k epochs ...
    every_iterations: int | None = None  # ... or every k optimizer steps
    # at least this many pruning steps: where one per epoch gives fewer (a short run), the steps are
    # spread evenly over the iterations instead, so each step changes less (docs/methods.md, "Steps").
    # None: the method's, 24 for ghfp and 1 (one step per epoch) for the others. Not with
    # every_epochs > 1, compact_during_training or a plugin that trains before each step (tick), which
    # ask for steps at epoch ends.
    min_steps: int | None = None
    # one more pruning step before the first epoch, as SFP's and GHFP's released code do; off by
    # default: on the methods benchmark it cost GHFP 0.7 points and did not help SFP (docs/methods.md)
    initial_step: bool = False
    # the last k epochs train the pruned model with every selected unit hard: no pruning steps in them.
    # None: the method's, 1 for ghfp (at most train.epochs - 1) and 0 for the others
    finetune_epochs: int | None = None
    # remove hard filters physically after each pruning step that made some, and train the smaller
    # model from there on (the optimizer, LR schedule and DDP wrapper follow): training gets cheaper
    compact_during_training: bool = False
    # BatchNorm statistics re-estimated on this many training batches after each pruning step and
    # before evaluation (0: off, the papers' protocol). It changes no weight and no training step.
    recalibrate_bn: int = 20

    def pruner_settings(self) -> dict:
        """The keyword settings of softprune.Pruner."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(PruneSettings)}


@dataclass
class CheckpointConfig:
    every_epochs: int = 1
    every_iterations: int | None = None  # also checkpoint mid-epoch, every k optimizer steps


@dataclass
class ReportConfig:
    latency_batch: int = 1
    latency_repeats: int = 20
    tensorboard: bool = False  # also log every epoch's numbers to RUN/tensorboard


@dataclass
class RunConfig:
    name: str = "run"
    output: str = "runs"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output) / self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls: type, data: Any, path: str) -> Any:
    return build_dataclass(cls, data, path, noun="config key")


def _validate(config: RunConfig) -> None:
    def positive(key: str, value: Any, allow_none: bool = False) -> None:
        if value is None and allow_none:
            return
        if value is None or value <= 0:
            raise SoftpruneError(f"config key '{key}' must be positive, got {value!r}")

    t, p, d = config.train, config.prune, config.data
    for key in ("epochs", "batch_size", "eval_batch_size"):
        positive(f"train.{key}", getattr(t, key))
    positive("train.lr", t.lr)
    positive("train.threads", t.threads, allow_none=True)
    for key in ("momentum", "weight_decay", "gamma"):
        if getattr(t, key) < 0:
            raise SoftpruneError(f"config key 'train.{key}' must be >= 0, got {getattr(t, key)!r}")
    if any(m <= 0 for m in t.milestones) or t.milestones != sorted(t.milestones):
        raise SoftpruneError(
            f"config key 'train.milestones' must be increasing positive epochs, got {t.milestones}"
        )
    if not 0.0 <= p.rate < 1.0:
        raise SoftpruneError(f"config key 'prune.rate' must lie in [0, 1), got {p.rate!r}")
    positive("prune.every_epochs", p.every_epochs)
    if p.compact_during_training and p.every_iterations is not None:
        raise SoftpruneError(
            "prune.compact_during_training works with pruning steps at epoch ends (prune.every_epochs), "
            "not with prune.every_iterations"
        )
    if p.finetune_epochs < 0 or (p.method != "dense" and p.finetune_epochs >= t.epochs):
        raise SoftpruneError(
            f"config key 'prune.finetune_epochs' must lie in 0..train.epochs-1 ({t.epochs - 1}), got "
            f"{p.finetune_epochs!r}: the epochs before it are where pruning steps happen"
        )
    if d.cutout < 0:
        raise SoftpruneError(f"config key 'data.cutout' must be >= 0 (pixels; 0 is off), got {d.cutout!r}")
    if p.recalibrate_bn < 0:
        raise SoftpruneError(f"config key 'prune.recalibrate_bn' must be >= 0, got {p.recalibrate_bn!r}")
    p.check(noun="config key", prefix="prune.")
    if p.method != "dense":
        from ..criteria import make_criterion
        from ..plugins import check_fits, make_plugin
        from ..plugins.regularizers import make_regularizer

        criterion = make_criterion(p.criterion, **p.criterion_options)
        make_regularizer(p.regularizer)
        # an unknown plugin or option fails here, before training starts
        plugins = [make_plugin(spec) for spec in p.plugins]
        if criterion.needs == "activations" and p.calibration_batches < 1:
            raise SoftpruneError(
                f"criterion {p.criterion!r} scores feature maps: prune.calibration_batches must be >= 1"
            )
        for plugin in plugins:
            check_fits(plugin, p.criterion, criterion.needs, p.every_iterations is not None)
    positive("prune.every_iterations", p.every_iterations, allow_none=True)
    positive("prune.min_steps", p.min_steps)
    positive("data.train_limit", d.train_limit, allow_none=True)
    positive("data.test_limit", d.test_limit, allow_none=True)
    positive("model.input_size", config.model.input_size, allow_none=True)
    positive("data.image_size", d.image_size, allow_none=True)
    if d.workers < 0:
        raise SoftpruneError(f"config key 'data.workers' must be >= 0, got {d.workers!r}")
    if config.model.checkpoint is not None and config.model.weights is not None:
        raise SoftpruneError(
            "set model.checkpoint or model.weights, not both: a run starts from one set of weights"
        )
    positive("checkpoint.every_epochs", config.checkpoint.every_epochs)
    positive("checkpoint.every_iterations", config.checkpoint.every_iterations, allow_none=True)
    positive("report.latency_batch", config.report.latency_batch)
    positive("report.latency_repeats", config.report.latency_repeats)
    pruning_epochs = t.epochs - p.finetune_epochs
    if (
        p.method != "dense"
        and p.every_iterations is None
        and pruning_epochs // p.every_epochs < 1
        and not p.initial_step
    ):
        raise SoftpruneError(
            f"prune.every_epochs={p.every_epochs} leaves no pruning step in the {pruning_epochs} epochs "
            "before fine-tuning (train.epochs - prune.finetune_epochs)"
        )
    if not config.name or "/" in config.name or config.name in (".", ".."):
        raise SoftpruneError(f"config key 'name' must be a plain folder name, got {config.name!r}")
    if not (t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:")):
        raise SoftpruneError(
            f"config key 'train.device' has value {t.device!r}; expected auto, cpu, cuda or cuda:N"
        )


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], parsed YAML value)."""
    if "=" not in text:
        raise SoftpruneError(f"an override looks like section.key=value (e.g. train.epochs=5), got {text!r}")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise SoftpruneError(f"bad override key {key!r}: expected section.key, e.g. prune.rate")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def merge(data: dict, overrides: list[str]) -> dict:
    data = dict(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise SoftpruneError(f"cannot set '{'.'.join(parts)}': '{part}' is not a section")
            node[part] = dict(child)
            node = node[part]
        node[parts[-1]] = value
    return data


def deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A YAML mapping; a top-level ``base: other.yaml`` (relative to this file) is read first and
    overridden key by key, so recipes share one base."""
    path = Path(path)
    if not path.is_file():
        raise SoftpruneError(f"config file {str(path)!r} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise SoftpruneError(f"config file {str(path)!r} is not valid YAML{where}") from None
    except UnicodeDecodeError:
        raise SoftpruneError(f"config file {str(path)!r} is not a text file") from None
    data = {} if data is None else data
    if isinstance(data, dict) and "base" in data:
        base = data.pop("base")
        if not isinstance(base, str):
            raise SoftpruneError(f"'base' in {str(path)!r} must be a file name, got {base!r}")
        base_path = (path.parent / base).resolve()
        if base_path in _seen or base_path == path.resolve():
            raise SoftpruneError(f"config file {str(path)!r} includes itself through 'base'")
        parent = read_yaml(base_path, (*_seen, path.resolve()))
        if not isinstance(parent, dict):
            raise SoftpruneError(f"base config {str(base_path)!r} must be a mapping of sections")
        data = deep_merge(parent, data)
    return data


def config_from_dict(data: Any, overrides: list[str] = ()) -> RunConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SoftpruneError(f"the config must be a mapping of sections, got {type(data).__name__}")
    data = merge(data, list(overrides))
    prune = data.get("prune")
    if isinstance(prune, dict) and ("tick_batches" in prune or "tick_lr" in prune):
        data = {**data, "prune": _tick_keys_as_plugin(prune)}
        prune = data["prune"]
    method = prune.get("method", PruneConfig.method) if isinstance(prune, dict) else None
    if isinstance(method, str) and method != "dense":
        if method not in METHODS:
            close = difflib.get_close_matches(method, ["dense", *METHODS], n=1)
            raise SoftpruneError(
                f"config key 'prune.method' has value {method!r}; expected one of 'dense', "
                + ", ".join(repr(m) for m in METHODS.names())
                + (f". Did you mean {close[0]!r}?" if close else "")
            )
        # a method's own settings first, then the config's: the same resolution as Pruner(method=...)
        recipe = get_method(method)
        data = {**data, "prune": recipe.resolve(prune)}
    config = _build(RunConfig, data, "")
    if config.prune.criterion is None:  # the method's, written out so that the saved config says what ran
        dense = config.prune.method == "dense"
        config.prune.criterion = "l2" if dense else get_method(config.prune.method).criterion
    if config.prune.min_steps is None:
        config.prune.min_steps = default_min_steps(config.prune.method)
    if config.prune.finetune_epochs is None:
        config.prune.finetune_epochs = default_finetune_epochs(config.prune.method, config.train.epochs)
    _validate(config)
    return config


def _tick_keys_as_plugin(prune: dict) -> dict:
    """Configs written before Tick became a plugin (run folders saved by softprune 0.1 keep them):
    ``tick_batches: N, tick_lr: lr`` read as ``plugins: [{kind: tick, batches: N, lr: lr}]``."""
    prune = dict(prune)
    batches, lr = prune.pop("tick_batches", 0), prune.pop("tick_lr", 0.01)
    if batches:
        tick = {"kind": "tick", "batches": batches, "lr": lr}
        prune["plugins"] = [*(prune.get("plugins") or []), tick]
    return prune


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (None: all defaults), apply overrides and validate."""
    data = read_yaml(path) if path is not None else {}
    return config_from_dict(data, overrides)
