"""Masks: apply a pruning decision to the weights, and keep hard channels at zero.

Per group, every unit is kept, soft (selected this step; multiplied by alpha_t and free to recover)
or hard (zero, and kept at zero after every optimizer step). See docs/design.md ("Masks") for which
parameter slices each state touches under ``mask_scope`` "channel" (default) and "filter".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import check_choice
from .graph import Analysis, ChannelGroup, Member, Role
from .plugins import Plugin, PruningView

SCOPES = ("channel", "filter")


@dataclass
class GroupMask:
    """The state of one group: which units are hard, which are soft."""

    size: int
    hard: torch.Tensor = field(default=None)  # bool [size]
    soft: torch.Tensor = field(default=None)  # bool [size]

    def __post_init__(self) -> None:
        if self.hard is None:
            self.hard = torch.zeros(self.size, dtype=torch.bool)
        if self.soft is None:
            self.soft = torch.zeros(self.size, dtype=torch.bool)

    @property
    def pruned(self) -> torch.Tensor:
        return self.hard | self.soft


def _soft_exponent(role: Role, scope: str) -> int | None:
    """How a soft factor alpha applies to a role: alpha**k, or None when the slice is left alone."""
    if scope == "filter":
        return 1 if role is Role.FILTER else None
    return {Role.FILTER: 1, Role.ADDITIVE: 1, Role.MEAN: 1, Role.VAR: 2}.get(role)


def _hard_roles(scope: str) -> tuple[Role, ...]:
    if scope == "filter":
        return (Role.FILTER,)
    return (Role.FILTER, Role.ADDITIVE, Role.SCALE, Role.MEAN, Role.VAR)


@torch.no_grad()
def apply(group: ChannelGroup, mask: GroupMask, model: nn.Module, alpha: float, scope: str) -> None:
    """Multiply soft units' slices by alpha (per role) and zero hard units' slices."""
    check_choice("mask_scope", scope, SCOPES)
    hard_roles = _hard_roles(scope)
    any_soft, any_hard = bool(mask.soft.any()), bool(mask.hard.any())
    hits: dict[tuple[bool, bool], _Hits] = {}  # (hard, soft) -> the positions of those units
    for member in group.members:
        if member.role is Role.CONSUMER:
            continue  # dead input columns are zeroed model-wide: Pruner._dead_inputs
        k = _soft_exponent(member.role, scope)
        soft = alpha**k if k is not None and any_soft else 1.0
        hard = any_hard and member.role in hard_roles
        if soft in (0.0, 1.0):  # zeros only (hard pruning, SFP): fill the slices, multiply nothing
            key = (hard, soft == 0.0)
            if any(key) and key not in hits:
                zero = mask.hard if hard else None
                if soft == 0.0:
                    zero = mask.soft if zero is None else zero | mask.soft
                hits[key] = _Hits(zero)
            if any(key):
                _zero(member, model, hits[key])
            continue
        factor = torch.ones(group.size)
        factor[mask.soft] = soft
        if hard:
            factor[mask.hard] = 0.0
        tensor = member.tensor(model)
        tensor.mul_(member.factor(factor.to(tensor.dtype).to(tensor.device), tensor.shape))


@torch.no_grad()
def zero_units(group: ChannelGroup, units: torch.Tensor, model: nn.Module) -> None:
    """Zero every non-consumer slice of ``units`` (bool [size]): the channel outputs exactly zero."""
    if not bool(units.any()):
        return
    hits = _Hits(units)
    for member in group.members:
        if member.role is not Role.CONSUMER:
            _zero(member, model, hits)


def zero_units_of(tensor: torch.Tensor, member: Member, units: torch.Tensor) -> None:
    """Zero ``units``' (bool [size]) positions of ``member`` in ``tensor``, a tensor shaped like the
    member's parameter (its optimizer state, say)."""
    hit = _Hits(units).of(member)
    if hit is not None:
        _fill(tensor, member.dim, hit.to(tensor.device))


def _zero(member: Member, model: nn.Module, hits: _Hits) -> None:
    hit = hits.of(member)
    if hit is not None:
        tensor = member.tensor(model)
        _fill(tensor, member.dim, hit.to(tensor.device))


class HardKeeper(Plugin):
    """The plugin every Pruner has first: keeps hard units at exactly zero whatever the optimizer does.

    After every optimizer step it zeroes the hard slices of each parameter and the same slices of the
    optimizer's per-parameter state (momentum buffers, Adam's moments), so neither weight decay,
    momentum nor an adaptive step can bring a hard channel back. The slices are precomputed as index
    lists per parameter, so the hook costs a few ``index_fill_`` calls per step.
    """

    name = "hard_zero"

    def __init__(self, model: nn.Module, scope: str) -> None:
        self.model = model
        self.scope = scope
        self._slices: list[tuple[torch.Tensor, int | None, torch.Tensor]] = []

    def update(
        self,
        groups: list[ChannelGroup],
        masks: list[GroupMask],
        extra: list[tuple[torch.Tensor, int, torch.Tensor]] = (),
    ) -> None:
        """Slices to keep at zero: the hard units' (by role), and ``extra`` (tensor, dim, index) ones."""
        roles = _hard_roles(self.scope)
        slices = list(extra)
        for group, mask in zip(groups, masks):
            if not bool(mask.hard.any()):
                continue
            hits = _Hits(mask.hard)
            for member in group.members:
                if member.role not in roles:
                    continue
                tensor = member.tensor(self.model)
                hit = hits.of(member)
                if hit is not None:
                    slices.append((tensor, member.dim, hit.to(tensor.device)))
        self._slices = slices

    def after_optimizer_step(self, view: PruningView) -> None:
        self.enforce(view.optimizer)

    @torch.no_grad()
    def enforce(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Zero the slices, and the same slices of the optimizer's per-parameter state."""
        state = optimizer.state if optimizer is not None else {}
        for tensor, dim, index in self._slices:
            _fill(tensor, dim, index)
            for value in state.get(tensor, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == tensor.shape:
                    _fill(value, dim, index)


class _Hits:
    """Where flagged units (bool [size]) sit in each member of a group. Members laid out unit by
    unit (filters, BatchNorm channels: most of them) share one lookup."""

    def __init__(self, flags: torch.Tensor) -> None:
        self.flags = flags
        self._in_order: torch.Tensor | None = None
        self._padded: torch.Tensor | None = None

    def of(self, member: Member) -> torch.Tensor | None:
        if member.in_order(self.flags.numel()):
            if self._in_order is None:
                self._in_order = torch.nonzero(self.flags).view(-1)
            hit = self._in_order
        else:
            if self._padded is None:
                self._padded = torch.cat([self.flags, self.flags.new_zeros(1)])  # unit -1 -> False
            flags = self._padded[member.unit]
            hit = torch.nonzero(flags.reshape(-1) if member.dim is None else flags).view(-1)
        return hit if hit.numel() else None


def _fill(tensor: torch.Tensor, dim: int | None, index: torch.Tensor) -> None:
    if dim is None:
        tensor.view(-1).index_fill_(0, index, 0)
    else:
        tensor.index_fill_(dim, index, 0)


@torch.no_grad()
def clear_optimizer_state(
    optimizer: torch.optim.Optimizer | None, group: ChannelGroup, units: torch.Tensor, model: nn.Module
) -> None:
    """Zero the optimizer state (momentum, Adam moments) of these units' slices, so that a
    parameter-masked soft unit is not pushed back at full strength by stale momentum."""
    state = optimizer.state if optimizer is not None else {}
    for member in group.members:
        if member.role is Role.CONSUMER:
            continue
        tensor = member.tensor(model)
        for value in state.get(tensor, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == tensor.shape:
                zero_units_of(value, member, units)


def dead_inputs(
    analysis: Analysis, hard_classes: torch.Tensor, model: nn.Module
) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """Consumer input columns that read an always-zero channel (hard units, and residual streams
    whose every writer is hard): kept at zero with the hard units. The function does not change,
    and criteria then measure what compaction keeps (a filter's norm over its live inputs), so
    training on the masked model and after compact_hard() rank filters alike."""
    if not bool(hard_classes.any()):
        return []
    alive = analysis.ids.alive(hard_classes)
    dead = []
    for member in analysis.members:
        if member.role is not Role.CONSUMER or member.dim is None:
            continue
        index = torch.nonzero(~alive[member.unit]).view(-1)
        if index.numel():
            tensor = member.tensor(model)
            dead.append((tensor, member.dim, index.to(tensor.device)))
    return dead
