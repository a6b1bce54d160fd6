"""What the plugins that act on BatchNorm outputs share: finding their places in a model, keeping
their forward hooks, and folding a channel-mixing matrix that follows a BatchNorm into the layer.

ResRep's compactor, BWCP's whitening and mask, and DMCP's chain factors are all functions applied to
a BatchNorm's output through a forward hook, so the model's code is never edited. Two kinds of place:

- a *conv site* (:func:`conv_sites`): one ungrouped convolution (or Linear) makes the group's channels,
  in order, and one BatchNorm reads that very tensor. There a C x C matrix Q applied after the
  BatchNorm folds exactly into the convolution and the BatchNorm (:class:`MergeCheck`):

      BN(W x + b) = diag(g/s) W x + (beta + g (b - mu)/s),   s = sqrt(var + eps)
      Q BN(W x + b) = W' x + d',   W' = Q diag(g/s) W,   d' = Q (beta + g (b - mu)/s)

  and the BatchNorm is set so that in eval mode it adds d' and nothing else (its running statistics
  become the merged layer's expected mean and variance and its scale sqrt(var + eps), so that
  training after the merge starts from sensible batch statistics). Rows of Q that are zero give
  filters that are zero, which compaction removes like any hard channel.
- a *normalized group* (:func:`group_norms`): every producer of the group is followed by a BatchNorm
  (a residual stream included); a per-channel factor on each of them acts on the group's channels.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..criteria import L2, Criterion
from ..distributed import broadcast_from_rank0, replicated
from ..errors import SoftpruneError
from ..graph import ChannelGroup, Role
from ..graph.ids import collect_tensors
from ..modes import training_mode
from . import Plugin, PruningView

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

# BatchNorm (or producing layer) module -> a function of the group's size giving per-unit scores from a plugin's state (a
# compactor's row norms, a chain's marginals, an activation probability), or None when the plugin has
# no say any more; weak, so a copy of the model or a dropped pruner leaves nothing behind
PLUGIN_SCORES: weakref.WeakKeyDictionary[nn.Module, Callable[[int], torch.Tensor | None]] = (
    weakref.WeakKeyDictionary()
)


class PluginScore(Criterion):
    """A criterion whose scores a plugin keeps (registered in PLUGIN_SCORES on the group's BatchNorm
    or on one of its producers, on one scale across layers); a group the plugin does not cover (held,
    merged, ended) is scored by its filters' L2 norm. Each method's criterion is a named subclass."""

    comparable = True

    def scores(self, group: ChannelGroup, model: nn.Module) -> torch.Tensor:
        for member in [*group.members_with(Role.SCALE), *group.members_with(Role.FILTER)]:
            scorer = PLUGIN_SCORES.get(model.get_submodule(member.module))
            found = scorer(group.size) if scorer is not None else None
            if found is not None:
                return found.detach().float().cpu()
        return L2(self.aggregate).scores(group, model)


class HookedPlugin(Plugin):
    """A plugin whose changes to the forward pass are forward hooks: it says which (``hooks``), and
    gets install, removal and the ``lifted`` block (no hooks, for copies of the model) from here."""

    def hooks(self, view: PruningView) -> Iterable[tuple[nn.Module, str, Callable]]:
        """(module, "forward" or "pre", function) for every hook the plugin wants now."""
        return ()

    def _install(self, view: PruningView) -> None:
        self._remove()
        handles = []
        for module, kind, fn in self.hooks(view):
            register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
            handles.append(register(fn))
        self._handles = handles

    def _remove(self) -> None:
        for handle in getattr(self, "_handles", []):
            handle.remove()
        self._handles = []

    def lifted(self, view: PruningView):
        return _Lifted(self, view)


class ConvSitePlugin(HookedPlugin):
    """A plugin with a C x C matrix after the BatchNorm of each conv site (ResRep's compactor, BWCP's
    whitening), merged into the site at the first step that makes channels hard (or before
    compaction). Subclasses give ``_hook(i)`` and ``_merge_all(view)``, which computes each due
    site's matrix and calls ``_merge_sites``; the placing, hooks, merge bookkeeping and the resume of
    merged sites live here."""

    def __init__(self) -> None:
        self.sites: dict[int, tuple[str, str]] = {}  # group position -> (convolution, BatchNorm)
        self.merged: set[int] = set()
        self.held_groups: list[str] = []

    def _place(self, view: PruningView) -> None:
        """Find the conv sites; every other group is held whole."""
        self._view = view
        self.sites = conv_sites(view, self.name)
        self.held_groups = [g.name for i, g in enumerate(view.groups) if i not in self.sites]

    def _hook(self, i: int) -> Callable:
        raise NotImplementedError

    def hooks(self, view: PruningView):
        for i, (_, bn_name) in self.sites.items():
            if i not in self.merged:
                yield view.model.get_submodule(bn_name), "forward", self._hook(i)

    def _due(self) -> list[int]:
        return [i for i in self.sites if i not in self.merged]

    def after_selection(self, view: PruningView, previous_hard: list[torch.Tensor]) -> None:
        """The first step that makes channels hard ends the method's training: every site merges (the
        hard channels' rows zero), so the model is a plain one from here on."""
        if any(bool(view.masks[i].hard.any()) for i in self._due()):
            self._merge_all(view)

    def before_compaction(self, view: PruningView) -> None:
        if self._due():
            self._merge_all(view)  # nothing was made hard: the matrices merge as they are

    def _merge_all(self, view: PruningView) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def _merge_sites(self, view: PruningView, matrices: dict[int, torch.Tensor]) -> None:
        """Fold each site's matrix, checked (MergeCheck); on a failed check the hooks come back and
        the error propagates, so a wrong merge never stays in the user's model."""
        due = list(matrices)
        if replicated():  # each process's BatchNorm statistics moved with its own last batches: the
            # fold reads them, so every process folds rank 0's (as DDP's next forward would use them)
            broadcast_from_rank0(t for i in due for t in view.model.get_submodule(self.sites[i][1]).buffers())
        try:
            with MergeCheck(view, self.name) as merge:
                self.merged.update(due)
                self._install(view)  # the merged sites' hooks go
                for i in due:
                    merge.fold(*self.sites[i], matrices[i])
        except SoftpruneError:
            self.merged.difference_update(due)
            self._install(view)
            raise
        for i in due:
            PLUGIN_SCORES.pop(view.model.get_submodule(self.sites[i][1]), None)

    def _load_merged(self, state: dict) -> None:
        """The saved weights are merged already for the saved ``merged`` sites: only drop their hooks."""
        merged = {int(i) for i in state.get("merged", [])} & set(self.sites)
        if merged - self.merged:
            self.merged |= merged
            self._install(self._view)
        for i in merged:
            PLUGIN_SCORES.pop(self._view.model.get_submodule(self.sites[i][1]), None)


class _Lifted:
    def __init__(self, plugin: HookedPlugin, view: PruningView) -> None:
        self.plugin, self.view = plugin, view

    def __enter__(self) -> None:
        self.active = bool(getattr(self.plugin, "_handles", []))
        self.plugin._remove()

    def __exit__(self, *exc) -> None:
        if self.active:
            self.plugin._install(self.view)


# -- places ----------------------------------------------------------------------------------------------
def conv_site(group: ChannelGroup, model: nn.Module) -> tuple[str, str] | None:
    """(convolution, BatchNorm) when one ungrouped convolution makes the group's channels, in order,
    and one BatchNorm with running statistics and an affine scale normalizes them."""
    filters = group.members_with(Role.FILTER)
    norms = [
        m
        for m in group.members_with(Role.SCALE)
        if m.param == "weight" and isinstance(model.get_submodule(m.module), nn.modules.batchnorm._BatchNorm)
    ]
    if len(filters) != 1 or len(norms) != 1 or group.producers != [filters[0].module]:
        return None
    conv, bn = model.get_submodule(filters[0].module), model.get_submodule(norms[0].module)
    if not isinstance(conv, _CONVS) or getattr(conv, "groups", 1) != 1 or filters[0].dim != 0:
        return None
    if not (bn.affine and bn.track_running_stats) or bn.num_features != group.size:
        return None
    if not (filters[0].in_order(group.size) and norms[0].in_order(group.size)):
        return None
    return filters[0].module, norms[0].module


def conv_sites(view: PruningView, method: str) -> dict[int, tuple[str, str]]:
    """Per group position, its conv site where the BatchNorm reads the convolution's output directly
    (checked on the example input); every other group is held whole. An error naming ``method`` when
    there is none."""
    model = view.model
    candidates = {i: site for i, group in enumerate(view.groups) if (site := conv_site(group, model))}
    direct = _read_directly(model, list(candidates.values()), view.example_inputs)
    sites = {}
    for i in range(len(view.groups)):
        if candidates.get(i) in direct:
            sites[i] = candidates[i]
        else:
            view.hold(i)
    if not sites:
        raise SoftpruneError(
            f"method {method} needs convolutions followed directly by a BatchNorm (with running statistics "
            "and an affine scale); this model's selected layers have none"
        )
    return sites


def _read_directly(model: nn.Module, sites: list[tuple[str, str]], inputs: tuple) -> set[tuple[str, str]]:
    """The (convolution, BatchNorm) pairs whose BatchNorm's input is the convolution's output, the
    same tensor, on the example input (one forward pass for all of them)."""
    outputs: dict[str, object] = {}
    inputs_of: dict[str, object] = {}
    handles = []
    for conv_name, bn_name in sites:
        handles.append(
            model.get_submodule(conv_name).register_forward_hook(
                lambda m, a, out, name=conv_name: outputs.__setitem__(name, out)
            )
        )
        handles.append(model.get_submodule(bn_name).register_forward_pre_hook(
            lambda m, a, name=bn_name: inputs_of.__setitem__(name, a[0] if a else None)))  # fmt: skip
    try:
        with training_mode(model, training=False), torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {(c, b) for c, b in sites if c in outputs and inputs_of.get(b) is outputs[c]}


def group_norms(group: ChannelGroup, model: nn.Module) -> list[tuple[nn.Module, torch.Tensor]] | None:
    """The group's BatchNorms with each position's unit (the group's size where a position is not
    one of its units), if every producer of the group has one."""
    out = []
    for member in group.members_with(Role.SCALE):
        module = model.get_submodule(member.module)
        if (
            member.param == "weight"
            and isinstance(module, nn.modules.batchnorm._BatchNorm)
            and member.dim == 0
        ):
            units = member.unit.clone()
            units[units < 0] = group.size
            out.append((module, units))
    if not out or len(out) < len(group.members_with(Role.FILTER)):
        return None
    return out


def scale_channels(x: torch.Tensor, per_unit: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """x times each channel's unit's factor (1 at positions that are no unit of the group: ``units``
    holds the group's size there, as :func:`group_norms` gives them); differentiable in ``per_unit``."""
    return x * position_factors(per_unit, units).to(x.device, x.dtype).view(1, -1, *([1] * (x.dim() - 2)))


def position_factors(per_unit: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """Per position of a layer, its unit's factor, 1 where the position is no unit of the group."""
    return torch.cat([per_unit, per_unit.new_ones(1)])[units.to(per_unit.device)]


def apply_channels(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Q along the channel dimension (1) of x: a 1x1 convolution for any number of spatial dims."""
    return torch.movedim(torch.movedim(x, 1, -1) @ q.t(), -1, 1)


# -- folding -----------------------------------------------------------------------------------------------
class MergeCheck:
    """Fold matrices into conv sites, keeping the model's eval-mode output on the example input.

    ``with MergeCheck(view, method) as merge:`` records the output (the plugin's hooks on), then
    ``merge.fold(conv, bn, q)`` per site while the plugin removes its hooks; on leaving, the output
    must be the same: otherwise every site is put back and a SoftpruneError names ``method`` (the
    plugin reinstalls its hooks on that error)."""

    def __init__(self, view: PruningView, method: str) -> None:
        self.model, self.inputs, self.method = view.model, view.example_inputs, method
        self.saved: dict[tuple[str, str], dict[str, torch.Tensor]] = {}

    def __enter__(self) -> MergeCheck:
        with training_mode(self.model, training=False), torch.no_grad():
            self.before = collect_tensors(self.model(*self.inputs))
        return self

    @torch.no_grad()
    def fold(self, conv_name: str, bn_name: str, q: torch.Tensor) -> None:
        self.saved[(conv_name, bn_name)] = _save(self.model, conv_name, bn_name)
        _merge(self.model, conv_name, bn_name, q.detach())

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self._restore()
            return
        with training_mode(self.model, training=False), torch.no_grad():
            after = collect_tensors(self.model(*self.inputs))
        diff = max(float((r.float() - a.float()).abs().max()) for r, a in zip(self.before, after))
        scale = max(float(r.float().abs().max()) for r in self.before)
        if not diff <= 1e-4 * max(scale, 1e-12):
            self._restore()
            names = ", ".join(conv for conv, _ in self.saved)
            raise SoftpruneError(
                f"{self.method} could not merge into {names} exactly (difference {diff:.3g}, output scale "
                f"{scale:.3g}); the BatchNorm does not read the convolution's output directly"
            )

    def _restore(self) -> None:
        for (conv_name, bn_name), saved in self.saved.items():
            _restore(self.model, conv_name, bn_name, saved)


def _save(model: nn.Module, conv_name: str, bn_name: str) -> dict[str, torch.Tensor]:
    conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
    out = {f"conv.{k}": v.detach().clone() for k, v in conv.state_dict().items()}
    out.update({f"bn.{k}": v.detach().clone() for k, v in bn.state_dict().items()})
    return out


def _restore(model: nn.Module, conv_name: str, bn_name: str, saved: dict[str, torch.Tensor]) -> None:
    conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
    conv.load_state_dict({k[5:]: v for k, v in saved.items() if k.startswith("conv.")})
    bn.load_state_dict({k[3:]: v for k, v in saved.items() if k.startswith("bn.")})


@torch.no_grad()
def _merge(model: nn.Module, conv_name: str, bn_name: str, q: torch.Tensor) -> None:
    """Q after BN(conv(x)) folded into the convolution and the BatchNorm (the module docstring)."""
    conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
    q = q.double()
    w = conv.weight.double()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    gamma, beta = bn.weight.double(), bn.bias.double()
    mean, var = bn.running_mean.double(), bn.running_var.double()
    scale = gamma / torch.sqrt(var + bn.eps)
    a = scale.view(-1, *([1] * (w.dim() - 1))) * w
    merged_w = (q @ a.reshape(a.shape[0], -1)).reshape(a.shape)
    shift = q @ (beta + scale * (bias.to(w.device) - mean))
    # the merged layer's expected output: its mean and (channels taken as independent) variance
    new_mean = q @ (scale * (mean - bias.to(w.device)))
    new_var = (q.pow(2) @ (scale.pow(2) * var)).clamp(min=0.0)
    conv.weight.copy_(merged_w.to(conv.weight.dtype))
    if conv.bias is not None:
        conv.bias.zero_()
    bn.running_mean.copy_(new_mean.to(bn.running_mean.dtype))
    bn.running_var.copy_(new_var.to(bn.running_var.dtype))
    bn.weight.copy_(torch.sqrt(new_var + bn.eps).to(bn.weight.dtype))
    bn.bias.copy_((shift + new_mean).to(bn.bias.dtype))
