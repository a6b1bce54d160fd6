"""The pruning settings, declared once: the keyword settings of :class:`softprune.Pruner` and the
``prune`` section of a run config (which adds the training-side keys: method, rate, when to step).

A setting is a field of :class:`PruneSettings` with its type, default and a comment; the same typed
check reads it from Python keywords and from YAML, so a bad value gets the same message from both
(naming the setting, the value and what is allowed), and a new setting is one new field.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from .budgets import Budget, make_budget
from .criteria import Criterion, make_criterion
from .errors import SoftpruneError
from .plugins import Plugin
from .plugins.regularizers import Regularizer, make_regularizer
from .schedules import Schedule


@dataclass
class PruneSettings:
    """What to prune and how, apart from the method, the rate and when the steps happen."""

    # None: the method's (l2; l2_bn for ghfp; the literature methods' own); a name, a mapping
    # {kind: name, **options} or a Criterion
    criterion: str | dict[str, Any] | Criterion | None = None
    criterion_options: dict[str, Any] = field(default_factory=dict)  # e.g. {aggregate: sum}, {alpha: 0.25}
    # coupled: one mask across a residual stream (the stream narrows too; the fastest compact model);
    # independent: each branch prunes its own filters and adds its kept channels back at their indices
    residual: Literal["coupled", "independent"] = "coupled"
    # producer layers that may be pruned: None = every convolution (the papers' choice), and also the
    # hidden Linear layers and attention heads when most of the model's MACs are outside convolutions
    # (a ViT, Swin, ConvNeXt); "all" (every convolution, Linear, attention and embedding layer); names,
    # glob or "re:" patterns, or (from Python) module types
    layers: Literal["all"] | list[str | type] | None = None
    ignore: list[str] = field(default_factory=list)  # modules kept whole (names or patterns)
    mask_scope: Literal["channel", "filter"] = "channel"  # filter: the papers' code, conv weights only
    # the preset's knobs, overridden (softprune.policy.make_policy)
    rate_schedule: str | dict[str, Any] | None = None
    decay: float | str | dict[str, Any] | Schedule | None = None
    hardness: float | str | dict[str, Any] | Schedule | None = None
    keep_first: bool | None = None
    # how P_t becomes counts (softprune.budgets): per layer, or units competing across layers for a
    # share of all units, of the MACs or of the parameters; a mapping or Budget sets the three below too
    budget: Literal["layer", "global", "macs", "params"] | dict[str, Any] | Budget = "layer"
    max_rate: float = 0.9  # global budgets: the most any group may lose
    round_to: int = 1  # kept widths rounded up to a multiple of this
    normalize: Literal["auto", "mean", "max", "sum", "l2", "rank", "none"] = "auto"
    # calibration batches read before each step by criteria that score feature maps (hrank, ezcrop,
    # similarity), gradient criteria scored on calibration data, and activation compensation
    calibration_batches: int = 5
    # after units become hard, fold their contribution into the next layers by least squares
    # (true: from activations when there is calibration data, else from the filters)
    compensate: Literal["none", "activations", "weights"] | bool = "none"
    # a penalty added to the gradients before every optimizer step: bn_l1, greg1, greg2, or a
    # mapping {kind: ..., options}
    regularizer: str | dict[str, Any] | Regularizer | None = None
    # what else the method adds to training (softprune.plugins): names, mappings {kind: ..., options}
    # or (from Python) Plugin objects; a method's own come first
    plugins: list[str | dict[str, Any] | Plugin] = field(default_factory=list)

    def check(self, noun: str = "Pruner setting", prefix: str = "") -> None:
        """Range checks the types cannot say; messages name the key as ``noun 'prefix+key'``."""

        def fail(key: str, what: str) -> SoftpruneError:
            return SoftpruneError(f"{noun} '{prefix}{key}' must {what}, got {getattr(self, key)!r}")

        if not 0.0 < self.max_rate < 1.0:
            raise fail("max_rate", "lie in (0, 1) (the most any layer may lose)")
        if self.round_to < 1:
            raise fail("round_to", "be a positive integer (1: no rounding)")
        if self.calibration_batches < 0:
            raise fail("calibration_batches", "be an integer >= 0")

    def make_budget(self) -> Budget:
        """The budget, with the flat max_rate, round_to and normalize under a mapping's own keys."""
        if isinstance(self.budget, Budget):
            return self.budget
        flat = {"max_rate": self.max_rate, "round_to": self.round_to, "normalize": self.normalize}
        spec = {"kind": self.budget} if isinstance(self.budget, str) else dict(self.budget)
        return make_budget({**flat, **spec})

    def make_criterion(self, default: str | dict | Criterion) -> Criterion:
        return make_criterion(default if self.criterion is None else self.criterion, **self.criterion_options)

    def make_regularizer(self) -> Regularizer | None:
        return make_regularizer(self.regularizer)

    def compensation_source(self, have_calibration: bool) -> str | None:
        """None, "activations" or "weights"."""
        value = self.compensate
        if value is True:
            return "activations" if have_calibration else "weights"
        return None if value in (False, "none") else value


# -- typed dataclasses from plain values (YAML or Python keywords) -------------------------------


def describe(tp: Any) -> str:
    """What a value of type ``tp`` looks like, in words."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if origin is type or tp is type:
        return "a module type"
    words = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if tp in words:
        return words[tp]
    if tp is Any:
        return "anything"
    return f"a {getattr(tp, '__name__', str(tp))}"


def convert(value: Any, tp: Any) -> Any:
    """The value converted to ``tp``, or raise ValueError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            return value
        raise ValueError
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return convert(value, option)
            except ValueError:
                continue
        raise ValueError
    if tp is type(None):
        if value is None:
            return None
        raise ValueError
    if origin is list:
        if not isinstance(value, list):
            raise ValueError
        (inner,) = typing.get_args(tp)
        return [convert(v, inner) for v in value]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ValueError
        return dict(value)
    if tp is type:
        if isinstance(value, type):
            return value
        raise ValueError
    if tp is bool or tp is str:
        if isinstance(value, tp):
            return value
        raise ValueError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError
    if isinstance(tp, type) and isinstance(value, tp):  # an object already built (a Criterion, ...)
        return value
    raise ValueError


def build_dataclass(cls: type, data: Any, path: str = "", noun: str = "config key") -> Any:
    """``cls(**data)`` with every value checked against the field's type; nested dataclasses are
    built from nested mappings. An unknown key names the closest valid one."""
    if not isinstance(data, dict):
        where = f"section '{path}'" if path else "the config"
        raise SoftpruneError(
            f"{where} must be a mapping of keys to values, got {type(data).__name__}: {data!r}"
        )
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean '{path + '.' if path else ''}{close[0]}'?" if close else ""
            raise SoftpruneError(f"unknown {noun} '{full}'.{hint} Valid keys here: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build_dataclass(tp, value, full, noun)
            continue
        try:
            kwargs[key] = convert(value, tp)
        except ValueError:
            raise SoftpruneError(f"{noun} '{full}' has value {value!r}; expected {describe(tp)}") from None
    return cls(**kwargs)
