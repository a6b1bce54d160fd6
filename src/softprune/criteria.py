"""Criteria: how important each unit of a group is.

A criterion maps a group (and the model holding its weights) to one score per unit; lower scores are
pruned first. ``rank`` orders the units for a selection of ``n`` units; most criteria rank by score,
FPGM-mix splits the selection between norm and distance as the paper's code does.

Scores of a group with several producers (a coupled residual stream) aggregate the per-layer scores
of the units: ``mean`` (default), ``sum``, ``max``, or ``first`` (the first producer only). A unit
absent from a layer does not count in that layer's aggregate.

| name       | paper                                | score of a unit                                  |
|------------|--------------------------------------|--------------------------------------------------|
| l1         | Li et al., ICLR 2017 (PFEC)          | sum of absolute filter weights                   |
| l2         | He et al., IJCAI 2018 (SFP)          | Euclidean norm of the filter weights             |
| fpgm       | He et al., CVPR 2019 (FPGM)          | sum of distances to the other filters            |
| fpgm_mix   | He et al., CVPR 2019 (FPGM code)     | a share of the selection by L2, the rest by FPGM |
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .errors import SoftpruneError, choice_error
from .groups import ChannelGroup, Member, Role

AGGREGATES = ("mean", "sum", "max", "first")


class Criterion:
    """Base class. ``needs`` says what the criterion reads: "weights", "activations" or "gradients"."""

    name = "criterion"
    needs = "weights"

    def __init__(self, aggregate: str = "mean") -> None:
        if aggregate not in AGGREGATES:
            raise choice_error("aggregate", aggregate, AGGREGATES)
        self.aggregate = aggregate

    def scores(self, group: ChannelGroup, model: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def rank(self, group: ChannelGroup, model: nn.Module, n: int) -> torch.Tensor:
        """Unit indices, least important first (only the first ``n`` are used by the caller)."""
        return torch.argsort(self.scores(group, model), stable=True)

    def options(self) -> dict:
        return {"aggregate": self.aggregate}

    # -- helpers shared by weight criteria ------------------------------------------------------
    def _per_member(
        self, group: ChannelGroup, model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        members = group.members_with(Role.FILTER)
        if not members:
            raise SoftpruneError(f"group '{group.name}' has no filters to score")
        if self.aggregate == "first":
            members = members[:1]
        values, present = [], []
        for member in members:
            rows = group.unit_matrix(model, member).float()
            values.append(fn(rows))
            present.append(_present(group, member))
        v = torch.stack(values)
        p = torch.stack(present)
        if self.aggregate == "max":
            return v.masked_fill(~p, -math.inf).amax(0)
        total = (v * p).sum(0)
        if self.aggregate == "sum":
            return total
        return total / p.sum(0).clamp(min=1)


def _present(group: ChannelGroup, member: Member) -> torch.Tensor:
    found = torch.zeros(group.size, dtype=torch.bool)
    unit = member.unit[member.unit >= 0]
    found[unit] = True
    return found


class L1(Criterion):
    name = "l1"

    def scores(self, group, model):
        return self._per_member(group, model, lambda rows: rows.abs().sum(1))


class L2(Criterion):
    name = "l2"

    def scores(self, group, model):
        return self._per_member(group, model, lambda rows: rows.norm(dim=1))


def _distance_sums(rows: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "l2":
        d = torch.cdist(rows[None], rows[None])[0]
    elif metric == "l1":
        d = torch.cdist(rows[None], rows[None], p=1)[0]
    else:  # cosine distance
        unit = rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-12)
        d = 1 - unit @ unit.T
    return d.sum(1)


METRICS = ("l2", "l1", "cosine")


class FPGM(Criterion):
    """Filters near the geometric median of their layer are the most replaceable: g(F_i) = sum_j ||F_i - F_j||."""

    name = "fpgm"

    def __init__(self, aggregate: str = "mean", metric: str = "l2") -> None:
        super().__init__(aggregate)
        if metric not in METRICS:
            raise choice_error("fpgm metric", metric, METRICS)
        self.metric = metric

    def scores(self, group, model):
        return self._per_member(group, model, lambda rows: _distance_sums(rows, self.metric))

    def options(self) -> dict:
        return {**super().options(), "metric": self.metric}


class FPGMMix(FPGM):
    """The FPGM code's two stages: ``norm_fraction`` of the selection by smallest L2 norm, then the
    rest by smallest distance sum among the remaining filters. FPGM-mix 40% (10% by norm and 30% by
    distance) is norm_fraction = 0.25."""

    name = "fpgm_mix"

    def __init__(self, aggregate: str = "mean", metric: str = "l2", norm_fraction: float = 0.25) -> None:
        super().__init__(aggregate, metric)
        if not 0.0 <= norm_fraction <= 1.0:
            raise SoftpruneError(f"norm_fraction must lie in [0, 1], got {norm_fraction}")
        self.norm_fraction = norm_fraction

    def rank(self, group, model, n):
        norms = L2(self.aggregate).scores(group, model)
        n_norm = int(math.floor(n * self.norm_fraction + 1e-9))
        by_norm = torch.argsort(norms, stable=True)
        first = by_norm[:n_norm]
        rest = by_norm[n_norm:]
        keep = torch.ones(group.size, dtype=torch.bool)
        keep[first] = False

        def among_rest(rows: torch.Tensor) -> torch.Tensor:
            out = torch.full((rows.shape[0],), math.inf)
            out[keep] = _distance_sums(rows[keep], self.metric)
            return out

        dist = self._per_member(group, model, among_rest)
        rest = rest[torch.argsort(dist[rest], stable=True)]
        return torch.cat([first, rest])

    def scores(self, group, model):
        order = self.rank(group, model, group.size)
        scores = torch.empty(group.size)
        scores[order] = torch.arange(group.size, dtype=torch.float)
        return scores

    def options(self) -> dict:
        return {**super().options(), "norm_fraction": self.norm_fraction}


CRITERIA: dict[str, type[Criterion]] = {c.name: c for c in (L1, L2, FPGM, FPGMMix)}


def make_criterion(name: str | Criterion, **options) -> Criterion:
    """A criterion by name with its options (aggregate=, metric=, norm_fraction=)."""
    if isinstance(name, Criterion):
        return name
    if name not in CRITERIA:
        raise choice_error("criterion", name, CRITERIA)
    cls = CRITERIA[name]
    try:
        return cls(**options)
    except TypeError as exc:
        raise SoftpruneError(f"criterion {name!r} does not take these options: {options}") from exc


def register_criterion(cls: type[Criterion]) -> type[Criterion]:
    """Add a criterion class (usable as a decorator); it is then available by ``cls.name``."""
    CRITERIA[cls.name] = cls
    return cls
