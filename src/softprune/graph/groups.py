"""Channel groups: what is pruned together, and which parameter slices each pruned channel owns.

A *unit* is one prunable channel: a class of channel ids that the graph analysis joined (a filter,
or the same channel index across every layer that writes into one residual stream). A *group* is the
set of units that share producer layers; criteria rank units within a group and the policy prunes a
fraction of each group.

Each group lists its *members*: a parameter (or buffer), the dimension along which it is sliced,
and for every position along that dimension the unit it belongs to (-1 where the position belongs
to another group or to none). Roles say how masks treat the slice (docs/design.md, "Masks").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import nn


class Role(str, Enum):
    FILTER = "filter"  # a producer's output rows: the "filter" of the papers
    ADDITIVE = "additive"  # biases and shifts after the filter (zero when the channel is off)
    SCALE = "scale"  # multiplicative per-channel parameters (BN scale, depthwise weights)
    MEAN = "mean"  # BatchNorm running mean
    VAR = "var"  # BatchNorm running variance
    CONSUMER = "consumer"  # a consumer's input columns; never masked, removed by compaction


@dataclass
class Member:
    """One parameter slice family of a group.

    ``unit`` has one entry per position along ``dim`` (or, when ``dim`` is None, the parameter's own
    shape: every element is assigned, for parameters used outside modules such as position embeddings).
    """

    module: str
    param: str
    dim: int | None
    unit: torch.Tensor
    role: Role
    _in_order: bool | None = field(default=None, init=False, repr=False, compare=False)

    def in_order(self, size: int) -> bool:
        """Is position i unit i, for all ``size`` units of the group (a plain layer's filters, a
        BatchNorm's channels)? Masks then slice with the units' own indices."""
        if self._in_order is None:
            self._in_order = self.dim is not None and torch.equal(self.unit, torch.arange(self.unit.numel()))
        return self._in_order and self.unit.numel() == size

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.param}" if self.module else self.param

    def tensor(self, model: nn.Module) -> torch.Tensor:
        owner = model
        if self.module:  # the _modules walk of get_submodule without its checks: masks call this a lot
            for part in self.module.split("."):
                owner = owner._modules.get(part)
                if owner is None:
                    owner = model.get_submodule(self.module)  # raises the usual error
                    break
        found = owner._parameters.get(self.param)
        return found if found is not None else getattr(owner, self.param)

    def factor(self, per_unit: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """A multiplier broadcastable to the parameter: per_unit[u] at u's positions, 1 elsewhere."""
        full = torch.cat([per_unit, per_unit.new_ones(1)])  # index -1 -> 1
        values = full[self.unit]
        if self.dim is None:
            return values
        view = [1] * len(shape)
        view[self.dim] = shape[self.dim]
        return values.view(view)


@dataclass
class ChannelGroup:
    """Units pruned under one rate, with the parameter slices they own."""

    index: int
    size: int
    members: list[Member]
    producers: list[str]
    consumers: list[str]
    frozen: torch.Tensor  # bool [size]: units that must never be pruned
    classes: torch.Tensor  # long [size]: the graph's class label of each unit
    reasons: dict[int, str] = field(default_factory=dict)  # unit -> why frozen
    excluded: str | None = None  # why the whole group is not pruned, or None

    @property
    def name(self) -> str:
        if not self.producers:
            return f"group{self.index}"
        extra = len(self.producers) - 1
        return self.producers[0] + (f" (+{extra} coupled)" if extra else "")

    @property
    def prunable(self) -> bool:
        return self.excluded is None and bool((~self.frozen).any())

    def members_with(self, *roles: Role) -> list[Member]:
        return [m for m in self.members if m.role in roles]

    def unit_matrix(self, model: nn.Module, member: Member) -> torch.Tensor:
        """The member's weights as [size, features]: row u holds every value of unit u.

        Positions of one unit are gathered together (a filter row, or the H*W input columns a flatten
        gives one channel); units with no position in this member get a row of zeros. It may be a
        view of the weights: read it, do not write to it.
        """
        weight = member.tensor(model).detach()
        if member.dim is None:
            flat, unit = weight.reshape(-1), member.unit.reshape(-1)
            keep = unit >= 0
            counts = torch.bincount(unit[keep], minlength=self.size)
            rows = int(counts.max()) if counts.numel() else 0
            out = weight.new_zeros(self.size, max(rows, 1))
            order = torch.argsort(unit[keep], stable=True)
            u_sorted = unit[keep][order]
            start = torch.cumsum(counts, 0) - counts
            col = torch.arange(u_sorted.numel()) - start[u_sorted]
            out[u_sorted, col] = flat[keep][order]
            return out
        moved = weight.movedim(member.dim, 0).reshape(weight.shape[member.dim], -1)
        if member.in_order(self.size):
            return moved  # row u is unit u already (a plain layer's filters): no copy
        keep = member.unit >= 0
        counts = torch.bincount(member.unit[keep], minlength=self.size)
        per = int(counts.max()) if counts.numel() else 0
        if per <= 1:
            out = moved.new_zeros(self.size, moved.shape[1])
            out[member.unit[keep]] = moved[keep]
            return out
        # Several positions per unit (a flatten before a Linear): concatenate them per unit.
        order = torch.argsort(member.unit[keep], stable=True)
        u_sorted = member.unit[keep][order]
        start = torch.cumsum(counts, 0) - counts
        slot = torch.arange(u_sorted.numel()) - start[u_sorted]
        out = moved.new_zeros(self.size, per, moved.shape[1])
        out[u_sorted, slot] = moved[keep][order]
        return out.reshape(self.size, -1)

    def summary(self) -> dict:
        return {
            "name": self.name,
            "size": self.size,
            "producers": self.producers,
            "consumers": self.consumers,
            "frozen_units": int(self.frozen.sum()),
            "excluded": self.excluded,
        }
