"""Compaction: turn a masked model into a physically smaller one that computes the same function.

See docs/design.md ("Compaction"). Given the analysis of a model and the set of pruned units, every
tensor of the trace gets a layout (for each dimension, the kept indices, or None when nothing is
removed) and every node is rewritten:

- modules with a handler are replaced by smaller ones built from the kept parameter slices;
- element-wise nodes whose inputs have different layouts (independent residual adds) place each
  input at its positions in the output layout (an index-add: SFP's "add the kept channels back");
- data-movement nodes run unchanged when they give the right result on compact tensors ("native"),
  a reshape with constant sizes gets the compact sizes, and otherwise the node runs at full width
  between a scatter and a gather.

The result is a copy of the user's model class with smaller modules when only module swaps and
parameter slices were needed, else a ``torch.fx.GraphModule`` with the same submodule names.
"""

from __future__ import annotations

import logging
import math
import operator
import warnings
from typing import Any

import torch
import torch.fx
from torch import nn

from .errors import SoftpruneError
from .graph.handlers import HANDLERS, copy_module
from .graph.ids import ZERO, collect_tensors, fetch_attr, flat_units, map_values, squeeze_broadcast
from .graph.module_rules import MODULE_RULES
from .graph.ops import FUNCTION_RULES, METHOD_RULES
from .graph.trace import Analysis
from .layers import ChannelRemap, PrunedMultiheadAttention

log = logging.getLogger(__name__)

Layout = tuple  # tuple[torch.Tensor | None, ...]


def layout_of(ids: torch.Tensor, alive: torch.Tensor) -> Layout:
    """The kept indices of each dimension of a tensor whose channel ids are ``ids``."""
    live = alive[squeeze_broadcast(ids)]  # a broadcast dimension keeps everything or nothing
    spread = [d for d in range(live.dim()) if live.shape[d] > 1]
    if len(spread) == 1:  # one channel dimension (a convolution's output): its own kept positions
        keep = live.reshape(-1)
        if bool(keep.all()) or not bool(keep.any()):
            return (None,) * ids.dim()
        return tuple(torch.nonzero(keep).view(-1) if d == spread[0] else None for d in range(ids.dim()))
    if not bool(live.any()):
        return (None,) * ids.dim()
    squeezed = squeeze_broadcast(ids)
    out = []
    for d in range(ids.dim()):
        if live.shape[d] <= 1:
            out.append(None)
            continue
        other = [i for i in range(ids.dim()) if i != d]
        keep = live.any(dim=other) if other else live
        keep = keep | _padded_border(squeezed, d, other)
        out.append(None if bool(keep.all()) else torch.nonzero(keep).view(-1))
    return tuple(out)


def _padded_border(ids: torch.Tensor, d: int, other: list[int]) -> torch.Tensor:
    """Positions along ``d`` that are a border F.pad added to a feature map: all zero by construction,
    along a dimension whose other positions all carry the same ids (a spatial one, not channels). A
    convolution's window reads them: they are positions of the map, never units to remove."""
    zero = (ids == ZERO).all(dim=other) if other else ids == ZERO
    if not bool(zero.any()) or bool(zero.all()):
        return torch.zeros_like(zero)
    real = ids.index_select(d, torch.nonzero(~zero).view(-1))
    spatial = bool((real == real.narrow(d, 0, 1)).all())
    return zero if spatial else torch.zeros_like(zero)


def apply_layout(ids: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The kept slices of ``ids``. Broadcast dimensions stay broadcast (a channel id expanded over
    H*W is not materialized: on a 224x224 ResNet-50 that was 0.02 s of copies)."""
    if all(idx is None for idx in layout):
        return ids
    small = squeeze_broadcast(ids)
    shape = list(ids.shape)
    for d, idx in enumerate(layout):
        if idx is not None:
            small = small.index_select(d, idx) if small.shape[d] > 1 else small
            shape[d] = idx.numel()
    return small if list(small.shape) == shape else small.expand(shape)


def _shrink(ids: Any, layout: Any) -> Any:
    """Compact ids of a (possibly nested) output, given its layouts in the same nesting."""
    if isinstance(ids, torch.Tensor):
        return apply_layout(ids, layout)
    if isinstance(ids, (tuple, list)) and not isinstance(ids, torch.Size):
        return type(ids)(_shrink(i, lay) for i, lay in zip(ids, layout))
    return ids


def _is_full(layout: Any) -> bool:
    if isinstance(layout, (tuple, list)) and layout and not isinstance(layout[0], (torch.Tensor, type(None))):
        return all(_is_full(x) for x in layout)
    return layout is None or all(i is None for i in layout)


def _rule_kind(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, ChannelRemap):
            return "remap"
        if type(module) in HANDLERS:
            return "handler"
        return getattr(MODULE_RULES.get(type(module)), "kind", "same")
    if node.op == "call_function":
        return getattr(FUNCTION_RULES.get(node.target), "kind", "same")
    if node.op == "call_method":
        return getattr(METHOD_RULES.get(node.target), "kind", "same")
    return node.op


class _Compactor:
    def __init__(self, analysis: Analysis, alive: torch.Tensor, model: nn.Module) -> None:
        self.a = analysis
        self.alive = alive
        self.old = analysis.gm
        self.modules = dict(self.old.named_modules())
        # A copy of the user's model, not of the trace: its containers keep their classes
        # (Sequential, ModuleList), so `small.layer1[0]` still works on the result. Modules about to
        # be replaced by smaller ones are not worth copying (most of the weights): the copy first
        # holds the user's own, and finish() copies any of them that ends up not replaced.
        self.model = model
        self.deferred = _replaced_soon(model, analysis, alive)
        memo: dict[int, Any] = {}
        for name in self.deferred:
            module = model.get_submodule(name)
            memo[id(module)] = module
        self.root = copy_module(model, memo)
        # the members of each module and of its submodules (an attention block owns out_proj's)
        self.members_of: dict[str, list] = {}
        for m in analysis.members:
            if m.dim is not None:
                for name in _with_ancestors(m.module):
                    self.members_of.setdefault(name, []).append(m)
        self.graph = torch.fx.Graph()
        self.env: dict[str, torch.fx.Node] = {}
        self.cval: dict[str, Any] = {}  # compact ids (tensors) or compact values (sizes, ints)
        self.layout: dict[str, Any] = {}
        self._expected: dict[int, tuple[torch.Tensor, Layout, torch.Tensor]] = {}  # by ids object
        self.full_env: dict[str, torch.fx.Node] = {}
        self.structural = False  # any node added or changed beyond module swaps and slices
        self.swapped: dict[str, nn.Module] = {}
        self._buffers = 0
        self.slices: dict[str, dict[int, torch.Tensor]] = {}  # parameter name -> {dim: kept indices}
        param = next(iter(self.old.parameters()), None)
        self.device = param.device if param is not None else torch.device("cpu")

    # -- helpers -------------------------------------------------------------------------------
    def remap(
        self,
        x: torch.fx.Node,
        dim: int,
        src: torch.Tensor | None,
        dst: torch.Tensor,
        in_size: int,
        out_size: int,
        base: torch.fx.Node | None = None,
    ) -> torch.fx.Node:
        """Insert a ChannelRemap module (src=None: every input position, in order)."""
        src = torch.arange(in_size) if src is None else src
        name = f"_softprune_remap_{self._buffers}"
        while hasattr(self.root, name):  # a compact model compacted again keeps its own remaps
            self._buffers += 1
            name = f"_softprune_remap_{self._buffers}"
        self._buffers += 1
        self.root.add_module(name, ChannelRemap(dim, src, dst, in_size, out_size).to(self.device))
        return self.graph.call_module(name, (x,) if base is None else (x, base))

    def ids_of(self, node: torch.fx.Node) -> Any:
        return self.a.node_ids[node.name]

    def expected(self, node: torch.fx.Node) -> tuple[Any, Any]:
        """(layout, compact ids) of a node from its full ids."""
        ids = self.ids_of(node)
        if isinstance(ids, torch.Tensor):
            # element-wise rules pass their input's ids on (conv -> BatchNorm -> ReLU: one tensor)
            seen = self._expected.get(id(ids))
            if seen is None or seen[0] is not ids:
                layout = layout_of(ids, self.alive)
                seen = self._expected[id(ids)] = (ids, layout, apply_layout(ids, layout))
            return seen[1], seen[2]
        layout = map_values(ids, lambda t: layout_of(t, self.alive) if isinstance(t, torch.Tensor) else None)
        return layout, _shrink(ids, layout)

    def to_full(self, old: torch.fx.Node) -> torch.fx.Node:
        """A node giving ``old``'s value at full width (zeros at removed positions)."""
        if old.name in self.full_env:
            return self.full_env[old.name]
        layout = self.layout.get(old.name)
        if old.name in self.env and _is_full(layout) and not self._size_changed(old):
            return self.env[old.name]
        val = self.ids_of(old) if old.name in self.a.node_ids else None
        if isinstance(val, torch.Tensor):
            new = self.env[old.name]
            for d, idx in enumerate(layout or ()):
                if idx is not None:
                    new = self.remap(new, d, None, idx, idx.numel(), val.shape[d])
        elif old.op in ("placeholder", "get_attr") or val is None or not collect_tensors(val):
            if old.op in ("call_function", "call_method") and any(
                isinstance(a, torch.fx.Node) for a in old.all_input_nodes
            ):
                new = self.graph.node_copy(old, lambda n: self.to_full(n))
            else:
                new = self.env[old.name]
        else:
            raise SoftpruneError(f"internal: cannot rebuild full-width value of node '{old.name}'")
        self.full_env[old.name] = new
        return new

    def _size_changed(self, node: torch.fx.Node) -> bool:
        """A size read from a pruned tensor (``C`` of ``B, C, H, W = x.shape``): the full-width value is
        another number, so a full-width fallback must compute it again from full-width tensors."""
        if node.name not in self.a.node_vals or node.name not in self.cval:
            return False
        full, compact = self.a.node_vals[node.name], self.cval[node.name]
        try:
            return bool(full != compact)
        except Exception:  # noqa: BLE001  (values that do not compare are not sizes)
            return False

    def run_compact(self, node: torch.fx.Node, args: tuple, kwargs: dict) -> Any:
        """Execute a movement op on compact ids (``args`` mapped from compact values)."""
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module":
            return self.modules[node.target](*args, **kwargs)
        return node.target(*args, **kwargs)

    def compact_args(self, node: torch.fx.Node) -> tuple[tuple, dict]:
        args = torch.fx.node.map_arg(node.args, lambda n: self.cval[n.name])
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: self.cval[n.name])
        return args, kwargs

    # -- node kinds ----------------------------------------------------------------------------
    def placeholder(self, node: torch.fx.Node) -> None:
        self.env[node.name] = self.graph.node_copy(node)
        self.cval[node.name] = self.ids_of(node)
        self.layout[node.name] = None

    def get_attr(self, node: torch.fx.Node) -> None:
        self.env[node.name] = self.graph.node_copy(node)
        ids = self.a.param_ids.get(node.target)
        if isinstance(ids, torch.Tensor):
            layout = layout_of(ids, self.alive)
            self.layout[node.name] = layout
            self.cval[node.name] = apply_layout(ids, layout)
            if not _is_full(layout):
                self.slices[node.target] = {d: idx for d, idx in enumerate(layout) if idx is not None}
                value = fetch_attr(self.old, node.target)
                small = apply_layout(
                    value.detach(), tuple(None if i is None else i.to(value.device) for i in layout)
                )
                owner_name, _, attr = node.target.rpartition(".")
                owner = self.root.get_submodule(owner_name) if owner_name else self.root
                if isinstance(value, nn.Parameter):
                    setattr(owner, attr, nn.Parameter(small.clone(), requires_grad=value.requires_grad))
                elif attr in owner._buffers or not hasattr(owner, attr):
                    owner.register_buffer(attr, small.clone())
                else:  # a tensor constant torch.fx stored as a plain attribute (_tensor_constant0)
                    setattr(owner, attr, small.clone())
        else:
            value = fetch_attr(self.old, node.target)
            self.cval[node.name] = value
            self.layout[node.name] = None

    def handler_module(self, node: torch.fx.Node) -> None:
        name = node.target
        module = self.modules[name]
        # a leaf's own parameters ("weight") and its submodules' ("out_proj.weight")
        members = {
            (m.param if m.module == name else f"{m.module[len(name) + 1 :]}.{m.param}", m.dim): m
            for m in self.members_of.get(name, ())
        }
        kept: dict[tuple[str, int], torch.Tensor | None] = {}

        out_layout, out_c = self.expected(node)

        def tensor_layout(layout: Any, dim: int) -> torch.Tensor | None:
            return (
                layout[dim]
                if isinstance(layout, tuple) and layout and not isinstance(layout[0], tuple)
                else None
            )

        def keep(param: str, dim: int) -> torch.Tensor | None:
            """Kept positions of a declared parameter slice; "input:i" and "output" give the layouts
            of the module's i-th input and of its output (for modules without parameters to slice)."""
            if param == "output":
                return tensor_layout(out_layout, dim)
            if param.startswith("input:"):
                arg = node.args[int(param[6:])]
                return (
                    tensor_layout(self.layout.get(arg.name), dim) if isinstance(arg, torch.fx.Node) else None
                )
            m = members.get((param, dim))
            if m is None:
                return None
            if (param, dim) not in kept:
                live = self.alive[m.unit]
                kept[param, dim] = None if bool(live.all()) else torch.nonzero(live).view(-1)
            return kept[param, dim]

        if name not in self.swapped:
            handler = HANDLERS[type(module)]
            if any(keep(p, d) is not None for p, d in members):
                new = handler.compact(module, keep)
                if new is not module:
                    self.swapped[name] = new
                    _set_submodule(self.root, name, new)
                    for param, dim in members:  # what survived of each parameter, for optimizer state
                        index = keep(param, dim)
                        if index is not None:
                            self.slices.setdefault(f"{name}.{param}", {})[dim] = index
        self.env[node.name] = self.graph.node_copy(node, lambda n: self.env[n.name])
        self.layout[node.name], self.cval[node.name] = out_layout, out_c

    def same(self, node: torch.fx.Node) -> None:
        """Ops that keep layouts by construction (element-wise unary, pooling, reductions)."""
        self.env[node.name] = self.graph.node_copy(node, lambda n: self.env[n.name])
        dims = self.a.mean_rescale.get(node.name)
        if dims is not None:  # a mean over channels some of which are gone: sum / full count
            source = node.args[0]
            full, kept = self.ids_of(source).shape, self.cval[source.name].shape
            ratio = math.prod(kept[d] for d in dims) / math.prod(full[d] for d in dims)
            if ratio != 1:
                self.env[node.name] = self.graph.call_function(operator.mul, (self.env[node.name], ratio))
                self.structural = True
        if node.name in self.a.node_ids and collect_tensors(self.ids_of(node)):
            self.layout[node.name], self.cval[node.name] = self.expected(node)
        else:
            target = node.args[0] if node.args else None
            if node.target is operator.setitem and isinstance(self.cval.get(target.name), torch.Tensor):
                # written in place: ids that are a broadcast view (an attention map's) get their own memory
                self.cval[target.name] = self.cval[target.name].contiguous()
            args, kwargs = self.compact_args(node)
            self.cval[node.name] = self.run_compact(node, args, kwargs)
            self.layout[node.name] = None

    def _positions(self, layout: Any, dim: int, size: int) -> torch.Tensor:
        index = layout[dim] if isinstance(layout, tuple) else None
        return torch.arange(size) if index is None else index

    def remap_node(self, node: torch.fx.Node) -> None:
        """A ChannelRemap of a compact model compacted again: its index lists are rebuilt for the
        surviving positions, and a base it adds into is aligned with the output first."""
        module = self.modules[node.target]
        out_layout, out_c = self.expected(node)
        self.layout[node.name], self.cval[node.name] = out_layout, out_c
        d = module.dim
        x, base = node.args[0], node.args[1] if len(node.args) > 1 else None
        k_in = self._positions(self.layout.get(x.name), d, module.in_size)
        k_out = self._positions(out_layout, d, module.out_size)
        moves = torch.isin(module.src, k_in) & torch.isin(module.dst, k_out)
        src, dst = torch.searchsorted(k_in, module.src[moves]), torch.searchsorted(k_out, module.dst[moves])
        base_node = None
        if base is not None:
            base_node = self.env[base.name]
            k_base = self._positions(self.layout.get(base.name), d, module.out_size)
            if not torch.equal(k_base, k_out):
                self.structural = True
                common = k_base[torch.isin(k_base, k_out)]
                base_node = self.remap(
                    base_node, d, torch.searchsorted(k_base, common), torch.searchsorted(k_out, common),
                    k_base.numel(), k_out.numel(),
                )  # fmt: skip
        same_base = base is None or base_node is self.env[base.name]
        if same_base and k_in.numel() == module.in_size and k_out.numel() == module.out_size:
            self.env[node.name] = self.graph.node_copy(node, lambda n: self.env[n.name])
            return
        self.structural = True
        self.env[node.name] = self.remap(
            self.env[x.name], d, src, dst, k_in.numel(), k_out.numel(), base=base_node
        )

    def binary(self, node: torch.fx.Node) -> None:
        """Element-wise op: inputs whose layout differs from the output's are remapped into it."""
        out_layout, out_c = self.expected(node)
        self.layout[node.name], self.cval[node.name] = out_layout, out_c
        out_ids = self.ids_of(node)
        fixes: dict[int, list[tuple[int, torch.Tensor | None, torch.Tensor, int, int]]] = {}
        for i, arg in enumerate(node.args[:2]):
            if not isinstance(arg, torch.fx.Node) or not isinstance(self.ids_of(arg), torch.Tensor):
                continue
            in_ids, in_layout = self.ids_of(arg), self.layout[arg.name]
            offset = out_ids.dim() - in_ids.dim()
            for d in range(in_ids.dim()):
                n = in_ids.shape[d]
                if n == 1:
                    continue  # broadcast
                src_full = torch.arange(n) if in_layout is None or in_layout[d] is None else in_layout[d]
                o = out_layout[d + offset]
                dst_full = torch.arange(n) if o is None else o
                if torch.equal(src_full, dst_full):
                    continue
                common = src_full[torch.isin(src_full, dst_full)]
                src = torch.searchsorted(src_full, common)
                dst = torch.searchsorted(dst_full, common)
                fixes.setdefault(i, []).append(
                    (
                        d,
                        None if src.numel() == src_full.numel() else src,
                        dst,
                        src_full.numel(),
                        dst_full.numel(),
                    )
                )
        if not fixes:
            self.env[node.name] = self.graph.node_copy(node, lambda n: self.env[n.name])
            return
        self.structural = True
        args = list(torch.fx.node.map_arg(node.args, lambda n: self.env[n.name]))
        if _is_add(node) and len(fixes) == 1 and not node.kwargs:
            (i, steps), other = next(iter(fixes.items())), None
            other = node.args[1 - i]
            if len(steps) == 1 and isinstance(other, torch.fx.Node):
                # a pruned branch added into a wider stream: one fused "add at these channels"
                d, src, dst, n_in, n_out = steps[0]
                offset = out_ids.dim() - self.ids_of(node.args[i]).dim()
                self.env[node.name] = self.remap(args[i], d + offset, src, dst, n_in, n_out, base=args[1 - i])
                return
        for i, steps in fixes.items():
            for d, src, dst, n_in, n_out in steps:
                args[i] = self.remap(args[i], d, src, dst, n_in, n_out)
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: self.env[n.name])
        self.env[node.name] = self.graph.create_node(
            node.op, node.target, tuple(args), kwargs, name=node.name
        )

    def movement(self, node: torch.fx.Node) -> None:
        out_layout, out_c = self.expected(node)
        self.layout[node.name], self.cval[node.name] = out_layout, out_c
        args, kwargs = self.compact_args(node)
        if self._matches(node, args, kwargs, out_c):
            self.env[node.name] = self.graph.node_copy(node, lambda n: self.env[n.name])
            return
        self.structural = True
        rewritten = self._reshape_rewrite(node, args, kwargs, out_c)
        if rewritten is not None:
            self.env[node.name] = rewritten
            return
        # last resort: run at full width, then keep the surviving positions
        full = self.graph.node_copy(node, lambda n: self.to_full(n))
        full_ids = self.ids_of(node)
        if not isinstance(full_ids, torch.Tensor):
            # several outputs (chunk, split): they stay full width; each getitem selects its part
            self.env[node.name] = full
            self.layout[node.name] = map_values(full_ids, lambda t: None)
            self.cval[node.name] = full_ids
            return
        self.env[node.name] = self._select_layout(full, out_layout, tuple(full_ids.shape))

    def _matches(self, node, args, kwargs, expected) -> bool:
        try:
            got = self.run_compact(node, args, kwargs)
        except Exception:  # wrong sizes on compact ids (the op is not native), or a view of broadcast ids
            dense = map_values((args, kwargs), lambda v: v.contiguous() if isinstance(v, torch.Tensor) else v)
            try:
                got = self.run_compact(node, *dense)
            except Exception:
                return False
        return _same_ids(got, expected)

    def _reshape_rewrite(self, node, args, kwargs, expected) -> torch.fx.Node | None:
        """view/reshape with constant sizes: use the compact sizes where they changed."""
        is_method = node.op == "call_method" and node.target in ("view", "reshape")
        is_fn = node.op == "call_function" and node.target is torch.reshape
        if not (is_method or is_fn) or not isinstance(expected, torch.Tensor):
            return None
        old_shape = (
            node.args[1:]
            if len(node.args) > 2 or not isinstance(node.args[1], (tuple, list))
            else node.args[1]
        )
        full_val = self.ids_of(node)
        if len(old_shape) != expected.dim():
            return None
        new_shape = []
        for i, s in enumerate(old_shape):
            if isinstance(s, torch.fx.Node):
                if self.cval[s.name] not in (-1, expected.shape[i]):
                    return None
                new_shape.append(self.env[s.name])
            elif s == -1 or s == expected.shape[i]:
                new_shape.append(s)
            elif s == full_val.shape[i]:
                new_shape.append(expected.shape[i])
            else:
                return None
        x = self.env[node.args[0].name]
        new = self.graph.call_method("reshape", (x, *new_shape))
        cargs = [
            self.cval[node.args[0].name],
            *[self.cval[s.name] if isinstance(s, torch.fx.Node) else s for s in new_shape],
        ]
        if not self._matches(
            type("N", (), {"op": "call_method", "target": "reshape"})(), cargs, {}, expected
        ):
            self.graph.erase_node(new)
            return None
        return new

    def _select_layout(self, full: torch.fx.Node, layout: Any, sizes: tuple) -> torch.fx.Node:
        if isinstance(layout, tuple) and all(isinstance(i, (torch.Tensor, type(None))) for i in layout):
            x = full
            for d, idx in enumerate(layout):
                if idx is not None:
                    x = self.remap(x, d, idx, torch.arange(idx.numel()), int(sizes[d]), idx.numel())
            return x
        if _is_full(layout):
            return full
        raise SoftpruneError("internal: a full-width fallback with several outputs of changed layout")

    def output(self, node: torch.fx.Node) -> None:
        def fix(n: torch.fx.Node) -> torch.fx.Node:
            return self.to_full(n) if not _is_full(self.layout.get(n.name)) else self.env[n.name]

        self.graph.output(torch.fx.node.map_arg(node.args[0], fix))

    def finish(self) -> None:
        """Give every module that kept its tensors shared with the user's model its own copy."""
        for name in self.deferred:
            replaced = any(a in self.swapped for a in _with_ancestors(name))
            if not replaced:  # neither it nor a module holding it (an attention block) was replaced
                _set_submodule(self.root, name, copy_module(self.model.get_submodule(name)))

    # -- driver --------------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.old.graph.nodes:
            if node.op == "placeholder":
                self.placeholder(node)
            elif node.op == "get_attr":
                self.get_attr(node)
            elif node.op == "output":
                self.output(node)
            elif not collect_tensors(self.a.node_ids.get(node.name)):
                self.same(node)  # sizes and their arithmetic: recomputed on compact values
            else:
                kind = _rule_kind(node, self.modules)
                if kind == "handler":
                    self.handler_module(node)
                elif kind == "binary":
                    self.binary(node)
                elif kind == "remap":
                    self.remap_node(node)
                elif kind == "movement":
                    self.movement(node)
                else:
                    self.same(node)
        self.finish()


def _with_ancestors(name: str) -> list[str]:
    """ "a.b.c" -> ["a", "a.b", "a.b.c"]: a module's qualified name and those of the modules holding it."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """root.set_submodule(name, module) for a name that exists, without its per-level checks."""
    parent = root
    *path, last = name.split(".")
    for part in path:
        parent = parent._modules.get(part)
        if parent is None:
            break
    if parent is not None and last in parent._modules:
        parent._modules[last] = module
    else:
        root.set_submodule(name, module)


def _replaced_soon(model: nn.Module, analysis: Analysis, alive: torch.Tensor) -> list[str]:
    """Modules about to be replaced by smaller ones: the trace's leaves (or modules without children)
    that lose units, own their tensors and submodules alone, and appear once in ``model``. An
    attention block counts as one (its in_proj_weight is most of a ViT's weights)."""
    sliced = [m for m in analysis.members if m.dim is not None]
    if not sliced:
        return []
    units, owner, _ = flat_units(sliced)
    loses = torch.zeros(len(sliced), dtype=torch.long).index_add_(0, owner, (~alive[units]).long()) > 0
    losing: set[str] = set()  # modules that lose units, and every module holding one
    for m, lost in zip(sliced, loses.tolist()):
        if lost:
            losing.update(_with_ancestors(m.module))
    leaves = set(analysis.module_of_node.values())
    seen_modules: dict[int, int] = {}
    seen_tensors: dict[int, int] = {}
    named: dict[str, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        seen_modules[id(module)] = seen_modules.get(id(module), 0) + 1
        named.setdefault(name, module)
        for table in (module._parameters, module._buffers):
            for t in table.values():
                if t is not None:
                    seen_tensors[id(t)] = seen_tensors.get(id(t), 0) + 1
    names: list[str] = []
    taken: set[str] = set()
    for name, module in named.items():
        if name not in losing or not name:
            continue
        has_children = any(c is not None for c in module._modules.values())
        if has_children and name not in leaves:
            continue
        if any(a in taken for a in _with_ancestors(name)[:-1]):
            continue  # inside a module already deferred
        subtree = list(module.modules())
        if any(seen_modules[id(s)] > 1 for s in subtree):
            continue
        tensors = [t for s in subtree for table in (s._parameters, s._buffers) for t in table.values()]
        if all(seen_tensors.get(id(t), 0) == 1 for t in tensors if t is not None):
            names.append(name)
            taken.add(name)
    return names


def _is_add(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in ("add", "__add__")
    return node.target in (operator.add, operator.iadd, torch.add)


def _same_ids(got: Any, expected: Any) -> bool:
    if isinstance(expected, torch.Tensor):
        return isinstance(got, torch.Tensor) and got.shape == expected.shape and torch.equal(got, expected)
    if isinstance(expected, (tuple, list)):
        return (
            isinstance(got, (tuple, list))
            and len(got) == len(expected)
            and all(_same_ids(g, e) for g, e in zip(got, expected))
        )
    return True


def compact_model(
    model: nn.Module, analysis: Analysis, pruned_classes: torch.Tensor, slices: dict | None = None
) -> nn.Module:
    """A smaller model equal to ``model`` (masked) with the units of ``pruned_classes`` removed.

    ``model`` is not changed. The result is a copy of ``model``'s class with smaller modules when the
    forward works unchanged at the new widths, else a GraphModule holding the same submodules. A dict
    passed as ``slices`` is filled with what survived of each parameter: name -> {dim: kept indices}.
    """
    alive = analysis.ids.alive(pruned_classes)
    worker = _Compactor(analysis, alive, model)
    worker.run()
    small = worker.root
    if worker.structural:  # otherwise the graph is not used: the result is the user's class
        worker.graph.lint()
        graph_module = torch.fx.GraphModule(worker.root, worker.graph, class_name=type(model).__name__)
        for name, child in worker.root.named_children():
            graph_module._modules[name] = child
        small = graph_module
        if analysis.decisions:
            warnings.warn(
                f"the compact {type(model).__name__} is a graph, and its forward branches on sizes "
                f"({analysis.decisions[0]}, {len(analysis.decisions)} decisions): they were taken as for the "
                "example input, so run it at that input size",
                stacklevel=3,
            )
    small.train(model.training)
    if slices is not None:
        slices.update(worker.slices)
    return small


__all__ = ["ChannelRemap", "PrunedMultiheadAttention", "compact_model", "layout_of"]
