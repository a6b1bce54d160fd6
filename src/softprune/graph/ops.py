"""How channel ids move through functions, tensor methods and parameter-free modules.

Every rule has the signature ``rule(ctx, arg_ids, kwarg_ids, args, kwargs) -> ids`` where ``*_ids``
mirror the arguments with id tensors in place of tensors, and ``args``/``kwargs`` are the real values.
Module rules take the module after ``ctx``. See docs/design.md for the three kinds of ids.

Users extend the tables with :func:`register_op` (functions and method names).
"""

from __future__ import annotations

import builtins
import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from ..errors import SoftpruneError
from .ids import (
    CONST,
    DERIVED,
    SUM,
    ZERO,
    Context,
    collect_tensors,
    distinct_rows,
    map_values,
    squeeze_broadcast,
    unique_pairs,
)

try:  # torchvision's functions that fx keeps as single calls (torch.fx.wrap)
    from torchvision.models.swin_transformer import _patch_merging_pad
    from torchvision.ops import stochastic_depth as _stochastic_depth
except ImportError:  # pragma: no cover - torchvision is a dependency
    _stochastic_depth = _patch_merging_pad = None


# ------------------------------------------------------------------------------------------------
# helpers


def _first_tensor(values: Any) -> torch.Tensor:
    found = collect_tensors(values)
    if not found:
        raise SoftpruneError("internal: an op rule found no tensor argument")
    return found[0]


def _scalar_ids(value: Any, like: torch.Tensor) -> torch.Tensor:
    """ids for a Python number in an element-wise op: zero joins nothing, anything else is constant."""
    is_zero = isinstance(value, (int, float, bool)) and not isinstance(value, bool) and value == 0
    return torch.full((), ZERO if is_zero else CONST, dtype=torch.long).expand(like.shape)


def _is_zp(ctx: Context, i: int) -> bool:
    return i == ZERO or (i != CONST and int(ctx.ids.kind(torch.tensor(i))) != DERIVED)


def combine(ctx: Context, a: torch.Tensor, b: torch.Tensor, vec: Callable) -> torch.Tensor:
    a, b = torch.broadcast_tensors(a, b)
    full_shape = a.shape
    # dimensions broadcast in both inputs (a channel id repeated over H and W) are combined once
    for d in range(a.dim()):
        if a.stride(d) == 0 and b.stride(d) == 0 and a.shape[d] > 1:
            a, b = a.narrow(d, 0, 1), b.narrow(d, 0, 1)
    return _combine_dense(ctx, a, b, vec).expand(full_shape)


def _combine_dense(ctx: Context, a: torch.Tensor, b: torch.Tensor, vec: Callable) -> torch.Tensor:
    """Combine every distinct (a, b) id pair with ``vec``; pairs it flags get a new sum id."""
    shape = a.shape
    if a.numel() == 0:
        return torch.empty(shape, dtype=torch.long)
    fewer = distinct_rows(a, b)
    if fewer is not None:  # combine the distinct rows only
        distinct, which = fewer
        width = shape[-1]
        return _combine_dense(ctx, distinct[:, :width], distinct[:, width:], vec)[which].view(shape)
    pairs, inverse = unique_pairs(a.reshape(-1), b.reshape(-1))
    results, loop = vec(ctx, pairs[0], pairs[1])
    # what is left needs a new sum id per pair (independent residual adds)
    for k in torch.nonzero(loop).view(-1).tolist():
        results[k] = _add_pair(ctx, int(pairs[0, k]), int(pairs[1, k]))
    return results[inverse].view(shape)


def _zp(ctx: Context, ids: torch.Tensor) -> torch.Tensor:
    """Is the value zero when its channel is pruned? (not for derived ids)"""
    return ctx.ids.kind(ids) != DERIVED


def add_vec(ctx: Context, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x + y for every pair at once; pairs that need a sum id are flagged for _add_pair."""
    res = torch.empty_like(x)
    done = x == ZERO
    res[done] = y[done]
    m = ~done & (y == ZERO)
    res[m] = x[m]
    done |= m
    cx, cy = x == CONST, y == CONST
    m = ~done & cx & cy
    res[m] = CONST
    done |= m
    m = ~done & (cx | cy)
    if bool(m.any()):
        res[m] = ctx.ids.derived(torch.where(cx, y, x)[m])
    done |= m
    kx, ky = ctx.ids.kind(x), ctx.ids.kind(y)
    loop = ~done & ((kx == SUM) | (ky == SUM))
    if ctx.residual == "independent":
        plain = (kx != DERIVED) & (ky != DERIVED)
        loop |= ~done & plain & (ctx.ids.base(x) != ctx.ids.base(y))
    rest = ~done & ~loop
    if bool(rest.any()):
        ctx.union(x[rest], y[rest])
        zp = (kx != DERIVED) & (ky != DERIVED)
        res[rest & zp] = x[rest & zp]
        m = rest & ~zp
        if bool(m.any()):
            res[m] = ctx.ids.derived(x[m])
    return res, loop


def _mul_vec(ctx: Context, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x * y: zero if either is zero; joined channels, zero at zero if either factor is."""
    res = torch.empty_like(x)
    zero = (x == ZERO) | (y == ZERO)
    res[zero] = ZERO
    cx, cy = ~zero & (x == CONST), ~zero & (y == CONST)
    res[cx] = y[cx]
    res[cy & ~cx] = x[cy & ~cx]
    rest = ~zero & ~cx & ~cy
    if bool(rest.any()):
        ctx.union(x[rest], y[rest])
        res[rest] = torch.where(_zp(ctx, x[rest]) | ~_zp(ctx, y[rest]), x[rest], y[rest])
    return res, torch.zeros_like(x, dtype=torch.bool)


def _div_vec(ctx: Context, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x / y: zero when x is; a constant over a channel is not zero at zero."""
    res = torch.empty_like(x)
    done = x == ZERO
    res[done] = ZERO
    m = ~done & (y <= CONST)
    res[m] = x[m]
    done |= m
    m = ~done & (x == CONST)
    if bool(m.any()):
        res[m] = ctx.ids.derived(y[m])
    done |= m
    if bool((~done).any()):
        ctx.union(x[~done], y[~done])
        xs = x[~done]
        res[~done] = torch.where(_zp(ctx, xs), xs, ctx.ids.derived(xs))
    return res, torch.zeros_like(x, dtype=torch.bool)


def _other_vec(ctx: Context, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """max, min, pow, ...: joined, and not zero at zero in general."""
    real_x, real_y = x > CONST, y > CONST
    both = real_x & real_y
    if bool(both.any()):
        ctx.union(x[both], y[both])
    res = torch.where((x == CONST) | (y == CONST), torch.full_like(x, CONST), torch.full_like(x, ZERO))
    some = real_x | real_y
    if bool(some.any()):
        res[some] = ctx.ids.derived(torch.where(real_x, x, y)[some])
    return res, torch.zeros_like(x, dtype=torch.bool)


def _derived1(ctx: Context, i: int) -> int:
    return int(ctx.ids.derived(torch.tensor([i]))[0])


def _add_pair(ctx: Context, x: int, y: int) -> int:
    if x == ZERO:
        return y
    if y == ZERO:
        return x
    if x == CONST and y == CONST:
        return CONST
    if x == CONST or y == CONST:
        return _derived1(ctx, y if x == CONST else x)
    base = ctx.ids.base(torch.tensor([x, y]))
    if int(base[0]) == int(base[1]):
        return x if _is_zp(ctx, x) and _is_zp(ctx, y) else _derived1(ctx, x)
    kx, ky = (int(k) for k in ctx.ids.kind(torch.tensor([x, y])))
    if kx == DERIVED or ky == DERIVED:
        ctx.union(torch.tensor([x]), torch.tensor([y]))
        return _derived1(ctx, x)
    if ctx.residual == "independent":
        return ctx.ids.sum_of([x, y])
    ctx.union(torch.tensor([x]), torch.tensor([y]))
    return x


def _binary(vec: Callable, reverse: bool = False):
    def rule(ctx: Context, arg_ids, kwarg_ids, args, kwargs):
        a_val, b_val = args[0], args[1] if len(args) > 1 else kwargs.get("other")
        a_ids, b_ids = arg_ids[0], arg_ids[1] if len(arg_ids) > 1 else kwarg_ids.get("other")
        out = ctx.out
        if not isinstance(a_val, torch.Tensor):
            a_ids = _scalar_ids(a_val, out)
        if not isinstance(b_val, torch.Tensor):
            b_ids = _scalar_ids(b_val, out)
        if reverse:
            a_ids, b_ids = b_ids, a_ids
        if vec is add_vec and kwargs.get("alpha", 1) == 0:
            return a_ids.expand(out.shape).clone()
        return combine(ctx, a_ids, b_ids, vec).expand(out.shape)

    rule.kind = "binary"
    return rule


def elementwise(ctx: Context, arg_ids, kwarg_ids, args, kwargs):
    """f(0) = 0: ids pass through unchanged."""
    return _first_tensor(arg_ids)


def elementwise_nonzero_at_zero(ctx: Context, arg_ids, kwarg_ids, args, kwargs):
    """f(0) != 0: the value is a nonzero constant once the channel is pruned."""
    return ctx.ids.derived(_first_tensor(arg_ids))


def movement(data: Callable[[int], bool] | None = None):
    """Apply the operation itself to the id tensors (views, cat, split, pad, slicing, shuffles).

    ``data(i)`` says which positional arguments carry data; the others (index tensors of gather or
    index_select) keep their real values.
    """

    def rule(ctx: Context, arg_ids, kwarg_ids, args, kwargs):
        fn = ctx.node.target
        # id tensors are often broadcast views (no memory of their own); view() needs real strides
        new_args = [
            map_values(ids, _contiguous) if collect_tensors(v) and (data is None or data(i)) else v
            for i, (v, ids) in enumerate(zip(args, arg_ids))
        ]
        new_kwargs = {
            k: kwarg_ids[k] if collect_tensors(v) and data is None else v for k, v in kwargs.items()
        }
        if ctx.node.op == "call_method":
            out = getattr(new_args[0], fn)(*new_args[1:], **new_kwargs)
        else:
            out = fn(*new_args, **new_kwargs)
        name = fn if isinstance(fn, str) else getattr(fn, "__name__", "")
        if name in ("view", "reshape"):
            _couple_constant_splits(ctx, new_args[0], out)
            _couple_sizes_read_from_shapes(ctx, out)
        return out

    rule.kind = "movement"
    return rule


def _couple_constant_splits(ctx: Context, x: torch.Tensor, out: torch.Tensor) -> None:
    """A view that splits a channel dimension into (constant, size-derived) dims, like
    channel_shuffle's view(n, groups, c // groups, h, w), runs on a compact tensor with the same
    constant: the compact width must then split the same way, so position j is joined across the
    constant dims."""
    node = ctx.node
    sizes = node.args[1:] if node.op == "call_method" else node.args[1:2]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = tuple(sizes[0])
    if len(sizes) != out.dim():
        return
    derived = [isinstance(s, torch.fx.Node) for s in sizes]
    # walk the input and output shapes together to find input dims split into several output dims
    i = o = 0
    while i < x.dim() and o < out.dim():
        if x.shape[i] == out.shape[o]:
            i, o = i + 1, o + 1
            continue
        start, prod = o, 1
        while o < out.dim() and prod < x.shape[i]:
            prod *= out.shape[o]
            o += 1
        if prod != x.shape[i]:
            return  # a merge or an irregular reshape: nothing to couple
        group = range(start, o)
        constant = [d for d in group if not derived[d] and out.shape[d] > 1]
        if constant and any(derived[d] for d in group):
            for d in constant:
                first = out.narrow(d, 0, 1)
                for j in range(1, out.shape[d]):
                    ctx.union(first, out.narrow(d, j, 1))
        i += 1


def _shape_source(size: Any) -> tuple[torch.fx.Node, int] | None:
    """(tensor node, dim) when a size argument is read straight from a tensor's shape
    (``B, C, H, W = x.shape``, ``x.size(1)``, ``x.shape[1]``), else None."""
    if not isinstance(size, torch.fx.Node):
        return None
    if size.op == "call_method" and size.target == "size" and len(size.args) == 2:
        source, dim = size.args
    elif (
        size.op == "call_function"
        and size.target is operator.getitem
        and isinstance(size.args[0], torch.fx.Node)
    ):
        shape, dim = size.args
        is_attr = (
            shape.op == "call_function" and shape.target is builtins.getattr and shape.args[1] == "shape"
        )
        is_size = shape.op == "call_method" and shape.target == "size" and len(shape.args) == 1
        if not (is_attr or is_size):
            return None
        source = shape.args[0]
    else:
        return None
    return (source, dim) if isinstance(source, torch.fx.Node) and isinstance(dim, int) else None


def _couple_sizes_read_from_shapes(ctx: Context, out: torch.Tensor) -> None:
    """A view sized by another tensor's channel count (``y.reshape(B, C, H, W)`` with ``C`` from
    ``x.shape``, as timm's lambda layers do) runs in the compact model with x's compact count: position
    j of y's dimension is joined with x's channel j, so that both keep as many."""
    node = ctx.node
    sizes = node.args[1:] if node.op == "call_method" else node.args[1:2]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = tuple(sizes[0])
    if len(sizes) != out.dim():
        return
    for o, size in enumerate(sizes):
        found = _shape_source(size)
        if found is None or out.shape[o] <= 1:
            continue
        source, dim = found
        ids = ctx.analysis.node_ids.get(source.name)
        if not isinstance(ids, torch.Tensor) or ids.dim() == 0:
            continue
        dim %= ids.dim()
        if ids.shape[dim] != out.shape[o] or not (_varies_along(ids, dim) or _varies_along(out, o)):
            continue
        theirs, mine = ctx.channels(ids, dim), ctx.channels(out, o)
        both = (theirs > CONST) & (mine > CONST)
        if bool(both.any()):
            ctx.union(theirs[both], mine[both])
        alone = ((theirs > CONST) & (mine == CONST)) | ((mine > CONST) & (theirs == CONST))
        if bool(alone.any()):
            lone = torch.cat([theirs[alone], mine[alone]])
            ctx.freeze(lone, f"sizes {ctx.where()} through a shape read elsewhere, next to a constant")


def _contiguous(x: Any) -> Any:
    return x.contiguous() if isinstance(x, torch.Tensor) else x


def pad(ctx: Context, arg_ids, kwarg_ids, args, kwargs):
    x_ids = arg_ids[0]
    pad = args[1] if len(args) > 1 else kwargs["pad"]
    mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
    value = args[3] if len(args) > 3 else kwargs.get("value", None)
    if mode != "constant":
        # reflect/replicate copy channels within the padded (spatial) dims; computed on float ids
        padded = F.pad(x_ids.to(torch.float64), pad, mode=mode)
        return padded.round().to(torch.long)
    out = F.pad(x_ids, pad, mode="constant", value=0)
    if value not in (None, 0, 0.0):
        inside = F.pad(torch.ones_like(x_ids, dtype=torch.bool), pad, mode="constant", value=False)
        out = torch.where(inside, out, torch.full_like(out, CONST))
    return out


def _setitem(ctx: Context, arg_ids, kwarg_ids, args, kwargs):
    target, index, value = arg_ids
    updated = target.clone()
    if isinstance(args[2], torch.Tensor):
        updated[args[1]] = value
    else:
        updated[args[1]] = ZERO if args[2] == 0 else CONST
    ctx.analysis.__dict__.setdefault("_setitem", []).append((ctx.node.args[0].name, updated))
    return None


def _representative(ctx: Context, rows: torch.Tensor, sum_reduce: bool, what: str) -> torch.Tensor:
    """One id per row of ``rows`` ([positions, reduced]): the row's id if uniform (zeros aside), else a
    sum of its channels (``sum_reduce``: zeros add nothing) or a constant that freezes them."""
    if rows.shape[1] == 0:
        return torch.full((rows.shape[0],), ZERO, dtype=torch.long)
    top = rows.max(dim=1).values
    bottom = torch.where(rows == ZERO, top[:, None], rows).min(dim=1).values
    out = top.clone()  # uniform rows, and all-zero rows (ZERO)
    mixed = torch.nonzero(top != bottom).view(-1)
    if mixed.numel() == 0:
        return out
    uniq_rows, inverse = torch.unique(rows[mixed], dim=0, return_inverse=True)
    values = torch.empty(uniq_rows.shape[0], dtype=torch.long)
    for r in range(uniq_rows.shape[0]):
        vals = torch.unique(uniq_rows[r])
        real = vals[vals > CONST]
        if not sum_reduce:
            ctx.freeze(real, f"is mixed with other channels by {what}; removing it would change the result")
            values[r] = CONST
        elif bool((vals == CONST).any()) or bool((ctx.ids.kind(real) == DERIVED).any()):
            ctx.freeze(real, f"is summed with a constant in {what}")
            values[r] = CONST
        else:
            values[r] = ctx.ids.sum_of(real.tolist())
    out[mixed] = values[inverse]
    return out


def spatial(spatial_dims: int):
    """Pooling, resizing: each output channel comes from the same input channel."""

    def rule(ctx: Context, arg_ids, kwarg_ids, args, kwargs, *_module):
        x = _first_tensor(arg_ids)
        out_shape = ctx.out.shape
        lead = x.dim() - spatial_dims  # batch and channel dims, kept as they are
        lead_shape = x.shape[:lead]
        small = squeeze_broadcast(x)  # a channel id repeated over space is one value per row
        rows = small.reshape(math.prod(lead_shape), -1)
        rep = _representative(ctx, rows, sum_reduce=True, what=ctx.where())
        return rep.view(*lead_shape, *([1] * spatial_dims)).expand(out_shape)

    return rule


def resize(ctx: Context, arg_ids, kwarg_ids, args, kwargs):
    """Interpolation: spatial over every dimension after the channels, however many there are."""
    return spatial(arg_ids[0].dim() - 2)(ctx, arg_ids, kwarg_ids, args, kwargs)


def _reduce_dims(args, kwargs, ndim: int):
    dim = args[1] if len(args) > 1 else kwargs.get("dim", None)
    if dim is None:
        return list(range(ndim))
    if isinstance(dim, int):
        dim = [dim]
    return sorted(d % ndim for d in dim)


def _mean_over_channels(ctx: Context, rows: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """A mean over channels (ConvNeXt-V2's GRN, CBAM's channel mean) is a sum divided by their count.
    A pruned channel that is zero adds nothing to the sum, so the compact model computes it as the mean
    over its fewer channels times kept/full (compaction inserts the factor): such rows are constants
    to the channels. Rows with a channel that is not zero when pruned are left to the usual rule
    (they freeze it)."""
    real = rows > CONST
    mixed = (rows != rows.max(dim=1, keepdim=True).values) & (rows != ZERO)
    derived = real & (ctx.ids.kind(rows) == DERIVED)
    exact = mixed.any(dim=1) & ~derived.any(dim=1)
    if not bool(exact.any()):
        return rows
    ctx.analysis.__dict__.setdefault("mean_rescale", {})[ctx.node.name] = dims
    return torch.where(exact[:, None] & real, torch.full_like(rows, CONST), rows)


def _reduction(sum_like: bool, mean: bool = False):
    def rule(ctx: Context, arg_ids, kwarg_ids, args, kwargs):
        x = arg_ids[0]
        if not isinstance(args[0], torch.Tensor):
            x = _first_tensor(arg_ids)
        dims = _reduce_dims(args, kwargs, x.dim())
        keep = [d for d in range(x.dim()) if d not in dims]
        moved = x.permute(*keep, *dims).reshape(math.prod([x.shape[d] for d in keep]) if keep else 1, -1)
        if mean:
            moved = _mean_over_channels(ctx, moved, dims)
        rep = _representative(ctx, moved, sum_reduce=sum_like, what=ctx.where())
        out = ctx.out[0] if isinstance(ctx.out, tuple) else ctx.out  # max(dim) gives (values, indices)
        ids = rep.view([x.shape[d] for d in keep]) if keep else rep.view(())
        ids = ids.reshape(out.shape)
        if isinstance(ctx.out, tuple):
            return type(ctx.out)((ids, torch.full(out.shape, CONST)))
        return ids

    return rule


def normalize_over(dim_arg: int, what: str):
    """softmax-like: every output element depends on the whole dimension."""

    def rule(ctx: Context, arg_ids, kwarg_ids, args, kwargs):
        x = arg_ids[0]
        dim = args[dim_arg] if len(args) > dim_arg else kwargs.get("dim")
        rows = x.movedim(dim, -1).reshape(-1, x.shape[dim])
        varies = ~(rows == rows[:, :1]).all(1)
        if bool(varies.any()):
            ctx.freeze(rows[varies], f"is normalized together with other channels by {what}")
        return ctx.ids.derived(x)

    return rule


def _layer_norm_fn(ctx: Context, arg_ids, kwarg_ids, args, kwargs):
    """F.layer_norm(x, normalized_shape, ...): the statistics mix the normalized channels (frozen)."""
    x, shape = arg_ids[0], args[1] if len(args) > 1 else kwargs["normalized_shape"]
    k = len(shape) if isinstance(shape, (tuple, list, torch.Size)) else 1
    ctx.freeze(
        x.reshape(-1, *x.shape[x.dim() - k :]), f"is normalized together with other channels by {ctx.where()}"
    )
    return x


def _group_norm_fn(ctx: Context, arg_ids, kwarg_ids, args, kwargs):
    """F.group_norm(x, num_groups, ...) called by code, not by a GroupNorm module: the number of
    groups is a constant of the graph, which compaction cannot change, and a group's statistics mix
    its channels, so removing any channel would change the others. The channels are kept whole.
    (nn.GroupNorm modules are handled by their handler, which removes whole groups exactly.)"""
    x = arg_ids[0]
    c = ctx.channels(x, 1)
    ctx.freeze(c, f"is normalized together with other channels by {ctx.where()} (a fixed number of groups)")
    _channel_params(ctx, c, arg_ids, kwarg_ids, 2, ("weight", "bias"))
    return x


def _channel_params(ctx: Context, channels: torch.Tensor, arg_ids, kwarg_ids, first: int, names) -> None:
    """A functional norm's per-channel tensors (statistics, scale, shift) belong to the channels."""
    given = [*arg_ids[first : first + len(names)], *(kwarg_ids.get(n) for n in names)]
    for ids in given:
        if isinstance(ids, torch.Tensor) and ids.dim() == 1 and ids.numel() == channels.numel():
            ctx.union(channels, ids)


def _batch_norm_fn(ctx: Context, arg_ids, kwarg_ids, args, kwargs):
    """F.batch_norm(x, running_mean, running_var, weight, bias, ...): channel-wise, its tensors follow
    the channels (a module calling it with its own parameters, as timm's norm+act layers do); a channel
    that is always zero comes out constant."""
    x = arg_ids[0]
    c = ctx.channels(x, 1 if x.dim() > 1 else 0)
    names = ("running_mean", "running_var", "weight", "bias")
    _channel_params(ctx, c, arg_ids, kwarg_ids, 1, names)
    return torch.where(x == ZERO, torch.full_like(x, CONST), x)


def _conv_fn(ctx: Context, arg_ids, kwarg_ids, args, kwargs):
    """F.conv1d/2d/3d called by code with a tensor it holds (timm's anti-aliasing blur: a fixed
    depthwise filter, groups = channels): channel-wise, each filter row follows its channel. Other
    functional convolutions mix channels through a weight the ids cannot follow: refused."""
    x, weight = arg_ids[0], arg_ids[1] if len(arg_ids) > 1 else kwarg_ids.get("weight")
    groups = args[6] if len(args) > 6 else kwargs.get("groups", 1)
    w = args[1] if len(args) > 1 else kwargs.get("weight")
    channels = x.shape[1] if x.dim() > 1 else None
    if not (isinstance(weight, torch.Tensor) and groups == channels and w.shape[:2] == (channels, 1)):
        raise SoftpruneError(
            f"{ctx.where()} is a convolution called as a function with a weight softprune cannot tie to "
            "channels (only depthwise filters held by the model are handled); use an nn.Conv module, or "
            "keep the module that calls it whole with ignore=[...]"
        )
    c = ctx.channels(x, 1)
    ctx.union(c[:, None].expand(channels, weight[0].numel()), weight.reshape(channels, -1))
    return ctx.broadcast(c, ctx.out.shape, 1)


def _varies_along(ids: torch.Tensor, dim: int) -> bool:
    """Do the ids change along ``dim`` (zeros aside)? A channel dimension does; a token dimension of a
    tensor whose channels lie along another dimension does not."""
    small = squeeze_broadcast(ids)
    if small.shape[dim] <= 1:
        return False
    first = small.narrow(dim, 0, 1)
    return bool(((small != first) & (small != ZERO) & (first != ZERO)).any())


def _contraction_ids(ctx: Context, a: torch.Tensor, b: torch.Tensor, what: str) -> torch.Tensor:
    """ids of ``a @ b`` (a [..., n, k], b [..., k, m], batch dimensions broadcast).

    A contracted index k can be removed only from both factors at once: where the ids of a change
    along k (its channels lie there, as q's do in q @ k^T) they are joined with b's ids at the same k,
    which must change along k too (k's channels, or a parameter the model holds). A channel contracted
    with something that cannot lose that index (a constant, or a tensor whose rows are tokens) is kept
    whole. What is not contracted passes through: a row of ``a`` that is one channel (or constant), times
    a column of ``b`` that is one channel, is that channel (attention @ v keeps v's channels)."""
    vec_a, vec_b = a.dim() == 1, b.dim() == 1
    a = a[None, :] if vec_a else a
    b = b[:, None] if vec_b else b
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a = a.expand(*batch, *a.shape[-2:])
    b = b.expand(*batch, *b.shape[-2:])
    for d in range(len(batch)):  # heads folded into a batch dimension (x.reshape(B * heads, d, n))
        for mine in (a, b):
            if batch[d] > 1 and _varies_along(mine, d):
                _couple_along(ctx, mine, d, what)
    a_k, b_k = _varies_along(a, -1), _varies_along(b, -2)
    if a_k or b_k:
        pa = ctx.positions(a, a.dim() - 1) if a_k else _whole(b_k, a, -1)
        pb = ctx.positions(b, b.dim() - 2) if b_k else _whole(a_k, b, -2)
        both = (pa > CONST) & (pb > CONST)
        if bool(both.any()):
            ctx.union(pa[both], pb[both])
        for mine, other in ((pa, pb), (pb, pa)):
            alone = (mine > CONST) & (other == CONST)
            if bool(alone.any()):
                ctx.freeze(mine[alone], f"is contracted by {what} with values that cannot lose it")
    rows = _uniform_or_const(a, -1, a_k).unsqueeze(-1)
    cols = _uniform_or_const(b, -2, b_k).unsqueeze(-2)
    shape = (*rows.shape[:-1], cols.shape[-1])
    if bool((squeeze_broadcast(rows) == CONST).all()):  # constant rows (attention @ v): b's columns
        out = cols.expand(shape)
    elif bool((squeeze_broadcast(cols) == CONST).all()):
        out = rows.expand(shape)
    else:
        out = combine(ctx, rows, cols, _mul_vec)
    if vec_a:
        out = out.squeeze(-2)
    if vec_b:
        out = out.squeeze(-1)
    return out


def _couple_along(ctx: Context, ids: torch.Tensor, dim: int, what: str) -> None:
    """Position j of every slice along ``dim`` joined (a batch dimension of a matmul: each slice must
    keep the same positions, as the other factor's slices cannot be removed)."""
    small = squeeze_broadcast(ids)
    if small.shape[dim] <= 1:
        return
    first = small.narrow(dim, 0, 1)
    others = small.narrow(dim, 1, small.shape[dim] - 1)
    first = first.expand_as(others)
    ctx.union(first, others)
    lone = ((first == CONST) & (others > CONST)) | ((others == CONST) & (first > CONST))
    if bool(lone.any()):
        ctx.freeze(
            torch.cat([first[lone], others[lone]]), f"would leave slices of different widths in {what}"
        )


def _whole(other_varies: bool, ids: torch.Tensor, dim: int) -> torch.Tensor:
    """Per contracted index, for a factor whose ids do not change along it: zero where it is zero,
    else a constant (its rows cannot be removed one by one)."""
    moved = squeeze_broadcast(ids).movedim(dim, 0)
    moved = moved.reshape(moved.shape[0], -1).expand(ids.shape[dim], -1) if moved.shape[0] == 1 else moved
    zero = (moved.reshape(moved.shape[0], -1) == ZERO).all(dim=1)
    return torch.where(
        zero, torch.full_like(zero, ZERO, dtype=torch.long), torch.full_like(zero, CONST, dtype=torch.long)
    )


def _uniform_or_const(ids: torch.Tensor, dim: int, varies: bool) -> torch.Tensor:
    """One id per position of the other dimensions: the ids along ``dim`` when they are one channel,
    zero where all are zero, else a constant (channels summed by the contraction)."""
    top = ids.amax(dim=dim)
    if not varies:
        return top
    return torch.where(top == ZERO, top, torch.full_like(top, CONST))


def _matmul(ctx: Context, arg_ids, kwarg_ids, args, kwargs):
    a = arg_ids[0] if arg_ids else kwarg_ids["input"]
    b = arg_ids[1] if len(arg_ids) > 1 else kwarg_ids.get("other", kwarg_ids.get("mat2"))
    return _contraction_ids(ctx, a, b, ctx.where())


def _linear_fn(ctx: Context, arg_ids, kwarg_ids, args, kwargs):
    """F.linear(x, weight, bias) called by code with a tensor the model holds (timm's DCT layers): x @
    weight^T + bias, whose input columns are contracted with the weight's columns."""
    names = ("input", "weight", "bias")
    given = {**dict(zip(names, arg_ids)), **kwarg_ids}
    out = _contraction_ids(ctx, given["input"], given["weight"].transpose(-2, -1), ctx.where())
    bias = given.get("bias")
    if isinstance(bias, torch.Tensor):
        out = combine(ctx, out, bias, add_vec)
    return out.expand(ctx.out.shape)


def _einsum(ctx: Context, arg_ids, kwarg_ids, args, kwargs):
    """torch.einsum with one or two operands, written as the matmul it is: the letters shared with the
    output are batch dimensions, the ones summed over both operands are contracted (see
    :func:`_contraction_ids`). Ellipses and letters summed in one operand only are refused."""
    equation, operands = args[0], list(arg_ids[1:])
    values = list(args[1:])
    if len(operands) == 1 and isinstance(operands[0], (tuple, list)):
        operands, values = list(operands[0]), list(values[0])
    inputs, _, output = equation.replace(" ", "").partition("->")
    specs = inputs.split(",")
    if "." in equation or not output or len(specs) != len(operands) or len(operands) not in (1, 2):
        raise SoftpruneError(
            f"{ctx.where()}: softprune follows einsum with one or two operands and an explicit output "
            f"('{equation}' is not); keep the module that calls it whole with ignore=[...]"
        )
    if len(operands) == 1:
        if set(specs[0]) != set(output) or len(specs[0]) != len(output):
            raise SoftpruneError(f"{ctx.where()}: einsum '{equation}' sums within one operand; keep it whole")
        return operands[0].permute([specs[0].index(c) for c in output])
    (sa, sb), (a, b) = specs, operands
    size = {c: n for spec, t in zip(specs, values) for c, n in zip(spec, t.shape) if n != 1}
    a = a.expand([size.get(c, 1) for c in sa])
    b = b.expand([size.get(c, 1) for c in sb])
    batch = [c for c in output if c in sa and c in sb]
    free_a = [c for c in output if c in sa and c not in sb]
    free_b = [c for c in output if c in sb and c not in sa]
    contract = [c for c in sa if c in sb and c not in output]
    if set(sa) - set(output) - set(sb) or set(sb) - set(output) - set(sa):
        raise SoftpruneError(f"{ctx.where()}: einsum '{equation}' sums within one operand; keep it whole")

    def grouped(t: torch.Tensor, spec: str, middle: list[str], last: list[str]) -> torch.Tensor:
        order = [spec.index(c) for c in (*batch, *middle, *last)]
        shape = [size.get(c, 1) for c in batch]
        width = math.prod(size.get(c, 1) for c in middle)
        depth = math.prod(size.get(c, 1) for c in last)
        return t.permute(order).reshape(*shape, width, depth)

    ma = grouped(a, sa, free_a, contract)  # [..., n, k]
    mb = grouped(b, sb, contract, free_b)  # [..., k, m]
    out = _contraction_ids(ctx, ma, mb, ctx.where())
    out = out.reshape(*[size.get(c, 1) for c in (*batch, *free_a, *free_b)])
    order = [(*batch, *free_a, *free_b).index(c) for c in output]
    return out.permute(order).expand(ctx.out.shape)


def unfold_rule(ctx: Context, arg_ids, kwarg_ids, args, kwargs):
    """F.unfold (im2col): channel c's patch values fill rows c*k*k ... c*k*k + k*k - 1, and padding is
    zero. Run on the ids themselves (as float64, exact below 2**53)."""
    names = ("kernel_size", "dilation", "padding", "stride")
    params = {**dict(zip(names, args[1:])), **kwargs}
    return F.unfold(arg_ids[0].contiguous().double(), **params).round().long()


def fold_rule(ctx: Context, arg_ids, kwarg_ids, args, kwargs):
    """F.fold (col2im): the k*k rows of channel c are summed, overlaps included, into channel c."""
    x, out = arg_ids[0], ctx.out
    lead = x.shape[:-2]
    rows = x.reshape(*lead, out.shape[-3], -1)
    rep = _representative(ctx, rows.reshape(-1, rows.shape[-1]), sum_reduce=True, what=ctx.where())
    return rep.view(*rows.shape[:-1], 1, 1).expand(out.shape)


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")


def _scaled_dot_product_attention(ctx: Context, arg_ids, kwarg_ids, args, kwargs):
    """softmax(q k^T * scale + mask) v: q and k's head channels are contracted together; v's channels
    reach the output. The default scale is 1/sqrt(q's width), which removing q's channels would change:
    without an explicit scale, q and k are kept whole."""
    given = {**dict(zip(_SDPA_ARGS, arg_ids)), **kwarg_ids}
    values = {**dict(zip(_SDPA_ARGS, args)), **kwargs}
    q, k, v = given["query"], given["key"], given["value"]
    mask = given.get("attn_mask")
    if isinstance(mask, torch.Tensor) and bool((mask > CONST).any()):
        ctx.freeze(mask[mask > CONST], f"is an attention mask in {ctx.where()}")
    try:
        _contraction_ids(ctx, q, k.transpose(-2, -1), ctx.where())
        weights = torch.full((), CONST, dtype=torch.long).expand(*ctx.out.shape[:-1], k.shape[-2])
        out = _contraction_ids(ctx, weights, v, ctx.where())
    except RuntimeError:  # heads that do not broadcast (grouped-query attention): nothing is removed
        for t in (q, k, v):
            if bool((t > CONST).any()):
                ctx.freeze(t[t > CONST], f"enters {ctx.where()} with grouped heads")
        return torch.full(ctx.out.shape, CONST)
    if values.get("scale") is None:
        for t in (q, k):
            if bool((t > CONST).any()):
                ctx.freeze(
                    t[t > CONST],
                    f"sets the default scale 1/sqrt(width) of {ctx.where()}; removing it would change it",
                )
    return out.expand(ctx.out.shape)


def _normalize_fn(ctx: Context, arg_ids, kwarg_ids, args, kwargs):
    """F.normalize(x, p, dim): x / max(||x||_p, eps) along dim. A pruned channel is zero and adds
    nothing to the norm, so removing it changes no other value: the ids pass through. A nonzero
    constant left by a pruned channel would be in the norm: such channels are kept whole."""
    x = arg_ids[0]
    p = args[1] if len(args) > 1 else kwargs.get("p", 2.0)
    dim = args[2] if len(args) > 2 else kwargs.get("dim", 1)
    if not (isinstance(p, (int, float)) and p > 0):
        ctx.freeze(x, f"is normalized together with other channels by {ctx.where()}")
        return ctx.ids.derived(x)
    rows = squeeze_broadcast(x).movedim(dim, -1)
    derived = (rows > CONST) & (ctx.ids.kind(rows) == DERIVED)
    mixed = derived.any(dim=-1, keepdim=True) & (rows > CONST)
    if bool(mixed.any()):
        ctx.freeze(rows[mixed], f"is not zero at zero and is normalized with other channels by {ctx.where()}")
    return x


def _addcmul(ctx: Context, arg_ids, kwarg_ids, args, kwargs):
    """input + value * t1 * t2 (timm's GRN): a product, then a sum."""
    names = ("input", "tensor1", "tensor2")
    given = [*arg_ids[:3], *(kwarg_ids[n] for n in names[len(arg_ids[:3]) :])]
    values = [*args[:3], *(kwargs[n] for n in names[len(args[:3]) :])]
    ids = [g if isinstance(v, torch.Tensor) else _scalar_ids(v, ctx.out) for g, v in zip(given, values)]
    product = combine(ctx, ids[1], ids[2], _mul_vec)
    return combine(ctx, ids[0], product, add_vec).expand(ctx.out.shape)


_ZERO_MAKERS = {"zeros_like", "new_zeros", "zero_"}


def _constant_like(ctx: Context, arg_ids, kwarg_ids, args, kwargs):
    """A tensor made from a shape: zeros join nothing, other constants are constants (values are
    never read: the trace runs on meta tensors)."""
    name = ctx.node.target if isinstance(ctx.node.target, str) else getattr(ctx.node.target, "__name__", "")
    fill = ZERO if name in _ZERO_MAKERS else CONST
    return map_values(ctx.out, lambda v: torch.full(v.shape, fill) if isinstance(v, torch.Tensor) else None)


def _size_like(ctx: Context, arg_ids, kwarg_ids, args, kwargs):
    return map_values(ctx.out, lambda v: torch.full(v.shape, CONST) if isinstance(v, torch.Tensor) else None)


def _getitem(ctx: Context, arg_ids, kwarg_ids, args, kwargs):
    """Slicing a tensor slices its ids; indexing a tuple (split, chunk) picks the part's ids."""
    return arg_ids[0][args[1]]


# ------------------------------------------------------------------------------------------------
# tables

_ZP_FUNCTIONS = [
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.gelu, F.silu, F.hardswish, F.leaky_relu, F.elu,
    F.selu, F.celu, F.mish, F.hardtanh, F.dropout, F.dropout2d, F.dropout1d, F.dropout3d, F.alpha_dropout,
    torch.tanh, torch.neg, torch.abs, torch.clone, F.tanhshrink, F.softsign, torch.sin, torch.square,
    torch.nn.functional.hardshrink, torch.nn.functional.softshrink, F.threshold, torch.clamp,
    torch.clip, torch.sign, torch.sqrt, torch.erf, torch.asinh, torch.atan,
    operator.neg, operator.pos,
]  # fmt: skip
_NZ_FUNCTIONS = [
    torch.sigmoid, F.sigmoid, F.hardsigmoid, torch.exp, F.softplus, torch.cos, F.logsigmoid, torch.log,
    torch.rsqrt, torch.reciprocal, torch.cosh, torch.nan_to_num,
    operator.invert, torch.logical_not, torch.bitwise_not,  # ~mask: not zero at zero
]  # fmt: skip
_ZP_METHODS = [
    "relu", "relu_", "tanh", "tanh_", "neg", "abs", "clone", "contiguous", "float", "double", "half",
    "bfloat16", "to", "type", "type_as", "detach", "clamp", "clamp_", "clip", "sign", "sqrt", "square",
    "requires_grad_", "cpu", "cuda", "gelu", "silu", "hardswish", "erf", "sin", "tan",
    "long", "int", "short", "bool", "byte", "char",  # dtype casts: 0 stays 0
]  # fmt: skip
_NZ_METHODS = ["sigmoid", "sigmoid_", "exp", "exp_", "log", "rsqrt", "reciprocal", "cos", "logical_not"]
_MOVE_FUNCTIONS = [
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.cat, torch.concat, torch.concatenate,
    torch.stack, torch.split, torch.chunk, torch.unsqueeze, torch.squeeze, torch.roll, torch.flip,
    torch.narrow, torch.select, torch.unbind, torch.t, torch.movedim, torch.swapaxes, torch.swapdims,
    torch.unflatten, torch.tile, torch.hstack, torch.vstack, F.channel_shuffle, F.pixel_shuffle,
    F.pixel_unshuffle, torch.channel_shuffle, torch.tensor_split, torch.index_select, torch.gather,
    torch.take_along_dim, torch.repeat_interleave, torch.diagonal,
]  # fmt: skip
_MOVE_METHODS = [
    "view", "reshape", "flatten", "permute", "transpose", "transpose_", "unsqueeze", "squeeze", "expand",
    "expand_as", "repeat", "roll", "flip", "narrow", "select", "unbind", "t", "chunk", "split", "movedim",
    "unflatten", "view_as", "reshape_as", "swapaxes", "swapdims", "tile", "index_select", "gather",
    "repeat_interleave", "unfold", "tensor_split", "diagonal", "mT",
]  # fmt: skip
_DATA_FIRST_ONLY = {torch.index_select, torch.gather, torch.take_along_dim, torch.repeat_interleave}
_SPATIAL_FUNCTIONS = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3, F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3, F.lp_pool2d: 2, F.lp_pool1d: 1,
    torch.max_pool2d: 2, torch.avg_pool1d: 1, torch.adaptive_avg_pool1d: 1,
}  # fmt: skip
_REDUCE_FUNCTIONS = {
    torch.sum: True, torch.mean: False, torch.amax: False, torch.amin: False, torch.std: False,
    torch.var: False, torch.logsumexp: False, torch.max: False, torch.min: False, torch.prod: False,
    torch.norm: False,
}  # fmt: skip
_REDUCE_METHODS = {
    "sum": True, "mean": False, "amax": False, "amin": False, "std": False, "var": False, "max": False,
    "min": False, "logsumexp": False, "prod": False, "norm": False,
}  # fmt: skip

FUNCTION_RULES: dict[Any, Callable] = {}
METHOD_RULES: dict[str, Callable] = {}

for f in _ZP_FUNCTIONS:
    FUNCTION_RULES[f] = elementwise
if _stochastic_depth is not None:  # zeroes whole samples in training, identity in eval: f(0) = 0
    FUNCTION_RULES[_stochastic_depth] = elementwise
if _patch_merging_pad is not None:  # pad, slice and concatenate: pure data movement
    FUNCTION_RULES[_patch_merging_pad] = movement()
for f in _NZ_FUNCTIONS:
    FUNCTION_RULES[f] = elementwise_nonzero_at_zero
for name in _ZP_METHODS:
    METHOD_RULES[name] = elementwise
for name in _NZ_METHODS:
    METHOD_RULES[name] = elementwise_nonzero_at_zero
for f in _MOVE_FUNCTIONS:
    FUNCTION_RULES[f] = movement((lambda i: i == 0) if f in _DATA_FIRST_ONLY else None)
for name in _MOVE_METHODS:
    METHOD_RULES[name] = movement(
        (lambda i: i == 0)
        if name in ("index_select", "gather", "repeat_interleave", "expand_as", "view_as", "reshape_as")
        else None
    )
for f, n in _SPATIAL_FUNCTIONS.items():
    FUNCTION_RULES[f] = spatial(n)
FUNCTION_RULES[F.interpolate] = resize
for f, s in _REDUCE_FUNCTIONS.items():
    FUNCTION_RULES[f] = _reduction(s, mean=f is torch.mean)
for name, s in _REDUCE_METHODS.items():
    METHOD_RULES[name] = _reduction(s, mean=name == "mean")

for f in (operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub, torch.subtract):
    FUNCTION_RULES[f] = _binary(add_vec)
for name in ("add", "add_", "sub", "sub_", "__add__", "__radd__", "__sub__"):
    METHOD_RULES[name] = _binary(add_vec)
for f in (operator.mul, operator.imul, torch.mul, torch.multiply):
    FUNCTION_RULES[f] = _binary(_mul_vec)
for name in ("mul", "mul_", "__mul__", "__rmul__"):
    METHOD_RULES[name] = _binary(_mul_vec)
for f in (operator.truediv, operator.itruediv, torch.div, torch.true_divide, torch.divide):
    FUNCTION_RULES[f] = _binary(_div_vec)
for name in ("div", "div_", "__truediv__"):
    METHOD_RULES[name] = _binary(_div_vec)
for f in (torch.maximum, torch.minimum, torch.pow, operator.pow, torch.atan2, torch.fmod, torch.remainder):
    FUNCTION_RULES[f] = _binary(_other_vec)
for name in ("pow", "maximum", "minimum"):
    METHOD_RULES[name] = _binary(_other_vec)
FUNCTION_RULES[operator.getitem] = _getitem
FUNCTION_RULES[operator.setitem] = _setitem
FUNCTION_RULES[F.pad] = pad
FUNCTION_RULES[F.layer_norm] = _layer_norm_fn
FUNCTION_RULES[F.group_norm] = _group_norm_fn
FUNCTION_RULES[F.batch_norm] = _batch_norm_fn
for _conv in (F.conv1d, F.conv2d, F.conv3d):
    FUNCTION_RULES[_conv] = _conv_fn
FUNCTION_RULES[F.instance_norm] = _batch_norm_fn
for f in (operator.matmul, torch.matmul, torch.bmm, torch.mm):
    FUNCTION_RULES[f] = _matmul
METHOD_RULES["matmul"] = METHOD_RULES["bmm"] = METHOD_RULES["mm"] = METHOD_RULES["__matmul__"] = _matmul
FUNCTION_RULES[F.scaled_dot_product_attention] = _scaled_dot_product_attention
FUNCTION_RULES[F.normalize] = _normalize_fn
FUNCTION_RULES[F.linear] = _linear_fn
FUNCTION_RULES[torch.einsum] = _einsum
FUNCTION_RULES[F.unfold] = unfold_rule
FUNCTION_RULES[F.fold] = fold_rule
FUNCTION_RULES[torch.addcmul] = _addcmul
METHOD_RULES["addcmul"] = _addcmul
FUNCTION_RULES[torch.softmax] = normalize_over(1, "softmax")
FUNCTION_RULES[F.softmax] = normalize_over(1, "softmax")
FUNCTION_RULES[F.log_softmax] = normalize_over(1, "log_softmax")
METHOD_RULES["softmax"] = normalize_over(1, "softmax")
# a running sum along a dimension mixes that dimension, as a normalization over it does
FUNCTION_RULES[torch.cumsum] = normalize_over(1, "cumsum")
METHOD_RULES["cumsum"] = normalize_over(1, "cumsum")
METHOD_RULES["log_softmax"] = normalize_over(1, "log_softmax")
for f in (
    torch.zeros_like,
    torch.ones_like,
    torch.full_like,
    torch.empty_like,
    torch.rand_like,
    torch.randn_like,
):
    FUNCTION_RULES[f] = _constant_like
for name in ("new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "zero_", "fill_"):
    METHOD_RULES[name] = _constant_like
for f in (builtins.getattr, torch.numel, torch.is_floating_point):
    FUNCTION_RULES[f] = _size_like
for name in (
    "size",
    "dim",
    "numel",
    "nelement",
    "ndimension",
    "is_contiguous",
    "element_size",
    "argmax",
    "argmin",
):
    METHOD_RULES[name] = _size_like
FUNCTION_RULES[torch.argmax] = _size_like
FUNCTION_RULES[torch.argmin] = _size_like


# Compaction checks these on compact tensors (see compact.py); other rules keep layouts by construction.
pad.kind = _getitem.kind = "movement"


def register_op(target: Callable | str, rule: Callable) -> None:
    """Teach softprune an operation: a function (or a tensor method name) and its id rule.

    The rule receives ``(ctx, arg_ids, kwarg_ids, args, kwargs)`` and returns the output ids; see the
    rules in this module (``elementwise``, ``movement()``, ``spatial(n)``) for ready-made ones, exported
    as :data:`RULES`.
    """
    if isinstance(target, str):
        METHOD_RULES[target] = rule
    else:
        FUNCTION_RULES[target] = rule


RULES = {
    "elementwise": elementwise,
    "elementwise_nonzero_at_zero": elementwise_nonzero_at_zero,
    "movement": movement(),
    "spatial1d": spatial(1),
    "spatial2d": spatial(2),
    "spatial3d": spatial(3),
}


def rule_for_unknown(node) -> Callable:
    name = getattr(node.target, "__name__", str(node.target))
    raise SoftpruneError(
        f"softprune does not know how channels flow through {node.op} '{name}' (node '{node.name}'). "
        f"Register a rule with softprune.register_op({name if node.op == 'call_method' else name!s}, "
        "softprune.RULES['elementwise' | 'movement' | ...]), or wrap the code in a submodule and pass its "
        "name in ignore= so it is kept whole"
    )
