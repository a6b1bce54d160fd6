"""Budgets: how many units each group gives up at a pruning step.

The policy gives the step's rate P_t; the budget turns it into a count per group.

| kind     | P_t means                          | counts                                                        |
|----------|------------------------------------|---------------------------------------------------------------|
| layer    | the fraction of every group        | floor(N_g P_t) per group (the papers' layer-wise rate)         |
| global   | the fraction of all units          | the floor(P_t sum N_g) lowest units by normalized score        |
| macs     | the fraction of the model's MACs   | the fewest globally lowest units whose removal cuts P_t of MACs |
| params   | the fraction of the parameters     | the same, for parameters                                       |

Global kinds rank units across groups by scores normalized per group (``normalize``: "mean" divides
by the group's mean score, "max" by its maximum, "sum" by its sum, "rank" uses the position in the
group's order, "none" compares raw scores; "auto" is "none" for criteria whose scores are comparable
across layers, such as BN scales and Taylor, and "mean" otherwise). No group gives up more than
``max_rate`` of its units. The MACs and parameter targets are solved by bisection on the number of
globally lowest units, against a cost model that is exact for convolutions, linear layers and
parameters (and scales an attention block's own matrix products with its input projection). Kept
widths can be rounded up to a multiple of ``round_to`` (8 or 16 suit tensor cores and SIMD lanes);
a group narrower than ``round_to`` is then left whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .cost import count_flops
from .errors import SoftpruneError, check_choice
from .graph import Analysis

KINDS = ("layer", "global", "macs", "params")
NORMALIZERS = ("auto", "mean", "max", "sum", "rank", "none")


@dataclass(frozen=True)
class Budget:
    kind: str = "layer"
    max_rate: float = 0.9
    round_to: int = 1
    normalize: str = "auto"

    def __post_init__(self) -> None:
        check_choice("budget", self.kind, KINDS)
        check_choice("normalize", self.normalize, NORMALIZERS)
        if isinstance(self.max_rate, bool) or not isinstance(self.max_rate, (int, float)):
            raise SoftpruneError(f"max_rate must be a number in (0, 1), got {self.max_rate!r}")
        if not 0.0 < float(self.max_rate) < 1.0:
            raise SoftpruneError(
                f"max_rate must lie in (0, 1) (the most any layer may lose), got {self.max_rate}"
            )
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise SoftpruneError(
                f"round_to must be a positive integer (1: no rounding), got {self.round_to!r}"
            )

    @property
    def is_global(self) -> bool:
        return self.kind != "layer"

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def make_budget(budget: str | dict | Budget | None) -> Budget:
    """A Budget from a kind name, a mapping {"kind": ..., "max_rate": ..., "round_to": ..., ...}, or None."""
    if budget is None:
        return Budget()
    if isinstance(budget, Budget):
        return budget
    if isinstance(budget, str):
        return Budget(kind=budget)
    if isinstance(budget, dict):
        unknown = set(budget) - {"kind", "max_rate", "round_to", "normalize"}
        if unknown:
            raise SoftpruneError(
                f"budget has no option {sorted(unknown)[0]!r}; its options are: kind, max_rate, round_to, normalize"
            )
        return Budget(**budget)
    raise SoftpruneError(f"budget must be a kind ({', '.join(KINDS)}) or a mapping, got {budget!r}")


def normalized(scores: torch.Tensor, free: torch.Tensor, order: torch.Tensor, how: str) -> torch.Tensor:
    """Scores made comparable across groups (see the module docstring)."""
    s = scores.float()
    if how == "none":
        return s.clone()
    if how == "rank":
        out = torch.empty_like(s)
        out[order] = torch.arange(s.numel(), dtype=s.dtype) / max(s.numel(), 1)
        return out
    values = s[free & torch.isfinite(s)]
    if values.numel() == 0:
        return s.clone()
    if how == "mean":
        scale = values.abs().mean()
    elif how == "max":
        scale = values.abs().max()
    else:
        scale = values.abs().sum()
    return s / scale.clamp(min=1e-12)


def rounded_count(size: int, n_sel: int, multiple: int) -> int:
    """The largest count <= n_sel that leaves a multiple of ``multiple`` units (or all of them)."""
    if multiple <= 1 or n_sel <= 0:
        return n_sel
    kept = size - n_sel
    kept = min(size, math.ceil(kept / multiple) * multiple)
    return size - kept


def smallest_meeting(cost: Callable[[int], float], target: float, high: int) -> tuple[int, float]:
    """The smallest k in [0, high] with cost(k) <= target, by bisection (cost does not increase with k).
    If none does, ``high`` and its cost."""
    c_high = cost(high)
    if c_high > target:
        return high, c_high
    lo, hi = 0, high  # cost(hi) <= target
    c_lo = cost(lo)
    if c_lo <= target:
        return 0, c_lo
    best = c_high
    while hi - lo > 1:
        mid = (lo + hi) // 2
        c = cost(mid)
        if c <= target:
            hi, best = mid, c
        else:
            lo = mid
    return hi, best


class CostModel:
    """MACs and parameters of the model as compaction would leave it, without compacting.

    A convolution's or linear layer's MACs are proportional to the number of elements of its weight
    (output positions stay), so each module's measured MACs scale with the fraction of its weight that
    survives; parameters scale per tensor the same way. The fractions come from the channel graph's
    members, exactly as compaction slices them.
    """

    def __init__(self, model: nn.Module, analysis: Analysis, example_inputs: tuple) -> None:
        self.analysis = analysis
        batch = example_inputs[0].shape[0] if isinstance(example_inputs[0], torch.Tensor) else 1
        counter = count_flops(model, example_inputs)
        root = type(model).__name__
        totals = {
            ("" if name == root else name[len(root) + 1 :]): sum(ops.values())
            for name, ops in counter.get_flop_counts().items()
            if name != "Global"
        }
        # each module's own MACs: its count minus its counted children's
        own = dict(totals)
        for name, flops in totals.items():
            if name:
                parent = name.rsplit(".", 1)[0] if "." in name else ""
                while parent not in totals and parent:
                    parent = parent.rsplit(".", 1)[0] if "." in parent else ""
                if parent in own:
                    own[parent] -= flops
        self.dense_macs = counter.get_total_flops() // 2 // max(batch, 1)
        # per tensor: its numel and the members slicing it
        by_tensor: dict[str, list] = {}
        for member in analysis.members:
            if member.dim is None:
                continue
            by_tensor.setdefault(member.qualname, []).append(member)
        self._tensors: dict[str, tuple[int, tuple[int, ...], list]] = {}
        params = dict(model.named_parameters())
        for name, members in by_tensor.items():
            if name in params:
                p = params[name]
                self._tensors[name] = (p.numel(), tuple(p.shape), members)
        self.dense_params = sum(p.numel() for p in model.parameters())
        # modules whose own MACs follow one of their weights
        self._macs: list[tuple[float, str | None]] = []
        for name, flops in own.items():
            if flops <= 0:
                continue
            weight = None
            for attr in ("weight", "in_proj_weight"):
                key = f"{name}.{attr}" if name else attr
                if key in self._tensors:
                    weight = key
                    break
            self._macs.append((flops / 2 / max(batch, 1), weight))

    def _fractions(self, alive: torch.Tensor) -> dict[str, float]:
        out = {}
        for name, (_numel, shape, members) in self._tensors.items():
            keep: dict[int, torch.Tensor] = {}
            for member in members:
                flags = alive[member.unit]
                keep[member.dim] = flags if member.dim not in keep else keep[member.dim] & flags
            fraction = 1.0
            for dim, flags in keep.items():
                fraction *= float(flags.sum()) / max(shape[dim], 1)
            out[name] = fraction
        return out

    def cost(self, pruned_classes: torch.Tensor) -> dict[str, float]:
        """{"macs", "params"} per sample of the model with ``pruned_classes`` removed (estimates)."""
        alive = self.analysis.ids.alive(pruned_classes)
        fractions = self._fractions(alive)
        macs = sum(m * (fractions[w] if w is not None else 1.0) for m, w in self._macs)
        params = self.dense_params - sum(
            numel * (1.0 - fractions[name]) for name, (numel, _, _) in self._tensors.items()
        )
        return {"macs": macs, "params": params}
