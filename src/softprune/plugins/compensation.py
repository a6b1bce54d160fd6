"""Weight compensation: when channels go, let the next layer make up for them by least squares.

A consumer (a convolution or a linear layer) computes y = W_K x_K + W_R x_R, where R are the input
channels being removed and K those kept. If x_R is approximately A x_K (+ b), then W_K + W_R A
(and a bias shift W_R b) gives nearly the same y without x_R. Because a convolution is linear in its
input channels, the same A corrects every kernel position. Two sources for A:

- ``activations``: least squares on the consumer's actual inputs over calibration batches,
  A = G_RK G_KK^-1 with G the inputs' second moments (with an intercept when the layer has a bias).
  For a 1x1 convolution or a linear layer this is the minimum of the output's squared error.
- ``weights``: LRF's weights compensation, from the filters alone: fit each removed filter by the
  kept filters of its group, F_R = A F_K, and move the consumers' weights accordingly. Exact when the
  path from the filters to the consumer is linear; no data needed.

Compensation runs when units become hard (soft units may come back, so nothing is folded for them),
before their consumers' columns are zeroed: the plugin's ``after_selection`` hook. The Pruner adds it
for the ``compensate`` setting. Grouped convolutions and attention inputs are left as they are.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..criteria import ridged
from ..distributed import broadcast_from_rank0, replicated
from ..errors import SoftpruneError, check_choice
from ..graph import Analysis, ChannelGroup, Role
from . import PLUGINS, Plugin, PruningView

SOURCES = ("activations", "weights")


def _compensable(module: nn.Module) -> bool:
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module.groups == 1
    return isinstance(module, nn.Linear)


def _fold(weight: torch.Tensor, removed: torch.Tensor, kept: torch.Tensor, a: torch.Tensor) -> None:
    """weight[:, kept] += weight[:, removed] contracted with a [|removed|, |kept|] (column dim 1)."""
    w_r = weight.index_select(1, removed).double()
    add = torch.einsum("or...,rk->ok...", w_r, a.double())
    weight.index_add_(1, kept, add.to(weight.dtype))


class Compensator(Plugin):
    """Folds the units that become hard at a pruning step into their consumers (see the module doc)."""

    name = "compensate"

    def __init__(self, source: str = "activations", ridge: float = 1e-4) -> None:
        check_choice("compensation source", source, SOURCES)
        self.source = source
        self.ridge = ridge

    def attach(self, view: PruningView) -> None:
        if self.source == "activations" and not view.has_calibration:
            raise SoftpruneError(
                "compensate='activations' fits the next layers on calibration data: pass calibration=..."
            )

    @torch.no_grad()
    def after_selection(self, view: PruningView, previous_hard: list[torch.Tensor]) -> None:
        def alive() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # before, hard only, all pruned
            return (view.alive(previous_hard), view.alive([m.hard for m in view.masks]),
                    view.alive([m.pruned for m in view.masks]))  # fmt: skip

        changed = self.step(view.model, view.analysis, view.groups, view.masks, previous_hard, alive,
                            view.run_calibration)  # fmt: skip
        if replicated():
            for name in sorted(set(changed)):  # the same order on every rank
                module = view.model.get_submodule(name)
                broadcast_from_rank0((module.weight, getattr(module, "bias", None)))

    def step(
        self,
        model: nn.Module,
        analysis: Analysis,
        groups: list[ChannelGroup],
        masks: list,
        old_hard: list[torch.Tensor],
        alive: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        run_calibration: Callable[[], int],
    ) -> list[str]:
        """After a pruning step: fold the units that became hard at it (hard now, not in ``old_hard``)
        into their consumers. ``alive()``: the ids alive before the step, with only hard units gone,
        and with every pruned unit gone. Returns the modules it changed."""
        new = [m.hard & ~o for m, o in zip(masks, old_hard)]
        if not any(bool(n.any()) for n in new):
            return []
        if self.source == "activations":
            return self.from_activations(model, analysis, *alive(), run_calibration)
        changed = []
        for group, mask, fresh in zip(groups, masks, new):
            if bool(fresh.any()) and bool((~mask.pruned).any()):
                removed = torch.nonzero(fresh).view(-1)
                kept = torch.nonzero(~mask.pruned).view(-1)
                changed += self.from_weights(model, group, removed, kept)
        return changed

    # -- from calibration activations -----------------------------------------------------------
    @torch.no_grad()
    def from_activations(
        self,
        model: nn.Module,
        analysis: Analysis,
        alive_before: torch.Tensor,
        alive_after: torch.Tensor,
        alive_kept: torch.Tensor,
        run_batches: Callable[[], None],
    ) -> list[str]:
        """Compensate every consumer losing inputs (alive before, not after) with the inputs that stay
        (``alive_kept``: not pruned at all; soft units may be zeroed, so they do not stand in).
        ``run_batches`` runs the calibration forwards. Returns the names of the modules changed."""
        jobs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for member in analysis.members:
            if member.role is not Role.CONSUMER or member.dim != 1 or member.param != "weight":
                continue
            module = model.get_submodule(member.module)
            if not _compensable(module):
                continue
            before, after = alive_before[member.unit], alive_after[member.unit]
            removed = torch.nonzero(before & ~after).view(-1)
            if removed.numel() == 0:
                continue
            kept = torch.nonzero(alive_kept[member.unit]).view(-1)
            jobs[member.module] = (removed, kept)
        if not jobs:
            return []
        grams: dict[str, torch.Tensor] = {}
        handles = []
        for name in jobs:
            module = model.get_submodule(name)
            bias = getattr(module, "bias", None) is not None

            def hook(mod, args, name=name, bias=bias):
                x = args[0].detach()
                cdim = 1 if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else x.dim() - 1
                cols = x.movedim(cdim, 0).reshape(x.shape[cdim], -1).double()
                if bias:
                    cols = torch.cat([cols, cols.new_ones(1, cols.shape[1])])
                g = cols @ cols.T
                grams[name] = grams[name] + g.cpu() if name in grams else g.cpu()

            handles.append(module.register_forward_pre_hook(hook))
        try:
            run_batches()
        finally:
            for h in handles:
                h.remove()
        changed = []
        for name, (removed, kept) in jobs.items():
            gram = grams.get(name)
            if gram is None:
                continue
            module = model.get_submodule(name)
            has_bias = getattr(module, "bias", None) is not None
            cols = torch.cat([kept, torch.tensor([gram.shape[0] - 1])]) if has_bias else kept
            g_kk = gram[cols][:, cols]
            g_rk = gram[removed][:, cols]
            a = torch.linalg.solve(ridged(g_kk, self.ridge), g_rk.T).T  # [R, K(+1)]
            weight = module.weight
            if has_bias:
                w_r = weight.detach().index_select(1, removed.to(weight.device)).double()
                shift = torch.einsum("or...,r->o", w_r, a[:, -1].to(w_r.device))
                module.bias.add_(shift.to(module.bias.dtype))
                a = a[:, :-1]
            _fold(weight.data, removed.to(weight.device), kept.to(weight.device), a.to(weight.device))
            changed.append(name)
        return changed

    # -- from the filters (LRF) ---------------------------------------------------------------------
    @torch.no_grad()
    def from_weights(
        self, model: nn.Module, group: ChannelGroup, removed: torch.Tensor, kept: torch.Tensor
    ) -> list[str]:
        """Fit the removed units' filters by the kept ones and fold the consumers' columns."""
        filters = [m for m in group.members_with(Role.FILTER)]
        rows = torch.cat([group.unit_matrix(model, m).double() for m in filters], dim=1)
        f_k, f_r = rows[kept], rows[removed]
        a = torch.linalg.solve(ridged(f_k @ f_k.T, self.ridge), f_k @ f_r.T).T  # [R, K]
        changed = []
        for member in group.members_with(Role.CONSUMER):
            if member.dim != 1 or member.param != "weight":
                continue
            module = model.get_submodule(member.module)
            if not _compensable(module):
                continue
            positions = _unit_positions(member.unit, group.size)
            if positions is None:
                continue
            pos_r, pos_k = positions[removed], positions[kept]  # [units, per unit]
            present_r = (pos_r >= 0).all(1)
            present_k = (pos_k >= 0).all(1)
            if not bool(present_r.any()) or not bool(present_k.any()):
                continue
            sub = a[present_r][:, present_k]
            weight = module.weight.data
            for slot in range(pos_r.shape[1]):
                _fold(
                    weight,
                    pos_r[present_r, slot].to(weight.device),
                    pos_k[present_k, slot].to(weight.device),
                    sub.to(weight.device),
                )
            changed.append(member.module)
        return changed


def _unit_positions(unit: torch.Tensor, size: int) -> torch.Tensor | None:
    """[size, r] column positions of each unit (-1 where absent), when every present unit has r."""
    keep = unit >= 0
    counts = torch.bincount(unit[keep], minlength=size)
    present = counts > 0
    if not bool(present.any()):
        return None
    r = int(counts[present][0])
    if not bool((counts[present] == r).all()):
        return None
    out = torch.full((size, r), -1, dtype=torch.long)
    order = torch.argsort(unit[keep], stable=True)
    cols = torch.nonzero(keep).view(-1)[order]
    units = unit[keep][order]
    slot = torch.arange(units.numel()) - (torch.cumsum(counts, 0) - counts)[units]
    out[units, slot] = cols
    return out


PLUGINS.register(Compensator.name, Compensator)
