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

from .errors import SoftpruneError
from .groups import ChannelGroup, Member, Role
from .modes import training_mode

ZERO = 0  # a constant zero (padding): joins nothing, removable
CONST = 1  # a constant or input value: joins nothing, never removable
_UNIT, _SUM, _DERIVED = 0, 1, 2


def _squeeze_broadcast(ids: torch.Tensor) -> torch.Tensor:
    """Drop the repeats of broadcast dimensions (stride 0): the same ids, without materializing them."""
    shape, strides = ids.shape, ids.stride()
    if all(st != 0 or n <= 1 for n, st in zip(shape, strides)):
        return ids
    small = [1 if st == 0 else n for n, st in zip(shape, strides)]
    return ids.as_strided(small, strides, ids.storage_offset())


def unique_pairs(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct (a[i], b[i]) pairs as a [2, k] tensor, and each i's pair index.

    torch.unique(dim=1) sorts columns lexicographically and is two orders of magnitude slower than a
    1-D unique; ids are non-negative and below 2**31, so a pair packs into one int64 key.
    """
    width = int(max(int(a.max()), int(b.max())) + 1) if a.numel() else 1
    keys, inverse = torch.unique(a * width + b, return_inverse=True)
    return torch.stack([keys // width, keys % width]), inverse


def distinct_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For large id tensors of one shape: their distinct rows (along the last dimension, the tensors
    side by side) and each row's index among them; None when that would not shrink anything.

    A transformer's token stream holds a few distinct rows (ViT: the class token's and the patches')
    repeated over 197 tokens; deduplicating 197 rows is several times cheaper than a 1-D unique of
    their 151k elements, and every later step then works on 2 rows.
    """
    first = tensors[0]
    if first.dim() < 2 or first.numel() <= 4096:
        return None
    width = first.shape[-1]
    rows = torch.cat([t.reshape(-1, width) for t in tensors], dim=1)
    distinct, which = torch.unique(rows, dim=0, return_inverse=True)
    if distinct.shape[0] == rows.shape[0]:
        return None
    return distinct, which


def flat_units(members: list[Member]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Every member's unit entries in one flat tensor, the member each entry belongs to, and where
    each member's entries start (one more than the members: the end)."""
    sizes = [m.unit.numel() for m in members]
    starts = [0]
    for s in sizes:
        starts.append(starts[-1] + s)
    if not members:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), starts
    flat = torch.cat([m.unit.reshape(-1) for m in members])
    owner = torch.repeat_interleave(torch.arange(len(members)), torch.tensor(sizes, dtype=torch.long))
    return flat, owner, starts


class IdTable:
    """Channel ids, their joins (union-find edges), sums and derived ids, and frozen reasons."""

    def __init__(self) -> None:
        self.count = 2
        self._kind = torch.zeros(1024, dtype=torch.int8)
        self._base = torch.arange(1024)
        self.parts: dict[int, tuple[int, ...]] = {}  # sum id -> part ids
        self._sums: dict[tuple[int, ...], int] = {}  # part ids -> sum id
        self.collapsed: set[int] = set()  # sum ids that were joined with their parts
        self._derived: dict[int, int] = {}  # base id -> its derived id
        self.frozen: list[tuple[torch.Tensor, str]] = []  # (ids, reason), in order
        self._edges: list[torch.Tensor] = []
        self.label: torch.Tensor | None = None  # class of every id, after resolve()

    def _grow(self, n: int) -> None:
        need = self.count + n
        if need <= self._kind.numel():
            return
        size = max(need, 2 * self._kind.numel())
        kind = torch.zeros(size, dtype=torch.int8)
        kind[: self._kind.numel()] = self._kind
        base = torch.arange(size)
        base[: self._base.numel()] = self._base
        self._kind, self._base = kind, base

    def new(self, n: int, kind: int = _UNIT) -> torch.Tensor:
        self._grow(n)
        ids = torch.arange(self.count, self.count + n)
        self._kind[self.count : self.count + n] = kind
        self.count += n
        return ids

    def kind(self, ids: torch.Tensor) -> torch.Tensor:
        return self._kind[ids]

    def base(self, ids: torch.Tensor) -> torch.Tensor:
        return self._base[ids]

    def sum_of(self, parts: Iterable[int]) -> int:
        """The id of the sum of these ids' values (one id per distinct set of parts)."""
        flat: set[int] = set()
        for p in parts:
            flat.update(self.parts.get(p, (p,)))
        key = tuple(sorted(flat))
        sid = self._sums.get(key)
        if sid is None:
            sid = int(self.new(1, _SUM))
            self.parts[sid] = key
            self._sums[key] = sid
        return sid

    def derived(self, ids: torch.Tensor) -> torch.Tensor:
        """The derived id of each id: "depends on this channel but is nonzero when it is pruned"."""
        out = ids.clone()
        flat = out.view(-1)
        uniq = torch.unique(flat)
        table = {}
        for u in uniq.tolist():
            if u in (ZERO, CONST):
                table[u] = CONST if u == CONST else ZERO
                continue
            b = int(self._base[u])
            if b not in self._derived:
                d = int(self.new(1, _DERIVED))
                self._base[d] = b
                self._derived[b] = d
            table[u] = self._derived[b]
        lookup = torch.tensor([table[u] for u in uniq.tolist()])
        return lookup[torch.searchsorted(uniq, flat)].view_as(ids)

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Join the classes of a[i] and b[i] for every i (zeros and constants are skipped)."""
        fewer = distinct_rows(a, b) if a.shape == b.shape else None
        if fewer is not None:
            width = a.shape[-1]
            a, b = fewer[0][:, :width], fewer[0][:, width:]
        a, b = self.base(a.reshape(-1)), self.base(b.reshape(-1))
        keep = (a > CONST) & (b > CONST) & (a != b)
        if not bool(keep.any()):
            return
        pairs = unique_pairs(a[keep], b[keep])[0]
        self._edges.append(pairs)
        for sid in torch.unique(pairs).tolist():
            if sid in self.parts and sid not in self.collapsed:
                self.collapsed.add(sid)
                parts = torch.tensor(self.parts[sid])
                self._edges.append(torch.stack([torch.full_like(parts, sid), parts]))

    def union_all(self, ids: torch.Tensor) -> int:
        """Join every id in ``ids`` (ignoring zeros and constants); return one of them or ZERO/CONST."""
        flat = torch.unique(self.base(ids.reshape(-1)))
        real = flat[flat > CONST]
        if real.numel() == 0:
            return CONST if bool((flat == CONST).any()) else ZERO
        if real.numel() > 1:
            self.union(real[:1].expand(real.numel() - 1), real[1:])
        return int(real[0])

    def freeze(self, ids: torch.Tensor | Iterable[int], reason: str) -> None:
        """These ids' classes must never be pruned (a sum's parts too); the first reason is kept."""
        ids = torch.as_tensor(list(ids) if not isinstance(ids, torch.Tensor) else ids)
        ids = _squeeze_broadcast(ids)
        fewer = distinct_rows(ids)
        ids = torch.unique(self.base((ids if fewer is None else fewer[0]).reshape(-1)))
        ids = ids[ids > CONST]
        if ids.numel() == 0:
            return
        sums = [i for i in ids.tolist() if i in self.parts]
        if sums:
            ids = torch.cat([ids, torch.tensor([p for i in sums for p in self.parts[i]], dtype=torch.long)])
        self.frozen.append((ids, reason))

    def frozen_classes(self) -> dict[int, str]:
        """class -> the first reason it was frozen for (after :meth:`resolve`)."""
        assert self.label is not None
        reasons: dict[int, str] = {}
        seen = torch.zeros(int(self.label.max()) + 1, dtype=torch.bool)
        for ids, reason in self.frozen:
            classes = torch.unique(self.label[ids])
            new = classes[~seen[classes]]
            seen[new] = True
            for c in new.tolist():
                reasons[c] = reason
        return reasons

    def resolve(self) -> torch.Tensor:
        """Connected components of the join edges: ``label[id]`` is the class of every id."""
        n = self.count
        label = torch.arange(n)
        if self._edges:
            edges = torch.cat(self._edges, dim=1)
            u, v = edges[0], edges[1]
            while True:  # hook smaller labels onto larger, then compress paths, until stable
                lu, lv = label[u], label[v]
                m = torch.minimum(lu, lv)
                new = label.clone()
                new.scatter_reduce_(0, lu, m, reduce="amin")
                new.scatter_reduce_(0, lv, m, reduce="amin")
                while True:
                    nxt = new[new]
                    if torch.equal(nxt, new):
                        break
                    new = nxt
                if torch.equal(new, label):
                    break
                label = new
        label = label[self._base[:n]]  # derived ids belong to their base's class
        self.label = label
        return label

    def alive(self, pruned_classes: torch.Tensor) -> torch.Tensor:
        """Per id: does it survive when the classes flagged in ``pruned_classes`` are removed?"""
        assert self.label is not None
        n = self.count
        alive = ~pruned_classes[self.label]
        alive[ZERO] = False
        alive[CONST] = True
        for sid, parts in self.parts.items():
            if sid not in self.collapsed:
                alive[sid] = bool(alive[list(parts)].any())
        # derived ids follow their base (a sum base included)
        derived = torch.nonzero(self._kind[:n] == _DERIVED).view(-1)
        if derived.numel():
            alive[derived] = alive[self._base[derived]]
        return alive


class Context:
    """What a handler or op rule can do while ids flow through one node."""

    def __init__(self, analysis: Analysis, node: torch.fx.Node, module_name: str = "") -> None:
        self.analysis = analysis
        self.ids = analysis.ids
        self.node = node
        self.module_name = module_name
        self.out: Any = None  # the node's real output
        self._based: tuple[torch.Tensor, torch.Tensor] | None = None  # last ids given to member(), based

    @property
    def residual(self) -> str:
        return self.analysis.residual

    def where(self) -> str:
        return f"{self.node.op} {self.node.target!s} (node '{self.node.name}')"

    def fresh(self, n: int) -> torch.Tensor:
        return self.ids.new(n)

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.ids.union(a, b)

    def freeze(self, ids: torch.Tensor, reason: str) -> None:
        self.ids.freeze(ids, reason)

    def positions(self, ids: torch.Tensor, dim: int) -> torch.Tensor:
        """One id per position along ``dim``, for a consumer that mixes that dimension.

        The consumer's weights for a position are shared by every element of the slice, so the slice's
        ids are joined. A derived id here would be a nonzero constant after pruning, so its channel is
        frozen; a constant next to a channel freezes the channel too.
        """
        moved = _squeeze_broadcast(ids).movedim(dim, 0)
        moved = moved.reshape(moved.shape[0], -1)
        base = self.ids.base(moved)
        derived = self.ids.kind(moved) == _DERIVED
        if bool(derived.any()):
            self.freeze(
                base[derived], f"reaches {self.where()} through an operation that is not zero at zero"
            )
        if base.shape[1] == 1:
            return base[:, 0]  # one id per position already (a broadcast channel vector): nothing to join
        first = base.max(dim=1).values  # a real id of the row when it has one (zero and constant are 0, 1)
        differs = (base != first[:, None]) & (base != ZERO)
        rows = differs.any(dim=1)
        if bool(rows.any()):
            with_const = rows & (base == CONST).any(dim=1)
            if bool(with_const.any()):
                self.freeze(base[with_const], f"shares a position with a constant at {self.where()}")
            join = differs & ~with_const[:, None] & (base > CONST)
            if bool(join.any()):
                self.union(first[:, None].expand_as(base)[join], base[join])
            first = torch.where(with_const, torch.full_like(first, CONST), first)
        return first

    def channels(self, ids: torch.Tensor, dim: int) -> torch.Tensor:
        """One id per position along ``dim`` for a channel-wise operation (BatchNorm, depthwise conv).

        Unlike :meth:`positions`, derived ids stay derived: a channel-wise op does not mix channels, so
        a nonzero constant stays in its own channel and is judged where it is consumed.
        """
        moved = _squeeze_broadcast(ids).movedim(dim, 0)
        moved = moved.reshape(moved.shape[0], -1)
        if moved.shape[1] == 1:
            return moved[:, 0]  # one id per channel already: nothing to join
        first = moved.max(dim=1).values  # a real id of the row when it has one
        differs = (moved != first[:, None]) & (moved != ZERO)
        rows = differs.any(dim=1)
        if not bool(rows.any()):
            return first
        with_const = rows & (moved == CONST).any(dim=1)
        if bool(with_const.any()):
            self.freeze(moved[with_const], f"shares a channel with a constant at {self.where()}")
        join = differs & ~with_const[:, None] & (moved > CONST)
        if bool(join.any()):
            self.union(first[:, None].expand_as(moved)[join], moved[join])
        # a row mixing derived and plain ids of one channel is derived: not zero when pruned
        derived = rows & ~with_const & (self.ids.kind(moved) == _DERIVED).any(dim=1)
        out = torch.where(with_const, torch.full_like(first, CONST), first)
        if bool(derived.any()):
            out[derived] = self.ids.derived(out[derived])
        return out

    def member(
        self, param: str, dim: int | None, ids: torch.Tensor, role: Role, module: str | None = None
    ) -> None:
        """Declare that position i of ``param`` along ``dim`` belongs to channel ``ids[i]``.

        A module called more than once (shared weights) declares the same slice again: the ids of
        every call are joined, since one weight slice cannot be kept for one call and pruned for another.
        """
        module = self.module_name if module is None else module
        key = (module, param, dim, role)
        seen = self.analysis.member_index.get(key)
        if seen is not None:
            self.union(seen.unit, self.ids.base(ids))
            return
        if self._based is None or self._based[0] is not ids:  # a BatchNorm declares 4 slices of one ids
            self._based = (ids, self.ids.base(ids))
        member = Member(module, param, dim, self._based[1], role)
        self.analysis.member_index[key] = member
        self.analysis.members.append(member)

    @staticmethod
    def broadcast(ids_1d: torch.Tensor, shape: torch.Size, dim: int) -> torch.Tensor:
        view = [1] * len(shape)
        view[dim] = ids_1d.numel()
        return ids_1d.view(view).expand(shape)


Rule = Callable[..., Any]


class Tracer(torch.fx.Tracer):
    """fx tracer whose leaves are the modules softprune has a handler or rule for."""

    def __init__(
        self, handlers: dict[type, Any], module_rules: dict[type, Rule], leaf_modules: Iterable[str] = ()
    ):
        super().__init__()
        self.handlers = handlers
        self.module_rules = module_rules
        self.extra_leaves = set(leaf_modules)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.extra_leaves or type(m) in self.handlers or type(m) in self.module_rules:
            return True
        return super().is_leaf_module(m, qualname)


class Traced:
    """A model and its fx graph, for reading: what a GraphModule offers the analysis and compaction
    (``.graph``, submodules and attributes by qualified name) without building one, which copies
    the module tree and generates code (5 ms on a MobileNetV2)."""

    def __init__(self, model: nn.Module, graph: torch.fx.Graph) -> None:
        self.model = model
        self.graph = graph

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def _trace_graph(
    model: nn.Module, handlers=None, module_rules=None, leaf_modules: Iterable[str] = ()
) -> torch.fx.Graph:
    from .handlers import HANDLERS
    from .ops import MODULE_RULES

    handlers = HANDLERS if handlers is None else handlers
    module_rules = MODULE_RULES if module_rules is None else module_rules
    tracer = Tracer(handlers, module_rules, leaf_modules)
    try:
        return tracer.trace(model)
    except Exception as exc:  # fx raises many types; the user needs the cause and the way out
        raise SoftpruneError(
            f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}. "
            "softprune needs a traceable forward; move data-dependent Python control flow into a "
            "submodule and list it in ignore= (it is then kept whole), or register a handler for it"
        ) from exc


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


def _map(value: Any, fn: Callable[[Any], Any]) -> Any:
    """``fn`` applied to every leaf of nested tuples, lists and dicts (a torch.Size is a leaf)."""
    if isinstance(value, torch.Size):
        return fn(value)
    if isinstance(value, (tuple, list)):
        items = [_map(v, fn) for v in value]
        if type(value) in (tuple, list):
            return type(value)(items)
        if hasattr(value, "_fields"):  # namedtuple
            return type(value)(*items)
        try:  # torch.return_types (structseq) take one sequence
            return type(value)(items)
        except TypeError:
            return tuple(items)
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    return fn(value)


def _example_batch1(example_inputs: tuple) -> tuple:
    def one(x):
        return x[:1] if isinstance(x, torch.Tensor) and x.dim() > 0 else x

    return tuple(_map(x, one) for x in example_inputs)


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
    give zeros of their output's shape instead of computing it (see :func:`_without_arithmetic`).
    """
    from .handlers import HANDLERS
    from .ops import MODULE_RULES

    handlers = {**HANDLERS, **(handlers or {})}
    gm = gm if gm is not None else Traced(model, _trace_graph(model, handlers, MODULE_RULES, leaf_modules))
    return _run_ids(model, gm, example_inputs, residual, handlers, leaf_modules)


_STOCK_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_STOCK_CONV = {c: (c.forward, c._conv_forward) for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d)}


def _without_arithmetic(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """Zeros of the output's shape for a stock convolution, Linear or attention, or None to run the
    module.

    The analysis needs shapes, not values, and these layers are nearly all of a network's arithmetic
    (ResNet-50 at 224: 0.05 s of convolutions). Anything unusual (a subclass with its own forward,
    masks, a size mismatch the real layer should report) runs for real.
    """
    if type(module) is nn.MultiheadAttention:
        return _attention_without_arithmetic(module, args, kwargs)
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


def _attention_without_arithmetic(m: nn.MultiheadAttention, args: tuple, kwargs: dict) -> tuple | None:
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
    from .ops import FUNCTION_RULES, METHOD_RULES, MODULE_RULES, rule_for_unknown

    result = Analysis(model=model, gm=gm, residual=residual)
    ids = result.ids
    inputs = iter(_example_batch1(example_inputs))

    def call(module: nn.Module, args, kwargs):
        shaped = _without_arithmetic(module, args, kwargs)
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
                idmap[node.name] = _map(
                    val, lambda v: torch.full(v.shape, CONST) if isinstance(v, torch.Tensor) else None
                )
                continue
            if node.op == "output":
                out_ids = _collect_tensors(_load(node.args, idmap))
                for t in out_ids:
                    ids.freeze(t, "reaches the model's output")
                continue
            args = _load(node.args, vals)
            kwargs = _load(node.kwargs, vals)
            arg_ids = _load(node.args, idmap)
            kwarg_ids = _load(node.kwargs, idmap)
            if node.op == "get_attr":
                val = _fetch_attr(gm, node.target)
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
                has_tensor = _has_tensor(args) or _has_tensor(kwargs)
                if not has_tensor:
                    out = _map(
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
            param = _fetch_attr(result.gm, v.name)
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

    return _map(value, one)


def _fetch_attr(gm: torch.fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _load(value: Any, env: dict) -> Any:
    return torch.fx.node.map_arg(value, lambda n: env[n.name])


def _has_tensor(value: Any) -> bool:
    found = False

    def visit(v):
        nonlocal found
        if isinstance(v, torch.Tensor):
            found = True
        return v

    _map(value, visit)
    return found


def _collect_tensors(value: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []

    def visit(v):
        if isinstance(v, torch.Tensor):
            out.append(v)
        return v

    _map(value, visit)
    return out


def _check_shapes(node: torch.fx.Node, val: Any, out: Any) -> None:
    """The ids must mirror the real value (both batch 1); a mismatch is a bug in a rule or handler."""
    if isinstance(val, torch.Tensor) and (not isinstance(out, torch.Tensor) or out.shape != val.shape):
        raise SoftpruneError(
            f"internal: channel ids of node '{node.name}' ({node.target}) have shape "
            f"{tuple(getattr(out, 'shape', ()))} but the tensor has {tuple(val.shape)}; please report this model"
        )


def _opaque(ctx: Context, arg_ids: Any, kwarg_ids: Any, val: Any, reason: str) -> Any:
    """An operation softprune does not look inside: its inputs are frozen, its outputs are constants."""
    for t in _collect_tensors(arg_ids) + _collect_tensors(kwarg_ids):
        ctx.freeze(t, reason)
    return _map(val, lambda v: torch.full(v.shape, CONST) if isinstance(v, torch.Tensor) else None)


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


ALL_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.MultiheadAttention, nn.Embedding)


def selector(layers: Any = None, ignore: Iterable[str] = ()) -> Callable[[str, nn.Module], bool]:
    """Which producer layers may be pruned.

    ``layers`` is None (every convolution: the papers' choice), "all" (convolutions, Linear layers,
    attention heads and embeddings: what a transformer needs), or a list whose items are module names,
    glob/regex patterns (``"layer1.*"``, ``"re:layer[12]\\..*conv1"``) or module types (``nn.Conv2d``,
    ``nn.Linear``). ``ignore`` removes names or patterns from the selection. The classifier is never
    pruned whatever the selection: its outputs are the model's.
    """
    conv_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
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
            return isinstance(module, conv_types)
        return any(matches(s, name, module) for s in layers)

    return selected
