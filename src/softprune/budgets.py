"""Budgets: how many units each group gives up at a pruning step.

The policy gives the step's rate P_t; the budget turns it into a count per group.

| kind     | P_t means                          | counts                                                        |
|----------|------------------------------------|---------------------------------------------------------------|
| layer    | the fraction of every group        | floor(N_g P_t) per group (the papers' layer-wise rate)         |
| global   | the fraction of all units          | the floor(P_t sum N_g) lowest units by normalized score        |
| macs     | the fraction of the model's MACs   | the fewest globally lowest units whose removal cuts P_t of MACs |
| params   | the fraction of the parameters     | the same, for parameters                                       |

Global kinds rank units across groups by scores normalized per group (``normalize``: "mean" divides
by the group's mean score, "max" by its maximum, "sum" by its sum, "l2" by the Euclidean norm of its
scores (FRS), "rank" uses the position in the
group's order, "none" compares raw scores; "auto" is "none" for criteria whose scores are comparable
across layers, such as BN scales and Taylor, and "mean" otherwise). No group gives up more than
``max_rate`` of its units. The MACs and parameter targets are solved by bisection on the number of
globally lowest units, against a cost model that is exact for convolutions, linear layers and
parameters (and scales an attention block's own matrix products with its input projection). Kept
widths can be rounded up to a multiple of ``round_to`` (8 or 16 suit tensor cores and SIMD lanes);
a group narrower than ``round_to`` is then left whole.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .cost import count_flops
from .errors import SoftpruneError, check_choice
from .graph import Analysis, ChannelGroup, Role
from .registry import Registry

log = logging.getLogger(__name__)

KINDS = ("layer", "global", "macs", "params")
NORMALIZERS = ("auto", "mean", "max", "sum", "l2", "rank", "none")


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

    def allocation(self) -> Allocation:
        """The allocation rule of this kind (ALLOCATIONS)."""
        return ALLOCATIONS[self.kind](self)


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
    elif how == "l2":
        scale = values.norm()
    else:
        scale = values.abs().sum()
    return s / scale.clamp(min=1e-12)


def most_removable(groups: list, held: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per group, every unit that is neither frozen nor held, but one: the most any budget removes."""
    out = []
    for group, h in zip(groups, held):
        free = torch.nonzero(~(group.frozen | h)).view(-1)
        out.append(free[: min(free.numel(), group.size - 1)])
    return out


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

    def _fractions(self, alive: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per tensor, the fraction kept: along each sliced dimension the share of its positions that
        are alive (``alive`` per id: booleans, or DMCP's keep probabilities), multiplied over dims."""
        out = {}
        for name, (_numel, shape, members) in self._tensors.items():
            keep: dict[int, torch.Tensor] = {}
            for member in members:
                flags = alive[member.unit]
                keep[member.dim] = flags if member.dim not in keep else keep[member.dim] * flags
            fraction = torch.ones((), dtype=torch.float64)
            for dim, flags in keep.items():
                fraction = fraction * flags.sum() / max(shape[dim], 1)
            out[name] = fraction
        return out

    def expected(self, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"macs", "params"} expected when each class c is kept with probability ``keep[c]``, the
        classes independently (DMCP's expected FLOPs): each tensor's kept fraction along a sliced
        dimension is the mean keep probability of its positions. Differentiable in ``keep``."""
        p = self.analysis.ids.survival(keep)
        fractions = self._fractions(p)
        macs = sum(m * (fractions[w] if w is not None else 1.0) for m, w in self._macs)
        params = self.dense_params - sum(
            numel * (1.0 - fractions[name]) for name, (numel, _, _) in self._tensors.items()
        )
        return {"macs": macs, "params": params}

    def cost(self, pruned_classes: torch.Tensor) -> dict[str, float]:
        """{"macs", "params"} per sample of the model with ``pruned_classes`` removed (estimates)."""
        alive = self.analysis.ids.alive(pruned_classes)
        fractions = {name: float(f) for name, f in self._fractions(alive).items()}
        macs = sum(m * (fractions[w] if w is not None else 1.0) for m, w in self._macs)
        params = self.dense_params - sum(
            numel * (1.0 - fractions[name]) for name, (numel, _, _) in self._tensors.items()
        )
        return {"macs": macs, "params": params}


# -- allocation: from a step's rate and the groups' rankings to the units each group gives up --------


def floor_count(x: float) -> int:
    return int(math.floor(x + 1e-9))  # 10 * 0.3 is 2.9999999999999996 in floating point


@dataclass
class Quota:
    """Unit sets that selection must respect in one group: bool ``owners`` [rows, units]; per row,
    whether it is a producer (which loses at most floor(rate * width) units) or a consumer that reads
    only part of the group (a chunk of it: it must keep at least one unit, or it would have no input
    left); each row's (is producer, module name); and the units each row lost to compaction during
    training (quotas keep counting from the original widths)."""

    owners: torch.Tensor
    is_producer: torch.Tensor
    names: list[tuple[bool, str]]
    gone: torch.Tensor = field(default=None)  # long [rows]

    def __post_init__(self) -> None:
        if self.gone is None:
            self.gone = torch.zeros(self.owners.shape[0], dtype=torch.long)

    @classmethod
    def of(cls, group: ChannelGroup) -> Quota:
        rows, names = [], []
        for role, modules in ((Role.FILTER, group.producers), (Role.CONSUMER, group.consumers)):
            for name in modules:
                row = torch.zeros(group.size, dtype=torch.bool)
                for member in group.members_with(role):
                    if member.module == name:
                        row[member.unit[member.unit >= 0]] = True
                if role is Role.CONSUMER and bool(row.all()):
                    continue  # reads the whole group: "never all units" already covers it
                rows.append(row)
                names.append((role is Role.FILTER, name))
        if not rows:
            return cls(torch.zeros(0, group.size, dtype=torch.bool), torch.zeros(0, dtype=torch.bool), [])
        return cls(torch.stack(rows), torch.tensor([n[0] for n in names]), names)

    def after_compaction(self, group: ChannelGroup, removed: torch.Tensor) -> Quota:
        """The quota of ``group`` (the smaller model's) once the units ``removed`` here are gone."""
        lost = {
            name: int(self.gone[r]) + int((self.owners[r] & removed).sum())
            for r, name in enumerate(self.names)
        }
        fresh = Quota.of(group)
        fresh.gone = torch.tensor([lost.get(n, 0) for n in fresh.names], dtype=torch.long)
        return fresh

    def pick(
        self, order: torch.Tensor, hard: torch.Tensor, frozen: torch.Tensor, rate: float, n_sel: int
    ) -> torch.Tensor:
        """The first ``n_sel`` units of ``order`` such that no producer layer loses more than
        floor(rate * its width) channels, and no layer loses all of its channels or inputs.

        A group whose producers own different subsets of its units (a residual stream widened by a
        zero-padding shortcut: stage-1 channels are a subset of stage 2's), or whose consumers read
        parts of it (ShuffleNet's chunks), would otherwise let the ranking empty a narrow layer. With
        one producer reading and writing everything this is simply the first n_sel units.
        """
        owners, is_producer, gone = self.owners, self.is_producer, self.gone
        if owners.shape[0] <= 1 and bool(is_producer.all()) and not bool(gone.any()):
            return order[~frozen[order]][:n_sel]
        width = owners.sum(1)
        quota = torch.where(is_producer, torch.floor((width + gone) * rate + 1e-9).long() - gone, width)
        quota = torch.minimum(quota, width - 1).clamp(min=0)
        # Rows owning the same units are one constraint (a residual stream's producers): the tightest.
        limit_of: dict[bytes, int] = {}
        distinct: dict[bytes, np.ndarray] = {}
        for row, q in zip(owners.numpy(), quota.tolist()):
            key = row.tobytes()
            distinct.setdefault(key, row)
            limit_of[key] = min(q, limit_of.get(key, q))
        columns = np.stack(list(distinct.values())).T.tolist()
        rows_of = [[r for r, owned in enumerate(column) if owned] for column in columns]
        limit, used = list(limit_of.values()), [0] * len(limit_of)
        frozen_list, hard_list = frozen.tolist(), hard.tolist()
        picked = []
        for u in order.tolist():  # plain Python: one pass over a few thousand units at most
            if len(picked) >= n_sel:
                break
            if frozen_list[u]:
                continue
            if not hard_list[u] and any(used[r] >= limit[r] for r in rows_of[u]):
                continue
            picked.append(u)
            for r in rows_of[u]:
                used[r] += 1
        return torch.tensor(picked, dtype=torch.long)


@dataclass
class Candidates:
    """One group as allocation sees it at a step: widths now and as built, units removed by
    compaction during training, frozen and hard units, HFP's first selection, its quota, and its
    units ranked (hard first, then the first selection, then the criterion's order; frozen last)."""

    size: int
    original: int
    gone: int
    frozen: torch.Tensor
    hard: torch.Tensor
    first: torch.Tensor | None
    quota: Quota
    order: torch.Tensor
    score: torch.Tensor


def prioritized(
    order: torch.Tensor, hard: torch.Tensor, first: torch.Tensor | None, frozen: torch.Tensor
) -> torch.Tensor:
    """A group's units in selection order: hard units first, then HFP's first selection (``first``,
    None when the policy does not keep it), then the criterion's ``order``; frozen units last."""
    n = order.numel()
    priority = torch.zeros(n)
    priority[hard] = -2
    if first is not None:
        priority[first & ~hard] = -1
    priority[frozen] = 1
    position = torch.empty(n, dtype=torch.long)
    position[order] = torch.arange(n)
    return torch.argsort(priority * (n + 1) + position.float(), stable=True)


def layer_counts(c: Candidates, rate: float, hardness: float, round_to: int) -> tuple[int, int]:
    """(selected, hard) units of a group under a layer-wise rate (the papers' counts)."""
    n0, n = c.original, c.size
    n_sel = min(floor_count(n0 * rate) - c.gone, int((~c.frozen).sum()), n - 1)
    n_hard = min(floor_count(n0 * rate * hardness) - c.gone, n_sel)
    n_hard = max(n_hard, int(c.hard.sum()), 0)  # hard units never come back
    n_sel = max(n_sel, n_hard, 0)
    n_sel = max(rounded_count(n, n_sel, round_to), n_hard)
    return n_sel, n_hard


Plan = list[tuple[torch.Tensor, int]]  # per group: the selected units (hard ones first) and how many are hard


class Allocation:
    """How a budget kind turns a step's rate into each group's selection."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget

    def allocate(
        self,
        groups: list[Candidates],
        rate: float,
        hardness: float,
        *,
        comparable: bool,
        cost: Callable[[list[torch.Tensor]], dict[str, float]] | None = None,
        dense_cost: dict[str, float] | None = None,
    ) -> Plan:
        """``comparable``: the criterion's scores compare across layers (normalize "auto");
        ``cost(picked)``: the model's cost with the picked units gone (MACs and params budgets)."""
        raise NotImplementedError  # pragma: no cover


class LayerAllocation(Allocation):
    """floor(N_g P_t) per group (the papers' layer-wise rate)."""

    def allocate(self, groups, rate, hardness, *, comparable, cost=None, dense_cost=None) -> Plan:
        plans = []
        for c in groups:
            n_sel, n_hard = layer_counts(c, rate, hardness, self.budget.round_to)
            plans.append((c.quota.pick(c.order, c.hard, c.frozen, rate, n_sel), n_hard))
        return plans


class GlobalAllocation(Allocation):
    """Units compete across groups by normalized score for a share of all units."""

    def allocate(self, groups, rate, hardness, *, comparable, cost=None, dense_cost=None) -> Plan:
        counts = self.counts(groups, rate, comparable, cost, dense_cost)
        plans = []
        for c, n_sel in zip(groups, counts):
            picked = c.quota.pick(c.order, c.hard, c.frozen, self.budget.max_rate, n_sel)
            n_hard = max(
                min(floor_count((picked.numel() + c.gone) * hardness) - c.gone, picked.numel()),
                int(c.hard.sum()),
                0,
            )
            plans.append((picked, n_hard))
        return plans

    def merged(self, groups: list[Candidates], comparable: bool):
        """Every free unit in one sequence, lowest normalized score first, and per group the most and
        the fewest units it may give up; ``counts_for(k, sequence)`` the counts of taking k of them."""
        how = self.budget.normalize
        if how == "auto":
            how = "none" if comparable else "mean"
        keys, owners, caps, floors = [], [], [], []
        for i, c in enumerate(groups):
            free = ~c.frozen
            key = normalized(c.score, free, c.order, how)
            if c.first is not None:
                key[c.first] = -1e30
            key[c.hard] = -math.inf
            ranked = c.order[free[c.order]]
            along = torch.cummax(key[ranked].double(), 0).values  # monotone along the group's order
            keys.append(along)
            owners.append(torch.full((ranked.numel(),), i, dtype=torch.long))
            cap = min(floor_count(c.original * self.budget.max_rate) - c.gone, int(free.sum()), c.size - 1)
            floors.append(int(c.hard.sum()))
            caps.append(max(cap, floors[-1]))
        key_all = torch.cat(keys) if keys else torch.zeros(0)
        owner_all = torch.cat(owners) if owners else torch.zeros(0, dtype=torch.long)
        merged = owner_all[torch.argsort(key_all, stable=True)]

        def counts_for(k: int, sequence: torch.Tensor = merged) -> list[int]:
            taken = torch.bincount(sequence[:k], minlength=len(groups)).tolist()
            out = []
            for i, n in enumerate(taken):
                n = max(min(n, caps[i]), floors[i])
                out.append(max(rounded_count(groups[i].size, n, self.budget.round_to), floors[i]))
            return out

        return merged, counts_for

    def counts(self, groups, rate, comparable, cost, dense_cost) -> list[int]:
        _, counts_for = self.merged(groups, comparable)
        total = sum(c.original for c in groups)
        gone = sum(c.gone for c in groups)
        return counts_for(max(floor_count(total * rate) - gone, 0))


class CostAllocation(GlobalAllocation):
    """The fewest globally lowest units whose removal cuts P_t of the MACs (or parameters): a
    bisection on how many, then a local search where one channel overshoots the target."""

    def counts(self, groups, rate, comparable, cost, dense_cost) -> list[int]:
        merged, counts_for = self.merged(groups, comparable)
        kind = self.budget.kind
        target = (1.0 - rate) * dense_cost[kind]

        def cost_of(counts: list[int]) -> float:
            picked = [
                c.quota.pick(c.order, c.hard, c.frozen, self.budget.max_rate, n)
                for c, n in zip(groups, counts)
            ]
            return cost(picked)[kind]

        def meeting(sequence: torch.Tensor) -> tuple[int, float]:
            return smallest_meeting(lambda k: cost_of(counts_for(k, sequence)), target, int(sequence.numel()))

        k, achieved = meeting(merged)
        if achieved > target * (1 + 1e-9) and rate > 0:
            log.warning(
                "the %s target (%.1f%% fewer) cannot be met with max_rate=%.2f; pruning as far as it allows "
                "(%.1f%% fewer)", kind, 100 * rate, self.budget.max_rate, 100 * (1 - achieved / dense_cost[kind])
            )  # fmt: skip
            return counts_for(k)
        # One channel can be several percent of the cost (a residual stream's channel spans every
        # block), so the channel that crosses the target may overshoot it. Then its group stops
        # before it and the following channels of the other groups close the gap; the candidate that
        # lands closest to the target wins.
        best, best_counts, sequence = achieved, counts_for(k), merged
        for _ in range(3):
            if k == 0 or target - best <= 1e-3 * dense_cost[kind]:
                break
            crossing, rest = sequence[k - 1], sequence[k:]
            sequence = torch.cat([sequence[: k - 1], rest[rest != crossing]])
            k, achieved = meeting(sequence)
            if achieved > target * (1 + 1e-9):
                break
            if achieved > best:
                best, best_counts = achieved, counts_for(k, sequence)
        return best_counts


# budget kind -> its allocation; Budget checks its kind against KINDS, which lists these
ALLOCATIONS: Registry[type[Allocation]] = Registry("budget kind")
for _kind, _cls in (("layer", LayerAllocation), ("global", GlobalAllocation), ("macs", CostAllocation),
                    ("params", CostAllocation)):  # fmt: skip
    ALLOCATIONS.register(_kind, _cls)
