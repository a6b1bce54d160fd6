"""Id rules of the functions that combine a tensor's channels with weights or statistics: the
functional norms and convolutions, linear with a held weight, contractions (matmul, einsum,
scaled_dot_product_attention), F.normalize, addcmul, unfold and fold. Registered in ops' tables when
imported (graph/trace.py imports it)."""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F

from ..errors import SoftpruneError
from .ids import CONST, DERIVED, ZERO, Context, squeeze_broadcast
from .ops import (
    FUNCTION_RULES,
    METHOD_RULES,
    _mul_vec,
    _representative,
    _scalar_ids,
    add_vec,
    combine,
)


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
        pa = ctx.positions(a, a.dim() - 1) if a_k else _whole(a, -1)
        pb = ctx.positions(b, b.dim() - 2) if b_k else _whole(b, -2)
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


def _whole(ids: torch.Tensor, dim: int) -> torch.Tensor:
    """Per contracted index, for a factor whose ids do not change along it: zero where it is zero,
    else a constant (its rows cannot be removed one by one)."""
    moved = squeeze_broadcast(ids).movedim(dim, 0)
    zero = (moved.reshape(moved.shape[0], -1) == ZERO).all(dim=1).expand(ids.shape[dim])
    return torch.where(zero, ZERO, CONST)


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
    if isinstance(mask, torch.Tensor):
        ctx.freeze(mask, f"is an attention mask in {ctx.where()}")
    try:
        _contraction_ids(ctx, q, k.transpose(-2, -1), ctx.where())
        weights = torch.full((), CONST, dtype=torch.long).expand(*ctx.out.shape[:-1], k.shape[-2])
        out = _contraction_ids(ctx, weights, v, ctx.where())
    except RuntimeError:  # heads that do not broadcast (grouped-query attention): nothing is removed
        for t in (q, k, v):
            ctx.freeze(t, f"enters {ctx.where()} with grouped heads")
        return torch.full(ctx.out.shape, CONST)
    if values.get("scale") is None:
        for t in (q, k):
            ctx.freeze(
                t, f"sets the default scale 1/sqrt(width) of {ctx.where()}; removing it would change it"
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
