"""ResRep (Ding et al., ICCV 2021): a compactor after each convolution and BatchNorm, trained with a
group-lasso penalty; channels leave by their compactor rows, and the compactor merges into the layer.

A compactor is a C x C matrix Q, identity at the start, applied to the BatchNorm's output (a 1x1
convolution). Its gradient is the task's, except on the rows of channels selected for removal, where
the task gradient is reset to zero ("gradient resetting"), plus ``strength * q / ||q||`` on every row
q (the group lasso's gradient): selected rows shrink towards zero while the others keep learning.
Channels are selected by the norms of their rows (criterion ``compactor``, on one scale across
layers) at each pruning step, a few more each time, until the budget is met. When a group's channels
become hard, their rows are set to zero and Q merges into the convolution and BatchNorm before it:

    BN(W x + b) = diag(g/s) W x + (beta + g (b - mu)/s),   s = sqrt(var + eps)
    Q BN(W x + b) = W' x + d',   W' = Q diag(g/s) W,   d' = Q (beta + g (b - mu)/s)

and the BatchNorm is set so that in eval mode it adds d' and nothing else (its running statistics
are set to the merged layer's expected mean and variance, and its scale to sqrt(var + eps), so that
training after the merge starts from sensible batch statistics). Rows that are zero give filters
that are zero: compaction removes them like any hard channel. The merge is checked on the example
input before it is kept.

Compactors sit where a group's channels are made by one ungrouped convolution read directly by a
BatchNorm (ResNet's inner layers, VGG's layers); the other groups (a residual stream written by
several convolutions) are held: ResRep leaves them whole, as the paper does for ResNets.

The compactors train with their own SGD (the hooked optimizer's learning rate, momentum 0.9, no
weight decay: the penalty takes its place), so the caller's optimizer and its checkpoint are
unchanged; their values and momentum are saved with the Pruner's state.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ..criteria import L2, Criterion, register_criterion
from ..distributed import replicated
from ..errors import SoftpruneError
from ..graph import ChannelGroup, Role
from ..modes import training_mode
from . import PLUGINS, Plugin, PruningView

# BatchNorm module -> the compactor applied to its output (read by the ``compactor`` criterion); weak,
# so a copy of the model or a dropped pruner leaves nothing behind
COMPACTORS: weakref.WeakKeyDictionary[nn.Module, nn.Parameter] = weakref.WeakKeyDictionary()

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _number(name: str, value: object, low: float, high: float | None = None) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and value >= low
    if ok and high is not None:
        ok = value < high
    if not ok:
        bound = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise SoftpruneError(f"resrep {name} must be a number {bound}, got {value!r}")
    return float(value)


def _apply(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Q along the channel dimension (1) of x: a 1x1 convolution for any number of spatial dims."""
    return torch.movedim(torch.movedim(x, 1, -1) @ q.t(), -1, 1)


class ResRep(Plugin):
    """``strength``: the group-lasso factor lambda (the authors' code: 1e-4). ``momentum``: the
    compactors' SGD (the authors' code: 0.99)."""

    name = "resrep"

    def __init__(self, strength: float = 1e-4, momentum: float = 0.99) -> None:
        self.strength = _number("strength", strength, 0.0)
        self.momentum = _number("momentum", momentum, 0.0, 1.0)
        self.sites: dict[int, tuple[str, str]] = {}  # group position -> (convolution, BatchNorm)
        self.compactors: dict[int, nn.Parameter] = {}
        self.merged: set[int] = set()
        self.held_groups: list[str] = []
        self.zeroed_norm: float | None = None  # largest norm of a row set to zero by a merge, / median kept
        self._handles: dict[int, object] = {}
        self._norms: dict[int, nn.Module] = {}  # group position -> its BatchNorm
        self._optimizer: torch.optim.SGD | None = None

    def options(self) -> dict:
        return {"strength": self.strength, "momentum": self.momentum}

    def summary(self) -> dict:
        """How close to zero the rows were when the merge cut them (1.0: as large as a kept row)."""
        return {
            "compactors": len(self.sites),
            "merged": len(self.merged),
            "held_groups": list(self.held_groups),
            "largest_cut_row_over_median_kept_row": self.zeroed_norm,
        }

    # -- placing the compactors ---------------------------------------------------------------------
    def attach(self, view: PruningView) -> None:
        model = view.model
        candidates = {i: site for i, group in enumerate(view.groups) if (site := _site(group, model))}
        direct = _read_directly(model, list(candidates.values()), view.example_inputs)
        for i, group in enumerate(view.groups):
            if candidates.get(i) in direct:
                self.sites[i] = candidates[i]
            else:
                view.hold(i)  # no compactor: ResRep leaves the group whole
                self.held_groups.append(group.name)
        if not self.sites:
            raise SoftpruneError(
                "method resrep needs convolutions followed directly by a BatchNorm (with running statistics "
                "and an affine scale); this model's selected layers have none"
            )
        for i, (_, bn_name) in self.sites.items():
            bn = model.get_submodule(bn_name)
            n = view.groups[i].size
            q = nn.Parameter(torch.eye(n, device=bn.weight.device, dtype=bn.weight.dtype))
            self.compactors[i] = q
        self._optimizer = torch.optim.SGD(list(self.compactors.values()), lr=0.0, momentum=self.momentum)
        self._install(view)

    def _install(self, view: PruningView) -> None:
        for i, (_, bn_name) in self.sites.items():
            if i in self.merged or i in self._handles:
                continue
            bn = view.model.get_submodule(bn_name)
            self._norms[i] = bn
            COMPACTORS[bn] = self.compactors[i]
            self._handles[i] = bn.register_forward_hook(self._hook(i))

    def _hook(self, i: int):
        def hook(module, args, output):
            q = self.compactors[i]
            if q.device != output.device:  # the model moved after the pruner was built (before training)
                q.data = q.data.to(output.device)
            return _apply(q, output)

        return hook

    def _remove(self, i: int) -> None:
        handle = self._handles.pop(i, None)
        if handle is not None:
            handle.remove()

    def lifted(self, view: PruningView):
        """No compactor in the forward pass for the block (copies made in it carry none)."""
        return _Lifted(self, view)

    # -- training -----------------------------------------------------------------------------------
    def before_pruning_step(self, view: PruningView) -> None:
        if view.optimizer is None:
            raise SoftpruneError(
                "method resrep trains its compactors on the steps of the pruner's optimizer: pass optimizer= "
                "to the Pruner"
            )

    @torch.no_grad()
    def after_optimizer_step(self, view: PruningView) -> None:
        if self._optimizer is None or view.optimizer is None:
            return
        live = [i for i in self.compactors if i not in self.merged]
        for i in live:
            q = self.compactors[i]
            if q.grad is None:
                continue
            if replicated():  # the compactors are not the DDP module's parameters: average by hand
                torch.distributed.all_reduce(q.grad)
                q.grad /= torch.distributed.get_world_size()
            selected = view.masks[i].pruned.to(q.device)
            q.grad[selected] = 0.0  # gradient resetting: selected rows follow the penalty only
            q.grad.add_(self.strength * q / q.norm(dim=1, keepdim=True).clamp(min=1e-12))
        for group in self._optimizer.param_groups:
            group["lr"] = view.optimizer.param_groups[0]["lr"]
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)

    # -- the end: merging -------------------------------------------------------------------------
    @torch.no_grad()
    def after_selection(self, view: PruningView, previous_hard: list[torch.Tensor]) -> None:
        """The first step that makes channels hard ends ResRep's training: every compactor merges (the
        hard channels' rows set to zero first), so the model is a plain one from here on."""
        if not any(bool(view.masks[i].hard.any()) for i in self.sites if i not in self.merged):
            return
        self._merge_all(view)

    def before_compaction(self, view: PruningView) -> None:
        if any(i not in self.merged for i in self.sites):
            self._merge_all(view)  # nothing was made hard: the compactors merge as they are

    @torch.no_grad()
    def _merge_all(self, view: PruningView) -> None:
        due = [i for i in self.sites if i not in self.merged]
        model, inputs = view.model, view.example_inputs
        ratios = []
        for i in due:
            q, hard = self.compactors[i], view.masks[i].hard.to(self.compactors[i].device)
            norms = q.norm(dim=1)
            if bool(hard.any()) and bool((~hard).any()):
                ratios.append(float(norms[hard].max() / norms[~hard].median().clamp(min=1e-12)))
            q[hard] = 0.0
        with training_mode(model, training=False):
            before = model(*inputs)
        saved = {i: _save(model, *self.sites[i]) for i in due}
        for i in due:
            _merge(model, *self.sites[i], self.compactors[i].detach())
            self._remove(i)
            COMPACTORS.pop(model.get_submodule(self.sites[i][1]), None)
            self.merged.add(i)
        diff, scale = _output_difference(model, inputs, before)
        if not diff <= 1e-4 * max(scale, 1e-12):
            for i in due:  # put everything back: a wrong merge must not stay in the user's model
                _restore(model, *self.sites[i], saved[i])
                self.merged.discard(i)
            self._install(view)
            names = ", ".join(self.sites[i][0] for i in due)
            raise SoftpruneError(
                f"resrep could not merge the compactors of {names} exactly (difference {diff:.3g}, output scale "
                f"{scale:.3g}); the BatchNorm does not read the convolution's output directly"
            )
        if ratios:
            self.zeroed_norm = max(ratios + ([self.zeroed_norm] if self.zeroed_norm is not None else []))

    # -- resume -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "compactors": {i: q.detach().clone() for i, q in self.compactors.items()},
            "merged": sorted(self.merged),
            "optimizer": None if self._optimizer is None else self._optimizer.state_dict(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for i, value in state.get("compactors", {}).items():
            if int(i) in self.compactors:
                self.compactors[int(i)].copy_(value)
        for i in state.get("merged", []):  # the saved weights are merged already: only drop the hook
            self._remove(int(i))
            if int(i) in self._norms:
                COMPACTORS.pop(self._norms[int(i)], None)
            self.merged.add(int(i))
        if self._optimizer is not None and state.get("optimizer"):
            self._optimizer.load_state_dict(state["optimizer"])


class _Lifted:
    def __init__(self, plugin: ResRep, view: PruningView) -> None:
        self.plugin, self.view = plugin, view

    def __enter__(self) -> None:
        for i in list(self.plugin._handles):
            self.plugin._remove(i)

    def __exit__(self, *exc) -> None:
        self.plugin._install(self.view)


def _site(group: ChannelGroup, model: nn.Module) -> tuple[str, str] | None:
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


def _output_difference(model: nn.Module, inputs: tuple, before) -> tuple[float, float]:
    from ..graph.ids import collect_tensors

    with training_mode(model, training=False):
        after = collect_tensors(model(*inputs))
    ref = collect_tensors(before)
    diff = max(float((r.float() - a.float()).abs().max()) for r, a in zip(ref, after))
    return diff, max(float(r.float().abs().max()) for r in ref)


class CompactorNorm(Criterion):
    """ResRep's selection: the L2 norm of each channel's compactor row (on one scale across layers).
    A group without a compactor (held by ResRep, or merged already) is scored by its filters' L2 norm."""

    name = "compactor"
    comparable = True

    def scores(self, group: ChannelGroup, model: nn.Module) -> torch.Tensor:
        for member in group.members_with(Role.SCALE):
            q = COMPACTORS.get(model.get_submodule(member.module))
            if q is not None and q.shape[0] == group.size:
                return q.detach().norm(dim=1).float().cpu()
        return L2(self.aggregate).scores(group, model)


PLUGINS.register(ResRep.name, ResRep)
register_criterion(CompactorNorm)
