"""Where data-driven criteria see a unit: the feature maps its consumers read.

A unit's feature map is taken at the input of the layers that consume it (a convolution, a linear
layer, an attention block's query): after the normalization and activation that follow its filter,
which is what HRank and EZCrop measure (ranks are only informative after a ReLU) and what the next
layer sees. A residual stream's channel is seen wherever the stream is read; in the "independent"
mode a stream channel that sums several branches' units counts for each of them.

A *site* is one tensor read by consumers (one hook on the first of them: every consumer of the same
tensor sees the same maps). Per site and group, the tap hands criteria the maps of the group's units
as ``[k, N, *map]`` (k units present, N samples; a linear layer after a flatten gives each unit its
H*W features as a 1-D map), and with gradients the same-shaped gradient of the loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .graph import CONST, ZERO, Analysis, ChannelGroup, Role

Observer = Callable[[int, torch.Tensor, torch.Tensor, "torch.Tensor | None"], None]


@dataclass
class Site:
    module: str
    dim: int  # the channel dimension of the input
    parts: list[tuple[int, torch.Tensor, torch.Tensor, int]]  # (group position, positions, units, per unit)


def _input_dim(module: nn.Module, ndim: int) -> int | None:
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if module.groups > 1 and module.in_channels // module.groups == 1:
            return None  # depthwise: channel-wise, not a consumer
        return ndim - (module.weight.dim() - 2) - 1
    if isinstance(module, (nn.Linear, nn.MultiheadAttention)):
        return ndim - 1
    return None


def _classes_of(analysis: Analysis, ident: int) -> list[int]:
    """The classes a tensor position with this id carries: its own, or a sum's parts'."""
    ids = analysis.ids
    base = int(ids.base(torch.tensor(ident)))
    if base in (ZERO, CONST):
        return []
    if base in ids.parts and base not in ids.collapsed:
        out: list[int] = []
        for part in ids.parts[base]:
            out.extend(_classes_of(analysis, part))
        return out
    return [int(ids.label[base])]


def find_sites(analysis: Analysis, groups: list[ChannelGroup], model: nn.Module) -> list[Site]:
    """One site per tensor that a consumer of a prunable group reads."""
    n_classes = int(analysis.ids.label.max()) + 1
    group_of = torch.full((n_classes,), -1, dtype=torch.long)
    unit_of = torch.full((n_classes,), -1, dtype=torch.long)
    for gi, group in enumerate(groups):
        group_of[group.classes] = gi
        unit_of[group.classes] = torch.arange(group.size)
    consumers = {m.module for m in analysis.members if m.role is Role.CONSUMER}
    modules = dict(model.named_modules())
    sites: list[Site] = []
    seen_inputs: set[str] = set()
    hooked: set[str] = set()
    for node in analysis.gm.graph.nodes:
        if node.op != "call_module" or node.target not in consumers or node.target in hooked:
            continue
        if not node.args or not hasattr(node.args[0], "name"):
            continue
        source = node.args[0].name
        if source in seen_inputs:
            continue
        ids = analysis.node_ids.get(source)
        module = modules.get(node.target)
        if not isinstance(ids, torch.Tensor) or module is None:
            continue
        dim = _input_dim(module, ids.dim())
        if dim is None:
            continue
        seen_inputs.add(source)
        rows = ids.movedim(dim, 0).reshape(ids.shape[dim], -1)[:, 0]
        pairs: dict[int, list[tuple[int, int]]] = {}
        cache: dict[int, list[int]] = {}
        for position, ident in enumerate(rows.tolist()):
            classes = cache.get(ident)
            if classes is None:
                classes = cache[ident] = _classes_of(analysis, ident)
            for c in classes:
                g = int(group_of[c])
                if g >= 0:
                    pairs.setdefault(g, []).append((int(unit_of[c]), position))
        parts = []
        for g, found in sorted(pairs.items()):
            found.sort()
            units = torch.tensor([u for u, _ in found])
            positions = torch.tensor([p for _, p in found])
            unique, counts = torch.unique_consecutive(units, return_counts=True)
            if bool((counts == counts[0]).all()):
                parts.append((g, positions, unique, int(counts[0])))
            else:  # uneven: keep one position per unit
                first = torch.cumsum(counts, 0) - counts
                parts.append((g, positions[first], unique, 1))
        if parts:
            hooked.add(node.target)
            sites.append(Site(node.target, dim, parts))
    return sites


def unit_maps(x: torch.Tensor, dim: int, positions: torch.Tensor, per_unit: int) -> torch.Tensor:
    """[k, N, *map] maps of the units at ``positions`` along ``dim`` (``per_unit`` positions each)."""
    maps = x.index_select(dim, positions.to(x.device)).movedim(dim, 0)
    if per_unit > 1:
        k = maps.shape[0] // per_unit
        maps = maps.reshape(k, per_unit, *maps.shape[1:]).movedim(1, -1)
        if maps.dim() > 3:  # several positions per unit of a map that is not flat: keep the first
            maps = maps[..., 0]
    return maps.float()


class FeatureTap:
    """Forward hooks on one consumer per site, calling ``observe(group position, units, maps, grads)``.

    With ``gradients=True`` the call happens in the backward pass, with the gradient of the loss with
    respect to the same maps; otherwise in the forward pass with ``grads=None``.
    """

    def __init__(
        self, model: nn.Module, sites: list[Site], observe: Observer, gradients: bool = False
    ) -> None:
        self.sites = sites
        self.observe = observe
        self.gradients = gradients
        self._handles = []
        for site in sites:
            module = model.get_submodule(site.module)
            self._handles.append(module.register_forward_pre_hook(self._hook(site), with_kwargs=True))

    def _hook(self, site: Site):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("query", kwargs.get("input"))
            if not isinstance(x, torch.Tensor):
                return None
            if self.gradients:
                if torch.is_grad_enabled() and x.requires_grad:
                    value = x.detach()
                    x.register_hook(lambda grad: self._emit(site, value, grad))
            else:
                self._emit(site, x.detach(), None)
            return None

        return hook

    @torch.no_grad()
    def _emit(self, site: Site, x: torch.Tensor, grad: torch.Tensor | None) -> None:
        dim = site.dim if site.dim >= 0 else x.dim() + site.dim
        for g, positions, units, per_unit in site.parts:
            maps = unit_maps(x, dim, positions, per_unit)
            grads = None if grad is None else unit_maps(grad, dim, positions, per_unit)
            self.observe(g, units, maps, grads)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
