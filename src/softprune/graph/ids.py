"""Channel ids: the values the analysis carries beside every tensor, and what rules can do with them.

The bottom of the graph package: handlers (``handlers.py``) and op rules (``ops.py``) see a
``Context`` and the id helpers here, and nothing of the trace that calls them (``trace.py``).
See docs/design.md ("The channel graph").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.fx

from .groups import Member, Role

if TYPE_CHECKING:
    from .trace import Analysis

ZERO = 0  # a constant zero (padding): joins nothing, removable
CONST = 1  # a constant or input value: joins nothing, never removable
UNIT, SUM, DERIVED = 0, 1, 2


def squeeze_broadcast(ids: torch.Tensor) -> torch.Tensor:
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

    def new(self, n: int, kind: int = UNIT) -> torch.Tensor:
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
            sid = int(self.new(1, SUM))
            self.parts[sid] = key
            self._sums[key] = sid
        return sid

    def derived(self, ids: torch.Tensor) -> torch.Tensor:
        """The derived id of each id: "depends on this channel but is nonzero when it is pruned"."""
        small = squeeze_broadcast(ids)
        if small.numel() < ids.numel():  # a broadcast view (an attention map's constant rows): stay one
            return self.derived(small.contiguous()).expand(ids.shape)
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
                d = int(self.new(1, DERIVED))
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
        ids = squeeze_broadcast(ids)
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
        return self.survival((~pruned_classes).to(torch.float64)) > 0.5

    def survival(self, keep: torch.Tensor) -> torch.Tensor:
        """Per id, the probability that it survives when each class c is kept with probability
        ``keep[c]``, the classes independently (with 0/1 probabilities: whether it survives). A sum
        of channels survives if any part does; derived ids follow their base. Differentiable in
        ``keep`` (DMCP's and C2S2's expected cost)."""
        assert self.label is not None
        p = keep[self.label].clone()
        p[ZERO], p[CONST] = 0.0, 1.0
        for sid, parts in self.parts.items():
            if sid not in self.collapsed:
                p[sid] = 1.0 - torch.prod(1.0 - p[list(parts)])
        derived = torch.nonzero(self._kind[: self.count] == DERIVED).view(-1)
        if derived.numel():  # a sum base included
            p[derived] = p[self._base[derived]]
        return p


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
        moved = squeeze_broadcast(ids).movedim(dim, 0)
        moved = moved.reshape(moved.shape[0], -1)
        base = self.ids.base(moved)
        derived = self.ids.kind(moved) == DERIVED
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
        moved = squeeze_broadcast(ids).movedim(dim, 0)
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
        derived = rows & ~with_const & (self.ids.kind(moved) == DERIVED).any(dim=1)
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


def map_values(value: Any, fn: Callable[[Any], Any]) -> Any:
    """``fn`` applied to every leaf of nested tuples, lists and dicts (a torch.Size is a leaf)."""
    if isinstance(value, torch.Size):
        return fn(value)
    if isinstance(value, (tuple, list)):
        items = [map_values(v, fn) for v in value]
        if type(value) in (tuple, list):
            return type(value)(items)
        if hasattr(value, "_fields"):  # namedtuple
            return type(value)(*items)
        try:  # torch.return_types (structseq) take one sequence
            return type(value)(items)
        except TypeError:
            return tuple(items)
    if isinstance(value, dict):
        return {k: map_values(v, fn) for k, v in value.items()}
    return fn(value)


def fetch_attr(gm: torch.fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def has_tensor(value: Any) -> bool:
    found = False

    def visit(v):
        nonlocal found
        if isinstance(v, torch.Tensor):
            found = True
        return v

    map_values(value, visit)
    return found


def collect_tensors(value: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []

    def visit(v):
        if isinstance(v, torch.Tensor):
            out.append(v)
        return v

    map_values(value, visit)
    return out
