"""Soft units: masked in the forward pass, trained straight through.

A soft unit (selected at step t, free to come back) keeps its parameters. Where its channel is read,
the forward pass multiplies it by alpha_t (0 for SFP), so the network computes exactly what it would
without the channel; the backward pass lets the gradient through the mask unchanged (a
straight-through estimator, as Dynamic Pruning with Feedback, Lin et al., ICLR 2020, does for single
weights). The soft filter, its BatchNorm and everything between keep training as if the channel were
alive, and the criterion at the next step sees what they learned.

Why not zero the parameters (what the papers' code does): a zeroed filter feeding a BatchNorm has a
batch variance of ~0, so once anything moves it (stale momentum, or BN's shift keeping the channel
alive), BatchNorm divides by sqrt(eps) and the channel returns at full strength with its gradient
amplified up to ~300x; and with BN's shift zeroed too the channel outputs exactly 0, so a ReLU after
it passes no gradient at all (docs/methods.md, "Soft units", gives the measurements).

Where the mask goes. A unit's value is masked once on every path, at the last place it is still its
own: the input of a layer that consumes it (a convolution, a linear layer), or, where it is summed
with other units first (a residual add in the "independent" mode, a sum over channels), the output
of the module that feeds the sum. Masking after the activation matters: a mask in front of a ReLU
gives it a zero input, and a ReLU passes no gradient at zero. The mask of a point is built from the
channel ids the analysis gave that tensor, so flatten-before-Linear, concatenation and channels-last
need nothing special.

A group whose units cannot be masked this way (a sum fed by a function call, not a module) falls
back to masking its parameters, with the soft units' optimizer state cleared so they cannot be
kicked back (they then stay at zero until a step deselects them). :meth:`SoftMasks.check` verifies
the plan once on the example input: with alpha = 0 the masked model must compute exactly what the
model computes with those units' parameters zeroed; groups where it does not fall back too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from .gradient_stop import Layer, SoftRowsGradient
from .graph import CONST, Analysis, ChannelGroup, Role
from .masks import apply, clear_optimizer_state
from .modes import training_mode

log = logging.getLogger(__name__)


class _StraightThrough(torch.autograd.Function):
    """x * mask in the forward pass; the gradient passes unchanged (straight through the mask)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # noqa: D401
        return x * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def straight_through(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _StraightThrough.apply(x, mask.to(dtype=x.dtype, device=x.device))


@dataclass
class Point:
    """One tensor to mask: an input of a consumer's call, or the output of a module's call."""

    module: str
    call: int  # which call of the module (a module called several times: a shared ReLU)
    where: str  # "input" or "output"
    arg: int | str | None  # the input's position or keyword ("input" points)
    ids: torch.Tensor  # unique channel ids present at this tensor
    inverse: torch.Tensor  # the tensor's ids as indices into ``ids``, squeezed where uniform
    owners: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # (group position, indices into ids, units): the ids that carry a unit to mask here


@dataclass
class _IdInfo:
    pure: dict[int, int]  # id -> class, for ids that carry one class alone
    summed: set[int]  # classes that appear as a part of a sum


@dataclass
class Producer:
    """A layer writing units of a group: its output rows' units (-1: another group's)."""

    module: str
    group: int
    unit: torch.Tensor  # per output row
    layer: Layer  # what its backward needs (softprune.gradient_stop)


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class SoftMasks:
    """The forward masks of soft units for one model, and the hooks that apply them."""

    def __init__(self, model: nn.Module, analysis: Analysis, groups: list[ChannelGroup]) -> None:
        self.model = model
        self.groups = groups
        self.points: list[Point] = []
        self.fallback: set[int] = set()  # group positions masked through their parameters
        self._handles: list[Any] = []
        self._calls: dict[str, int] = {}
        self._masks: dict[int, torch.Tensor] = {}  # point index -> multiplier
        self.producers: list[Producer] = []
        self._rows: dict[int, torch.Tensor] = {}  # producer index -> soft output rows
        self._alpha = 0.0  # what soft channels are multiplied by where they are read
        self._plan(analysis)
        self._plan_producers()

    # -- planning ---------------------------------------------------------------------------------
    def _plan(self, analysis: Analysis) -> None:
        ids = analysis.ids
        n_classes = int(ids.label.max()) + 1
        group_of = torch.full((n_classes,), -1, dtype=torch.long)
        unit_of = torch.full((n_classes,), -1, dtype=torch.long)
        for gi, group in enumerate(self.groups):
            group_of[group.classes] = gi
            unit_of[group.classes] = torch.arange(group.size)
        consumers = {m.module for m in analysis.members if m.role is Role.CONSUMER}
        info_cache: dict[str, _IdInfo | None] = {}

        def info(name: str) -> _IdInfo | None:
            if name not in info_cache:
                info_cache[name] = self._info(analysis, analysis.node_ids.get(name), group_of)
            return info_cache[name]

        nodes = list(analysis.gm.graph.nodes)
        calls: dict[str, int] = {}
        call_of: dict[str, int] = {}
        for node in nodes:
            if node.op == "call_module":
                call_of[node.name] = calls.get(node.target, 0)
                calls[node.target] = call_of[node.name] + 1
        self._n_calls = calls
        # Output points (sums) change what arrives masked downstream, consumers' inputs change nothing
        # further on: find the output points to a fixpoint, then the consumers' points in one last pass.
        at_output: dict[str, dict[int, int]] = {}  # module node -> {id: class} its output masks
        while True:
            before = {k: dict(v) for k, v in at_output.items()}
            stuck = self._walk(analysis, nodes, consumers, info, at_output, None)
            if at_output == before:
                break
        self._walk(analysis, nodes, consumers, info, at_output, (call_of, group_of, unit_of))
        for name, need in at_output.items():
            node = next(n for n in nodes if n.name == name)
            self._add_point(node.target, call_of[name], "output", None, analysis.node_ids[name], need,
                            group_of, unit_of)  # fmt: skip
        for c in stuck:
            if int(group_of[c]) >= 0:
                self.fallback.add(int(group_of[c]))

    def _walk(self, analysis, nodes, consumers, info, at_output, emit) -> set[int]:
        """One pass in graph order: which classes arrive masked at each node; output points needed
        by sums go into ``at_output``; with ``emit``, consumers' input points are added. Returns the
        classes that need a mask where no module output can carry one."""
        masked: dict[str, set[int]] = {}  # node -> classes masked on every path into its output
        stuck: set[int] = set()
        for node in nodes:
            if node.op in ("placeholder", "get_attr", "output"):
                masked[node.name] = set()
                continue
            inputs = node.all_input_nodes
            done_in = {
                x.name: masked.get(x.name, set()) | set(at_output.get(x.name, {}).values()) for x in inputs
            }
            if node.op == "call_module" and node.target in consumers:
                if emit is not None:
                    call_of, group_of, unit_of = emit
                    for x, kind in _tensor_args(node):
                        x_info = info(x.name) if isinstance(x, torch.fx.Node) else None
                        if x_info is None:
                            continue
                        need = {i: c for i, c in x_info.pure.items() if c not in done_in[x.name]}
                        if need:
                            self._add_point(node.target, call_of[node.name], "input", kind,
                                            analysis.node_ids[x.name], need, group_of, unit_of)  # fmt: skip
                masked[node.name] = set()
                continue
            out_info = info(node.name)
            if out_info is not None:
                mixed = out_info.summed - set(out_info.pure.values())
                for x in inputs:
                    x_info = info(x.name)
                    if x_info is None:
                        continue
                    need = {i: c for i, c in x_info.pure.items() if c in mixed and c not in done_in[x.name]}
                    if not need:
                        continue
                    if x.op == "call_module" and isinstance(analysis.node_ids.get(x.name), torch.Tensor):
                        at_output.setdefault(x.name, {}).update(need)
                        done_in[x.name] = done_in[x.name] | set(need.values())
                    else:
                        stuck.update(need.values())
            # a class arrives masked at this node's output if it is masked on every input carrying it
            carried: dict[int, bool] = {}
            for x in inputs:
                x_info = info(x.name)
                if x_info is None:
                    continue
                for c in set(x_info.pure.values()) | x_info.summed:
                    carried[c] = carried.get(c, True) and c in done_in[x.name]
            masked[node.name] = {c for c, ok in carried.items() if ok}
        return stuck

    def _plan_producers(self) -> None:
        """The straight-through gradient must reach a soft unit's own parameters and stop there.
        Let through the soft filter into the layer's input, it would train the kept layers before
        it for a channel the network does not use (measured: the kept filters of a ResNet-20's first
        stage got 45 times the gradient they get when the same units are zeroed, and the loss rose
        from 1.9 to 29 in ten steps). Each producer's backward gives its input only alpha_t of the
        soft rows' share (softprune.gradient_stop). Layers other than convolutions and linear layers cannot do that here:
        their groups are masked through their parameters instead."""
        for gi, group in enumerate(self.groups):
            for member in group.members_with(Role.FILTER):
                module = self.model.get_submodule(member.module)
                if member.param != "weight":
                    continue
                depthwise = (
                    isinstance(module, _CONVS) and module.groups > 1 and module.groups == module.in_channels
                )
                if depthwise:
                    continue  # reads the same units it writes: nothing of another unit to keep apart
                plain = (
                    isinstance(module, (*_CONVS, nn.Linear))
                    and member.dim == 0
                    and type(module).forward
                    in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, nn.Linear.forward)
                )
                layer = Layer.of(module) if plain else None
                if layer is not None:
                    self.producers.append(Producer(member.module, gi, member.unit, layer))
                else:
                    self.fallback.add(gi)

    @staticmethod
    def _info(analysis: Analysis, value: Any, group_of: torch.Tensor) -> _IdInfo | None:
        if not isinstance(value, torch.Tensor):
            return None
        ids = analysis.ids
        uniq = torch.unique(_narrowed(value))
        base = ids.base(uniq)
        pure: dict[int, int] = {}
        summed: set[int] = set()
        real = base > CONST
        sums = [i for i, bse in enumerate(base.tolist()) if bse in ids.parts and bse not in ids.collapsed]
        for i in sums:
            real[i] = False
            parts = torch.tensor(ids.parts[int(base[i])])
            classes = ids.label[ids.base(parts)]
            summed.update(c for c in classes.tolist() if int(group_of[c]) >= 0)
        classes = ids.label[base[real]]
        for ident, c, g in zip(uniq[real].tolist(), classes.tolist(), group_of[classes].tolist()):
            if g >= 0:
                pure[ident] = c
        return _IdInfo(pure, summed)

    def _add_point(self, module, call, where, arg, ids_tensor, need, group_of, unit_of) -> None:
        uniq, inverse = torch.unique(_narrowed(ids_tensor), return_inverse=True)
        index = {v: i for i, v in enumerate(uniq.tolist())}
        by_group: dict[int, tuple[list[int], list[int]]] = {}
        for ident, c in need.items():
            g = int(group_of[c])
            rows, units = by_group.setdefault(g, ([], []))
            rows.append(index[ident])
            units.append(int(unit_of[c]))
        owners = [(g, torch.tensor(r), torch.tensor(u)) for g, (r, u) in sorted(by_group.items())]
        self.points.append(Point(module, call, where, arg, uniq, inverse, owners))

    # -- masks ------------------------------------------------------------------------------------
    def update(self, soft: list[torch.Tensor], alpha: float) -> None:
        """Mask ``soft`` units (bool [size] per group) by ``alpha`` from now on; none: no hooks."""
        self.remove()
        self._masks = {}
        self._alpha = alpha
        if alpha >= 1.0:
            return
        for k, point in enumerate(self.points):
            values = None
            for g, rows, units in point.owners:
                if g in self.fallback:
                    continue
                hit = soft[g][units]
                if bool(hit.any()):
                    if values is None:
                        values = torch.ones(point.ids.numel())
                    values[rows[hit]] = alpha
            if values is not None:
                self._masks[k] = values[point.inverse]
        self._rows = {}
        for k, producer in enumerate(self.producers):
            if producer.group in self.fallback:
                continue
            unit = producer.unit
            flags = torch.zeros(unit.numel(), dtype=torch.bool)
            flags[unit >= 0] = soft[producer.group][unit[unit >= 0]]
            if bool(flags.any()):
                self._rows[k] = torch.nonzero(flags).view(-1)
        if self._masks:
            self._install()

    def install(self, gradient_stop: bool = True) -> None:
        """Put the hooks back after ``remove()``; ``gradient_stop=False`` leaves out the hooks that take
        the soft channels' share out of the gradient of the layers before them (a reference for tests)."""
        if not gradient_stop:
            self._rows = {}
        if self._masks:
            self._install()

    def _install(self) -> None:
        # producers first: a mask on the same module's output then wraps the output they rebuild
        for k, rows in self._rows.items():
            producer = self.producers[k]
            module = self.model.get_submodule(producer.module)
            hook = self._producer_hook(module, producer.layer, rows, self._alpha)
            self._handles.append(module.register_forward_hook(hook))
        by_module: dict[str, list[int]] = {}
        for k in self._masks:
            by_module.setdefault(self.points[k].module, []).append(k)
        counted = [name for name in by_module if self._n_calls.get(name, 1) > 1]
        if counted:
            self._handles.append(self.model.register_forward_pre_hook(self._reset_calls))
        for name, ks in by_module.items():
            module = self.model.get_submodule(name)
            inputs = [k for k in ks if self.points[k].where == "input"]
            outputs = [k for k in ks if self.points[k].where == "output"]
            if name in counted:
                self._handles.append(module.register_forward_pre_hook(self._counter(name)))
            if inputs:
                self._handles.append(
                    module.register_forward_pre_hook(self._input_hook(name, inputs), with_kwargs=True)
                )
            if outputs:
                self._handles.append(module.register_forward_hook(self._output_hook(name, outputs)))

    @staticmethod
    def _producer_hook(module: nn.Module, layer: Layer, rows: torch.Tensor, alpha: float):
        # The forward pass carries alpha of a soft channel, the straight-through backward all of its
        # gradient: the layer's input gets only alpha of the soft rows' share (none for SFP's 0).
        # The scale lives where the weight does, so no backward copies it there.
        scale = torch.ones(module.weight.shape[0], device=module.weight.device)
        scale[rows.to(scale.device)] = alpha

        def hook(module, args, output):
            x = args[0] if args else None
            if not (torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad):
                return None
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return None
            return SoftRowsGradient.apply(x, module.weight, module.bias, layer, scale, [output.detach()])

        return hook

    def _reset_calls(self, module, args) -> None:
        self._calls.clear()

    def _counter(self, name: str):
        def hook(module, args):
            self._calls[name] = self._calls.get(name, 0) + 1

        return hook

    def _current(self, name: str) -> int:
        n = self._n_calls.get(name, 1)
        return 0 if n == 1 else (self._calls.get(name, 1) - 1) % n

    def _input_hook(self, name: str, ks: list[int]):
        def hook(module, args, kwargs):
            call = self._current(name)
            args, changed = list(args), False
            for k in ks:
                point = self.points[k]
                if point.call != call:
                    continue
                if isinstance(point.arg, int) and point.arg < len(args):
                    args[point.arg] = straight_through(args[point.arg], self._masks[k])
                    changed = True
                elif isinstance(point.arg, str) and point.arg in kwargs:
                    kwargs = {**kwargs, point.arg: straight_through(kwargs[point.arg], self._masks[k])}
                    changed = True
            return (tuple(args), kwargs) if changed else None

        return hook

    def _output_hook(self, name: str, ks: list[int]):
        def hook(module, args, output):
            call = self._current(name)
            for k in ks:
                if self.points[k].call == call and isinstance(output, torch.Tensor):
                    output = straight_through(output, self._masks[k])
            return output

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._calls.clear()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    @contextmanager
    def lifted(self) -> Iterator[None]:
        """No hooks for the block (copies of the model made in it carry none), then the same masks."""
        active = self.active
        self.remove()
        try:
            yield
        finally:
            if active:
                self._install()

    # -- verification -----------------------------------------------------------------------------
    @torch.no_grad()
    def check(self, example_inputs: tuple, tolerance: float = 1e-5) -> list[int]:
        """Groups whose forward masks do not compute what zeroing their units computes (alpha = 0,
        every other unit soft); they move to the parameter fallback. Returns them."""
        from .masks import zero_units

        candidates = [g for g in range(len(self.groups)) if g not in self.fallback]
        if not candidates:
            return []
        saved_masks = dict(self._masks)
        active = self.active

        def trial(gs: list[int]) -> bool:
            soft = [torch.zeros(g.size, dtype=torch.bool) for g in self.groups]
            for g in gs:
                soft[g][::2] = True
                soft[g] &= ~self.groups[g].frozen
            touched = {
                id(t): (t, t.detach().clone())
                for g in gs
                for m in self.groups[g].members
                if m.role is not Role.CONSUMER
                for t in [m.tensor(self.model)]
            }
            with training_mode(self.model, training=False):
                self.update(soft, 0.0)
                masked = flat_outputs(self.model(*example_inputs))
                self.remove()
                for g in gs:
                    zero_units(self.groups[g], soft[g], self.model)
                zeroed = flat_outputs(self.model(*example_inputs))
            for t, value in touched.values():
                t.copy_(value)
            scale = float(zeroed.abs().max()) if zeroed.numel() else 0.0
            return bool((masked - zeroed).abs().max() <= tolerance * max(scale, 1e-12))

        failed: list[int] = []
        try:
            if not trial(candidates):
                failed = [g for g in candidates if not trial([g])]
        finally:
            self.remove()
            self._masks = saved_masks
            if active and saved_masks:
                self._install()
        for g in failed:
            log.warning(
                "group '%s': its soft units cannot be masked in the forward pass; they are masked "
                "through their parameters", self.groups[g].name
            )  # fmt: skip
        self.fallback.update(failed)
        return failed


def _narrowed(ids: torch.Tensor) -> torch.Tensor:
    """The ids with every dimension along which they do not change cut to one slice: the same
    distinct ids, and a mask built from them broadcasts to the tensor (at any spatial size)."""
    for d in reversed(range(ids.dim())):
        if ids.shape[d] > 1:
            first = ids.narrow(d, 0, 1)
            if bool((ids == first).all()):
                ids = first
    return ids.contiguous()


class SoftForward:
    """A pruner's forward masks of soft units over their life (channel scope).

    They are planned (traced, and checked with a forward pass) the first time they are needed: at
    the model's next forward pass, or when the pruner asks (before its own forward passes, so its
    hooks come after the masks'; before the masks or parameters are read or saved). A pruning step
    followed by compact() never pays for them. Groups the forward masks cannot reach are masked in
    their parameters instead (``fallback``), when the plan is made. ``host`` is the Pruner: its
    model, analysis, prunable, masks, alpha, mask_scope, example_inputs and optimizer are read.
    """

    def __init__(self, host: Any) -> None:
        self.host = host
        self.masks: SoftMasks | None = None
        self._pending: Any = None  # the forward pre-hook that plans them
        self._fallback_due = False  # fallback groups' soft units still to mask in their parameters

    @property
    def wanted(self) -> bool:
        h = self.host
        return h.mask_scope == "channel" and h.alpha < 1.0 and any(bool(m.soft.any()) for m in h.masks)

    def after_step(self, alpha: float) -> None:
        """Hard units zeroed; soft ones masked in the forward pass, or in their parameters (the
        papers' filter scope, and groups the forward masks cannot reach)."""
        h = self.host
        fallback = self.masks.fallback if self.masks is not None else set()
        for i in range(len(h.prunable)):
            in_params = h.mask_scope == "filter" or i in fallback
            self._apply(i, alpha if in_params else 1.0, clear=in_params and h.mask_scope == "channel")
        self._fallback_due = self.masks is None and self.wanted
        self.sync()

    def _apply(self, i: int, alpha: float, clear: bool) -> None:
        h = self.host
        group, mask = h.prunable[i], h.masks[i]
        apply(group, mask, h.model, alpha, h.mask_scope)
        if clear and bool(mask.soft.any()):
            clear_optimizer_state(h.optimizer, group, mask.soft, h.model)

    def sync(self) -> None:
        """Follow the host's soft units: now when planned, else at the model's next forward pass."""
        if self.masks is not None:
            self.masks.update([m.soft for m in self.host.masks], self.host.alpha)
        elif self.wanted and self._pending is None:
            self._pending = self.host.model.register_forward_pre_hook(lambda module, args: self.plan())

    def plan_pending(self) -> None:
        if self._pending is not None:
            self.plan()

    def drop_pending(self) -> bool:
        """Forget the pending plan (the model is being copied or replaced); whether there was one."""
        had = self._pending is not None
        if had:
            self._pending.remove()
            self._pending = None
        return had

    def plan(self) -> None:
        self.drop_pending()
        h = self.host
        if self.masks is not None or not self.wanted:
            return
        self.masks = SoftMasks(h.model, h.analysis, h.prunable)
        self.masks.check(h.example_inputs)
        if self._fallback_due:
            for i in sorted(self.masks.fallback):
                self._apply(i, h.alpha, clear=True)
            self._fallback_due = False
        self.sync()

    def reset(self, masked_already: bool = False) -> None:
        """Remove the masks: the model is replaced (compact_hard) or every soft unit became hard
        (finalize); ``masked_already``: the parameters need no fallback masking (a loaded state)."""
        self.drop_pending()
        if masked_already:
            self._fallback_due = False
        if self.masks is not None:
            self.masks.remove()
            self.masks = None


def lifted(masks: SoftMasks | None):
    """``masks.lifted()``, or nothing to lift."""
    return nullcontext() if masks is None else masks.lifted()


def _tensor_args(node: torch.fx.Node) -> list[tuple[Any, int | str]]:
    out: list[tuple[Any, int | str]] = [(a, i) for i, a in enumerate(node.args)]
    out += [(v, k) for k, v in node.kwargs.items()]
    return out


def flat_outputs(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().float().reshape(-1)
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        parts = [flat_outputs(v) for v in value]
        parts = [p for p in parts if p.numel()]
        return torch.cat(parts) if parts else torch.zeros(0)
    return torch.zeros(0)


@torch.no_grad()
def revived(
    groups: list[ChannelGroup], masks: list, old_soft: list[torch.Tensor], model: nn.Module, norm: Any
) -> tuple[int, float | None]:
    """How many soft units came back at a step (soft before it, kept after it), and the largest
    ``norm`` of their filters relative to the median kept filter of their group."""
    count, ratio = 0, None
    for group, mask, before in zip(groups, masks, old_soft):
        back = before & ~mask.pruned
        if not bool(back.any()):
            continue
        count += int(back.sum())
        kept = ~mask.pruned & ~back
        if not bool(kept.any()) or not group.members_with(Role.FILTER):
            continue
        norms = norm.scores(group, model)
        median = float(norms[kept].median())
        if median > 0:
            r = float(norms[back].max()) / median
            ratio = r if ratio is None else max(ratio, r)
    return count, ratio
