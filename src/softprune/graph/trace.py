"""Channel dependency analysis: trace a model and find its channel groups.

See docs/design.md ("The channel graph"). The model is traced with torch.fx; the trace is run once
on the example input with real tensors and, beside each, a tensor of channel ids of the same shape
(batch 1). Handlers (modules with parameters) and op rules (everything else) move the ids; joined
ids become units; units sharing producers become groups.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from ..errors import SoftpruneError
from ..modes import training_mode
from . import functional  # noqa: F401  (registers the rules of functional ops)
from .capture import _trace_graph
from .groups import ChannelGroup, Member, Role
from .handlers import HANDLERS, register_optional_modules
from .ids import (
    CONST,
    Context,
    IdTable,
    collect_tensors,
    fetch_attr,
    flat_units,
    has_tensor,
    map_values,
    unique_pairs,
)
from .module_rules import MODULE_RULES, register_optional_rules
from .ops import FUNCTION_RULES, METHOD_RULES, rule_for_unknown


class Traced:
    """A model and its fx graph, for reading: what a GraphModule offers the analysis and compaction
    (``.graph``, submodules and attributes by qualified name) without building one, which copies
    the module tree and generates code (5 ms on a MobileNetV2)."""

    def __init__(self, model: nn.Module, graph: torch.fx.Graph) -> None:
        self.model = model
        self.graph = graph

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


@dataclass
class Analysis:
    """The result of running the ids through a trace."""

    model: nn.Module
    gm: torch.fx.GraphModule | Traced  # the graph, and the modules its nodes name
    residual: str
    ids: IdTable = field(default_factory=IdTable)
    members: list[Member] = field(default_factory=list)
    member_index: dict[tuple, Member] = field(default_factory=dict)
    node_ids: dict[str, Any] = field(default_factory=dict)  # node name -> ids (tensor or nested)
    param_ids: dict[str, torch.Tensor] = field(default_factory=dict)  # parameters used outside modules
    node_vals: dict[str, Any] = field(default_factory=dict)  # node name -> non-tensor values
    param_nodes: dict[str, str] = field(default_factory=dict)  # get_attr node name -> qualified name
    module_of_node: dict[str, str] = field(default_factory=dict)
    consumers: dict[str, list[str]] = field(default_factory=dict)
    # control flow on traced values taken as on the example input ("file:line: value"); see ConcreteTracer
    decisions: list[str] = field(default_factory=list)
    # mean nodes over channels that compaction multiplies by kept/full: node name -> reduced dims
    mean_rescale: dict[str, list[int]] = field(default_factory=dict)


def example_batch1(example_inputs: tuple) -> tuple:
    def one(x):
        return x[:1] if isinstance(x, torch.Tensor) and x.dim() > 0 else x

    return tuple(map_values(x, one) for x in example_inputs)


def analyze(
    model: nn.Module,
    example_inputs: tuple,
    *,
    residual: str = "coupled",
    handlers: dict | None = None,
    leaf_modules: Iterable[str] = (),
    gm: torch.fx.GraphModule | None = None,
) -> Analysis:
    """Trace ``model`` and run ids through it on ``example_inputs`` (only the first sample is used).

    The rules need shapes and sizes, not values: stock convolutions, Linear layers and attention
    give zeros of their output's shape instead of computing it (see :func:`shape_without_arithmetic`).
    """

    register_optional_modules()
    register_optional_rules()
    handlers = {**HANDLERS, **(handlers or {})}
    decisions: list[str] = []
    if gm is None:
        graph, decisions = _trace_graph(
            model, handlers, MODULE_RULES, leaf_modules, example_batch1(example_inputs)
        )
        gm = Traced(model, graph)
    result = _run_ids(model, gm, example_inputs, residual, handlers, leaf_modules)
    result.decisions = decisions
    return result


_STOCK_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_STOCK_CONV = {c: (c.forward, c._conv_forward) for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d)}


def shape_without_arithmetic(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """Zeros of the output's shape for a stock convolution, Linear or attention, or None to run the
    module.

    The analysis needs shapes, not values, and these layers are nearly all of a network's arithmetic
    (ResNet-50 at 224: 0.05 s of convolutions). Anything unusual (a subclass with its own forward,
    masks, a size mismatch the real layer should report) runs for real.
    """
    if type(module) is nn.MultiheadAttention:
        return _attention_shape_without_arithmetic(module, args, kwargs)
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return None
    x, kind = args[0], type(module)
    if kind in _STOCK_BATCHNORM and kind.forward is nn.BatchNorm2d.forward:
        # eval mode with running statistics: an affine map per channel, the shape unchanged
        usable = not module.training and module.running_mean is not None and x.dim() > 1
        return x.new_zeros(x.shape) if usable and x.shape[1] == module.num_features else None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or x.dtype != weight.dtype or x.device != weight.device:
        return None
    if kind is nn.Linear and kind.forward is nn.Linear.forward:
        if x.dim() == 0 or x.shape[-1] != module.in_features:
            return None
        return x.new_zeros(*x.shape[:-1], module.out_features)
    if _STOCK_CONV.get(kind) != (kind.forward, getattr(kind, "_conv_forward", None)):
        return None
    nd = weight.dim() - 2
    if x.dim() not in (nd + 1, nd + 2) or x.shape[-nd - 1] != module.in_channels:
        return None
    spatial = []
    for i in range(nd):
        size = x.shape[x.dim() - nd + i]
        if module.padding == "same":
            out = size
        else:
            pad = 0 if module.padding == "valid" else module.padding[i]
            span = module.dilation[i] * (module.kernel_size[i] - 1) + 1
            out = (size + 2 * pad - span) // module.stride[i] + 1
        if out <= 0:
            return None
        spatial.append(out)
    return x.new_zeros(*x.shape[: x.dim() - nd - 1], module.out_channels, *spatial)


_ATTENTION_ARGS = (
    "query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal",
)  # fmt: skip


def _attention_shape_without_arithmetic(m: nn.MultiheadAttention, args: tuple, kwargs: dict) -> tuple | None:
    """(output, weights) of a stock nn.MultiheadAttention as zeros of their shapes (no masks)."""
    if len(args) > len(_ATTENTION_ARGS) or set(kwargs) - set(_ATTENTION_ARGS):
        return None
    given = {**dict(zip(_ATTENTION_ARGS, args)), **kwargs}
    q, k, v = given.get("query"), given.get("key"), given.get("value")
    if given.get("key_padding_mask") is not None or given.get("attn_mask") is not None:
        return None
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)) or q.dim() not in (2, 3):
        return None
    widths = (q.shape[-1], k.shape[-1], v.shape[-1])
    if not (q.dim() == k.dim() == v.dim()) or widths != (m.embed_dim, m.kdim, m.vdim):
        return None
    weight = m.out_proj.weight
    if q.dtype != weight.dtype or q.device != weight.device or k.shape[:-1] != v.shape[:-1]:
        return None
    batched = q.dim() == 3
    first = m.batch_first and batched
    length, source = q.shape[1 if first else 0], k.shape[1 if first else 0]
    if batched and q.shape[0 if first else 1] != k.shape[0 if first else 1]:
        return None
    out = q.new_zeros(*q.shape[:-1], m.embed_dim)
    if not given.get("need_weights", True):
        return out, None
    heads = () if given.get("average_attn_weights", True) else (m.num_heads,)
    batch = (q.shape[0 if first else 1],) if batched else ()
    return out, q.new_zeros(*batch, *heads, length, source)


def _run_ids(model, gm, example_inputs, residual, handlers, leaf_modules) -> Analysis:

    result = Analysis(model=model, gm=gm, residual=residual)
    ids = result.ids
    inputs = iter(example_batch1(example_inputs))

    def call(module: nn.Module, args, kwargs):
        shaped = shape_without_arithmetic(module, args, kwargs)
        return shaped if shaped is not None else module(*args, **kwargs)

    vals: dict[str, Any] = {}
    idmap: dict[str, Any] = {}
    modules = dict(gm.named_modules())

    traced = [gm] if isinstance(gm, nn.Module) else []
    with training_mode(model, *traced, training=False), torch.no_grad():
        for node in gm.graph.nodes:
            ctx = Context(result, node)
            if node.op == "placeholder":
                try:
                    val = next(inputs)
                except StopIteration:
                    if node.args:  # a default value
                        val = node.args[0]
                    else:
                        raise SoftpruneError(
                            f"the model's forward takes an input '{node.target}' that example_inputs does not give"
                        ) from None
                vals[node.name] = val
                idmap[node.name] = map_values(
                    val, lambda v: torch.full(v.shape, CONST) if isinstance(v, torch.Tensor) else None
                )
                continue
            if node.op == "output":
                out_ids = collect_tensors(_load(node.args, idmap))
                for t in out_ids:
                    ids.freeze(t, "reaches the model's output")
                continue
            args = _load(node.args, vals)
            kwargs = _load(node.kwargs, vals)
            arg_ids = _load(node.args, idmap)
            kwarg_ids = _load(node.kwargs, idmap)
            if node.op == "get_attr":
                val = fetch_attr(gm, node.target)
                vals[node.name] = val
                if isinstance(val, torch.Tensor):
                    result.param_nodes[node.name] = node.target
                    idmap[node.name] = _LazyParam(node.target)
                else:
                    idmap[node.name] = None
                continue
            if node.op == "call_module":
                module = modules[node.target]
                val = call(module, args, kwargs)
                ctx.module_name = node.target
                ctx.out = val
                result.module_of_node[node.name] = node.target
                arg_ids = _materialize(arg_ids, result, node)
                kwarg_ids = _materialize(kwarg_ids, result, node)
                handler = handlers.get(type(module))
                if handler is not None:
                    out = handler.propagate(module, ctx, *arg_ids, **kwarg_ids)
                elif type(module) in MODULE_RULES:
                    out = MODULE_RULES[type(module)](ctx, module, arg_ids, kwarg_ids, args, kwargs)
                elif node.target in set(leaf_modules):
                    out = _opaque(ctx, arg_ids, kwarg_ids, val, f"module '{node.target}' is listed in ignore")
                else:
                    raise SoftpruneError(
                        f"softprune has no handler for module '{node.target}' ({type(module).__name__}). "
                        "Either pass ignore=['" + node.target + "'] to keep it whole, or register a handler "
                        "with softprune.register_handler(" + type(module).__name__ + ", handler)"
                    )
            else:  # call_function / call_method
                fn = node.target
                if node.op == "call_method":
                    self_val = args[0]
                    val = getattr(self_val, fn)(*args[1:], **kwargs)
                    rule = METHOD_RULES.get(fn) if isinstance(self_val, torch.Tensor) else None
                else:
                    val = fn(*args, **kwargs)
                    rule = FUNCTION_RULES.get(fn)
                ctx.out = val
                tensor_input = has_tensor(args) or has_tensor(kwargs)
                if not tensor_input:
                    out = map_values(
                        val, lambda v: torch.full(v.shape, CONST) if isinstance(v, torch.Tensor) else None
                    )
                else:
                    arg_ids = _materialize(arg_ids, result, node)
                    kwarg_ids = _materialize(kwarg_ids, result, node)
                    if rule is None:
                        rule = rule_for_unknown(node)
                    out = rule(ctx, arg_ids, kwarg_ids, args, kwargs)
            vals[node.name] = val
            idmap[node.name] = out
            _check_shapes(node, val, out)
    result.node_ids = idmap
    result.node_vals = {k: v for k, v in vals.items() if not isinstance(v, torch.Tensor)}
    return result


class _LazyParam:
    """ids of a parameter used outside a module, made only when an op needs them element by element."""

    def __init__(self, name: str) -> None:
        self.name = name


def _materialize(value: Any, result: Analysis, node: torch.fx.Node) -> Any:
    def one(v):
        if not isinstance(v, _LazyParam):
            return v
        made = result.param_ids.get(v.name)
        if made is None:
            param = fetch_attr(result.gm, v.name)
            if param.numel() == 1:
                # one number shared by every channel (StarReLU's scale and bias, HGNetV2's learnable
                # affine): a constant to them. As a unit of its own it joined all the channels it
                # touches into one, so nothing could be pruned.
                made = torch.full(param.shape, CONST)
                result.param_ids[v.name] = made
                return made
            made = result.ids.new(param.numel()).view(param.shape)
            result.param_ids[v.name] = made
            mult_only = all(
                u.op in ("call_function", "call_method")
                and str(getattr(u.target, "__name__", u.target)) in ("mul", "mul_", "truediv", "div")
                for u in node.graph.find_nodes(op="get_attr", target=v.name)[0].users
            )
            module, _, attr = v.name.rpartition(".")
            result.members.append(
                Member(module, attr, None, made, Role.SCALE if mult_only else Role.ADDITIVE)
            )
        return made

    return map_values(value, one)


def _load(value: Any, env: dict) -> Any:
    return torch.fx.node.map_arg(value, lambda n: env[n.name])


def _check_shapes(node: torch.fx.Node, val: Any, out: Any) -> None:
    """The ids must mirror the real value (both batch 1); a mismatch is a bug in a rule or handler."""
    if isinstance(val, torch.Tensor) and (not isinstance(out, torch.Tensor) or out.shape != val.shape):
        raise SoftpruneError(
            f"internal: channel ids of node '{node.name}' ({node.target}) have shape "
            f"{tuple(getattr(out, 'shape', ()))} but the tensor has {tuple(val.shape)}; please report this model"
        )


def _opaque(ctx: Context, arg_ids: Any, kwarg_ids: Any, val: Any, reason: str) -> Any:
    """An operation softprune does not look inside: its inputs are frozen, its outputs are constants."""
    for t in collect_tensors(arg_ids) + collect_tensors(kwarg_ids):
        ctx.freeze(t, reason)
    return map_values(val, lambda v: torch.full(v.shape, CONST) if isinstance(v, torch.Tensor) else None)


# ---------------------------------------------------------------------------------------------
# From ids to groups


def build_groups(
    analysis: Analysis, selected: Callable[[str, nn.Module], bool], ignore: Iterable[str] = ()
) -> list[ChannelGroup]:
    """Resolve classes, find each class's producers and form the groups.

    ``selected(name, module)`` says whether a producer layer may be pruned (the papers' default: every
    convolution); a group with any producer that is not selected is kept whole. ``ignore`` names
    modules whose parameters must not change at all (their input and output channels are frozen).
    """
    ids = analysis.ids
    modules = dict(analysis.model.named_modules())
    ignore = set(ignore)
    for m in analysis.members:
        if m.module in ignore:
            ids.freeze(
                m.unit[m.unit > CONST] if m.unit.numel() else m.unit, f"module '{m.module}' is in ignore"
            )
    label = ids.resolve()
    n_classes = int(label.max()) + 1
    frozen_class = ids.frozen_classes()
    is_frozen = torch.zeros(n_classes, dtype=torch.bool)
    if frozen_class:
        is_frozen[torch.tensor(list(frozen_class))] = True

    # Every member's positions in one flat tensor (a class per position, -1 where not a channel), so
    # the per-class work below is tensor work: a ResNet-50 has ~40k classes and ~1k members.
    members = analysis.members
    flat_ids, owner, starts = flat_units(members)
    flat = torch.where(flat_ids > CONST, label[flat_ids], -1)

    # producers: modules with FILTER members; the classes each one owns
    order_of_module = {name: i for i, name in enumerate(modules)}
    producer_index: dict[str, int] = {}
    module_of_member = torch.full((len(members),), -1, dtype=torch.long)
    position_key = torch.zeros(len(members), dtype=torch.long)
    with_dim = torch.zeros(len(members), dtype=torch.bool)
    for i, m in enumerate(members):
        if m.role is Role.FILTER:
            module_of_member[i] = producer_index.setdefault(m.module, len(producer_index))
            position_key[i] = order_of_module.get(m.module, 1 << 19)
            with_dim[i] = m.dim is not None
    produced = (flat >= 0) & (module_of_member[owner] >= 0)
    pairs = unique_pairs(flat[produced], module_of_member[owner[produced]])[0]  # (class, producer)
    none = len(producer_index)
    first_producer = torch.full((n_classes,), none, dtype=torch.long)
    first_producer.scatter_reduce_(0, pairs[0], pairs[1], reduce="amin")
    # groups: classes connected through shared producers (components over the few producer modules)
    parent = list(range(none))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in unique_pairs(first_producer[pairs[0]], pairs[1])[0].t().tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    component = torch.tensor([find(p) for p in range(none)] + [none], dtype=torch.long)
    owned = torch.nonzero(first_producer < none).view(-1)  # the classes that have a producer
    root = component[first_producer[owned]]

    # order units by their first producer's position, so unit i of a plain conv is its filter i
    big = 1 << 40
    position = torch.full((n_classes,), big * (1 << 20), dtype=torch.long)
    keyed = produced & with_dim[owner]
    index_in_member = torch.arange(flat.numel()) - torch.tensor(starts[:-1], dtype=torch.long)[owner]
    position.scatter_reduce_(
        0, flat[keyed], position_key[owner[keyed]] * big + index_in_member[keyed], reduce="amin"
    )
    # groups in the order of their first unit; units within a group by position
    first_of_root = torch.full((none + 1,), big * (1 << 20), dtype=torch.long)
    first_of_root.scatter_reduce_(0, root, position[owned], reduce="amin")
    roots = torch.unique(root)
    roots = roots[torch.argsort(first_of_root[roots], stable=True)]
    rank_of_root = torch.full((none + 1,), -1, dtype=torch.long)
    rank_of_root[roots] = torch.arange(roots.numel())
    gi_of_owned = rank_of_root[root]
    by_position = torch.argsort(position[owned], stable=True)
    by_group = by_position[torch.argsort(gi_of_owned[by_position], stable=True)]
    sorted_classes = owned[by_group]
    counts = torch.bincount(gi_of_owned, minlength=roots.numel())
    group_start = torch.cumsum(counts, 0) - counts
    group_of = torch.full((n_classes,), -1, dtype=torch.long)
    unit_of = torch.full((n_classes,), -1, dtype=torch.long)
    group_of[sorted_classes] = gi_of_owned[by_group]
    unit_of[sorted_classes] = torch.arange(sorted_classes.numel()) - group_start[gi_of_owned[by_group]]
    ordered = torch.split(sorted_classes, counts.tolist()) if counts.numel() else ()

    # each member's slice of each group it touches
    flat_group = torch.where(flat >= 0, group_of[flat.clamp(min=0)], -1)
    flat_unit = torch.where(flat_group >= 0, unit_of[flat.clamp(min=0)], -1)
    touched = flat_group >= 0
    lowest = torch.full((len(members),), n_classes, dtype=torch.long)
    lowest.scatter_reduce_(0, owner[touched], flat_group[touched], reduce="amin")
    highest = torch.full((len(members),), -1, dtype=torch.long)
    highest.scatter_reduce_(0, owner[touched], flat_group[touched], reduce="amax")
    members_of: list[list[Member]] = [[] for _ in ordered]
    for mi, (lo, hi) in enumerate(zip(lowest.tolist(), highest.tolist())):
        if hi < 0:
            continue  # no position in any group
        m = members[mi]
        unit = flat_unit[starts[mi] : starts[mi + 1]]
        if lo == hi:  # the usual case: one group (positions elsewhere are -1 already)
            members_of[lo].append(Member(m.module, m.param, m.dim, unit.view(m.unit.shape), m.role))
            continue
        g = flat_group[starts[mi] : starts[mi + 1]]
        for gi in torch.unique(g[g >= 0]).tolist():
            part = torch.where(g == gi, unit, -1).view(m.unit.shape)
            members_of[gi].append(Member(m.module, m.param, m.dim, part, m.role))

    groups: list[ChannelGroup] = []
    for gi, classes in enumerate(ordered):
        group_members = members_of[gi]
        prods: list[str] = []
        cons: list[str] = []
        for m in group_members:
            target = prods if m.role is Role.FILTER else cons if m.role is Role.CONSUMER else None
            if target is not None and m.module not in target:
                target.append(m.module)
        frozen = is_frozen[classes]
        frozen_units = torch.nonzero(frozen).view(-1)
        reasons = dict(zip(frozen_units.tolist(), (frozen_class[c] for c in classes[frozen_units].tolist())))
        excluded = None
        not_selected = [p for p in prods if not selected(p, modules[p])]
        if not_selected:
            excluded = f"layer '{not_selected[0]}' is not selected for pruning"
        groups.append(
            ChannelGroup(
                index=len(groups),
                size=int(classes.numel()),
                members=group_members,
                producers=prods,
                consumers=cons,
                frozen=frozen,
                classes=classes.clone(),
                reasons=reasons,
                excluded=excluded,
            )
        )
    return groups


CONV_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
ALL_LAYERS = (*CONV_LAYERS, nn.Linear, nn.MultiheadAttention, nn.Embedding)


# What the default selection adds when a model computes mostly outside convolutions (a ViT, Swin,
# ConvNeXt, an MLP): hidden Linear layers and attention heads. Embedding widths stay whole.
DENSE_LAYERS = (*CONV_LAYERS, nn.Linear, nn.MultiheadAttention)


def default_layers(model: nn.Module, example_inputs: tuple) -> list[type] | None:
    """The default selection: None (every convolution, the papers' choice for CNNs) unless most of
    the model's MACs are outside convolutions; then convolutions, Linear layers and attention heads
    (DENSE_LAYERS). A model whose only Linear layer is its classifier is not measured."""
    linear = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.MultiheadAttention))]
    if len(linear) <= 1:
        return None
    from ..cost import measure_macs  # one forward pass under torch.utils.flop_counter

    macs = measure_macs(model, example_batch1(example_inputs))
    return list(DENSE_LAYERS) if macs["conv_macs"] < 0.5 * macs["macs"] else None


def selector(layers: Any = None, ignore: Iterable[str] = ()) -> Callable[[str, nn.Module], bool]:
    """Which producer layers may be pruned.

    ``layers`` is None (every convolution: the papers' choice; the Pruner passes default_layers()
    instead when a model computes mostly outside convolutions), "all" (convolutions, Linear layers,
    attention heads and embeddings: what a transformer needs), or a list whose items are module names,
    glob/regex patterns (``"layer1.*"``, ``"re:layer[12]\\..*conv1"``) or module types (``nn.Conv2d``,
    ``nn.Linear``). ``ignore`` removes names or patterns from the selection. The classifier is never
    pruned whatever the selection: its outputs are the model's.
    """
    if layers == "all":
        layers = list(ALL_LAYERS)

    def matches(spec: Any, name: str, module: nn.Module) -> bool:
        if isinstance(spec, type):
            return isinstance(module, spec)
        if isinstance(spec, str):
            if spec.startswith("re:"):
                return re.fullmatch(spec[3:], name) is not None
            if any(ch in spec for ch in "*?["):
                import fnmatch

                return fnmatch.fnmatchcase(name, spec)
            return name == spec or name.startswith(spec + ".")
        raise SoftpruneError(f"a layer selector is a module name, a pattern or a module type, got {spec!r}")

    ignore = list(ignore)

    def selected(name: str, module: nn.Module) -> bool:
        if any(matches(s, name, module) for s in ignore):
            return False
        if layers is None:
            return isinstance(module, CONV_LAYERS)
        return any(matches(s, name, module) for s in layers)

    return selected
