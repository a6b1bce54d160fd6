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
    ctx.analysis.mean_rescale[ctx.node.name] = dims
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
