"""Handlers: how a module with parameters moves channel ids, and how it shrinks.

A handler has two methods:

- ``propagate(module, ctx, *input_ids, **kw) -> output_ids``: declare which slice of which parameter
  belongs to which channel id (``ctx.member``), give fresh ids to produced channels (``ctx.fresh``),
  and join ids that must be pruned together (``ctx.union``, ``ctx.positions``);
- ``compact(module, keep) -> module``: a smaller module, where ``keep(param, dim)`` gives the kept
  indices of a declared slice (None when nothing is removed).

Built-in handlers cover convolutions (plain, grouped, depthwise), Linear, BatchNorm, GroupNorm,
LayerNorm, Embedding and PReLU. Register one for a custom module with :func:`register_handler`.
"""

from __future__ import annotations

import copy
import copyreg
import sys
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..layers import ChannelRemap, PrunedMultiheadAttention
from .groups import Role
from .ids import CONST, ZERO, Context, collect_tensors, map_values, squeeze_broadcast
from .ops import add_vec, combine

Keep = Callable[[str, int], "torch.Tensor | None"]


class Handler:
    """Base class for module handlers; see the module docstring."""

    def propagate(self, module: nn.Module, ctx: Context, *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def compact(self, module: nn.Module, keep: Keep) -> nn.Module:
        raise NotImplementedError


_ATOMIC = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)


def _customizes_copy(cls: type) -> bool:
    """Does deepcopy do more for this class than "new object, deep copy of __getstate__(),
    __setstate__"? (Both of those are called as the class defines them.)"""
    return (
        getattr(cls, "__deepcopy__", None) is not None
        or cls.__reduce_ex__ is not object.__reduce_ex__
        or cls.__reduce__ is not object.__reduce__
        or getattr(cls, "__getnewargs_ex__", None) is not None
        or getattr(cls, "__getnewargs__", None) is not None
        or cls in copyreg.dispatch_table
    )


def copy_module(module: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """``copy.deepcopy(module, memo)``, several times faster on ordinary modules.

    deepcopy spends most of its time on a module's dozen (empty) hook dictionaries and its numbers;
    here immutable attributes are shared, empty containers are made anew, submodules recurse and
    everything else (tensors included) goes through ``copy.deepcopy`` with the same memo. A class
    that customizes copying or pickling is deep-copied the way it asks.
    """
    memo = {} if memo is None else memo
    done = memo.get(id(module))
    if done is not None:
        return done
    cls = type(module)
    if _customizes_copy(cls):
        return copy.deepcopy(module, memo)
    state = module.__getstate__()
    if type(state) is not dict:
        return copy.deepcopy(module, memo)
    new = cls.__new__(cls)
    memo[id(module)] = new
    for key, value in state.items():
        kind = type(value)
        if kind in _ATOMIC or (kind is tuple and all(type(v) in _ATOMIC for v in value)):
            continue
        if key == "_modules":
            state[key] = {n: None if c is None else copy_module(c, memo) for n, c in value.items()}
        elif kind in (dict, OrderedDict, set) and not value:
            state[key] = kind()
        else:
            state[key] = copy.deepcopy(value, memo)
    new.__setstate__(state)
    return new


def resized(module: nn.Module, params: dict[str, torch.Tensor | None], **attrs) -> nn.Module:
    """A copy of ``module`` with new parameter/buffer tensors (owned by it: pass fresh tensors, as
    :func:`_take` makes) and attributes. It shares nothing with the original: not a tensor, not a
    hook dictionary. Tensors that ``params`` replaces are not copied first."""
    replaced: dict[int, torch.Tensor] = {}
    for name, value in params.items():
        old = module._parameters.get(name, module._buffers.get(name))
        if value is None or old is None:
            continue
        if name in module._parameters:
            replaced[id(old)] = nn.Parameter(value.detach(), requires_grad=old.requires_grad)
        else:
            replaced[id(old)] = value.detach()
    memo: dict[int, Any] = dict(replaced)  # every other tensor: a detached copy of its own
    for m in module.modules():
        for table in (m._parameters, m._buffers):
            for value in table.values():
                if value is None or id(value) in memo:
                    continue
                fresh = value.detach().clone()
                is_param = isinstance(value, nn.Parameter)
                memo[id(value)] = (
                    nn.Parameter(fresh, requires_grad=value.requires_grad) if is_param else fresh
                )
    new = copy_module(module, memo)
    for key, value in attrs.items():
        setattr(new, key, value)
    return new


def _take(t: torch.Tensor | None, dim: int, index: torch.Tensor | None) -> torch.Tensor | None:
    """A new tensor (never a view of the masked model's): the kept slices, or a copy of all."""
    if t is None:
        return None
    if index is None:
        return t.detach().clone()
    return t.detach().index_select(dim, index.to(t.device))


def _take_2d(t: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    """A new tensor of the kept rows (dim 0) and columns (dim 1), copying the weights once."""
    if rows is None:
        return _take(t, 1, cols)
    kept = _take(t, 0, rows)
    return kept if cols is None else kept.index_select(1, cols.to(t.device))


def _channelwise_out(cin: torch.Tensor, has_bias: bool) -> torch.Tensor:
    """Output ids of a channel-wise (depthwise, one filter per channel) convolution: its input's, where
    a channel that is all zero comes out as the bias (a constant) or zero."""
    return torch.where(cin == ZERO, torch.full_like(cin, CONST if has_bias else ZERO), cin)


def _zero_to_const(x: torch.Tensor) -> torch.Tensor:
    """After an affine normalization an always-zero channel is a constant; other ids pass (as views)."""
    if not bool((squeeze_broadcast(x) == ZERO).any()):
        return x
    return torch.where(x == ZERO, torch.full_like(x, CONST), x)


class ConvHandler(Handler):
    """Conv1d/2d/3d. Plain: consumer of input channels, producer of output channels.

    Grouped (in_channels/groups > 1): the same positions are removed in every group, so the groups stay
    valid (channel j of every group is one unit, for inputs and for outputs). Depthwise
    (in_channels/groups == 1): channel-wise, output channel c belongs to input channel c, and groups
    shrink with the channels.
    """

    def propagate(self, m: nn.Module, ctx: Context, x: torch.Tensor, *rest, **kw) -> torch.Tensor:
        nd = m.weight.dim() - 2
        cdim = x.dim() - nd - 1
        g = m.groups
        cin_g, cout_g = m.in_channels // g, m.out_channels // g
        if g > 1 and cin_g == 1:  # depthwise, channel multiplier cout_g
            cin = ctx.channels(x, cdim)
            if cout_g == 1:
                out = _channelwise_out(cin, m.bias is not None)
                role = Role.SCALE
            else:
                out = ctx.fresh(m.out_channels)
                ctx.union(out.view(g, cout_g), cin.view(g, 1).expand(g, cout_g))
                role = Role.FILTER
            ctx.member("weight", 0, out, role)
        else:
            cin = ctx.positions(x, cdim)
            if g > 1:
                cin = ctx.positions(cin.view(g, cin_g), 1)  # join channel j of every group
            ctx.member("weight", 1, cin, Role.CONSUMER)
            out = ctx.fresh(m.out_channels)
            if g > 1:
                out_g = out.view(g, cout_g)
                ctx.union(out_g[:1].expand(g - 1, cout_g), out_g[1:])
            ctx.member("weight", 0, out, Role.FILTER)
        if m.bias is not None:
            ctx.member("bias", 0, out, Role.ADDITIVE)
        return ctx.broadcast(out, ctx.out.shape, cdim)

    def compact(self, m: nn.Module, keep: Keep) -> nn.Module:
        k_out, k_in = keep("weight", 0), keep("weight", 1)
        weight = _take_2d(m.weight, k_out, k_in)
        bias = _take(m.bias, 0, k_out)
        g, cin_g, cout_g = m.groups, m.in_channels // m.groups, m.out_channels // m.groups
        out_channels = weight.shape[0]
        if g > 1 and cin_g == 1:
            groups = out_channels // cout_g
            in_channels = groups
        else:
            groups = g
            in_channels = weight.shape[1] * g
        return resized(
            m,
            {"weight": weight, "bias": bias},
            in_channels=in_channels,
            out_channels=out_channels,
            groups=groups,
        )


class ConvTransposeHandler(Handler):
    """ConvTranspose1d/2d/3d (upsampling in decoders and some hybrids): weight [in, out/groups, k...],
    so the input channels are dim 0 and the filters dim 1. Plain and depthwise (groups == in == out)
    ones are pruned like convolutions; other grouped ones are kept whole."""

    def propagate(self, m: nn.Module, ctx: Context, x: torch.Tensor, *rest, **kw) -> torch.Tensor:
        cdim = x.dim() - (m.weight.dim() - 2) - 1
        if rest or kw:  # an output_size argument: shapes decided by the caller
            return KeepWhole("is called with an output size").propagate(m, ctx, x, *rest, **kw)
        if m.groups == 1:
            ctx.member("weight", 0, ctx.positions(x, cdim), Role.CONSUMER)
            out = ctx.fresh(m.out_channels)
            ctx.member("weight", 1, out, Role.FILTER)
        elif m.groups == m.in_channels == m.out_channels:
            out = _channelwise_out(ctx.channels(x, cdim), m.bias is not None)
            ctx.member("weight", 0, out, Role.SCALE)
        else:
            return KeepWhole("is a grouped transposed convolution").propagate(m, ctx, x)
        if m.bias is not None:
            ctx.member("bias", 0, out, Role.ADDITIVE)
        return ctx.broadcast(out, ctx.out.shape, cdim)

    def compact(self, m: nn.Module, keep: Keep) -> nn.Module:
        if m.groups == 1:
            k_in, k_out = keep("weight", 0), keep("weight", 1)
            weight = _take_2d(m.weight, k_in, k_out)
            bias = _take(m.bias, 0, k_out)
            return resized(
                m, {"weight": weight, "bias": bias}, in_channels=weight.shape[0], out_channels=weight.shape[1]
            )
        if not m.groups == m.in_channels == m.out_channels:
            return m  # kept whole by propagate
        k = keep("weight", 0)
        weight, bias = _take(m.weight, 0, k), _take(m.bias, 0, k)
        c = weight.shape[0]
        return resized(m, {"weight": weight, "bias": bias}, in_channels=c, out_channels=c, groups=c)


class LinearHandler(Handler):
    """Linear: consumer of the last dimension, producer of its outputs."""

    def propagate(self, m: nn.Linear, ctx: Context, x: torch.Tensor, *rest, **kw) -> torch.Tensor:
        cin = ctx.positions(x, -1)
        ctx.member("weight", 1, cin, Role.CONSUMER)
        out = ctx.fresh(m.out_features)
        ctx.member("weight", 0, out, Role.FILTER)
        if m.bias is not None:
            ctx.member("bias", 0, out, Role.ADDITIVE)
        return ctx.broadcast(out, ctx.out.shape, -1)

    def compact(self, m: nn.Linear, keep: Keep) -> nn.Module:
        k_out, k_in = keep("weight", 0), keep("weight", 1)
        weight = _take_2d(m.weight, k_out, k_in)
        return resized(
            m,
            {"weight": weight, "bias": _take(m.bias, 0, k_out)},
            in_features=weight.shape[1],
            out_features=weight.shape[0],
        )


class BatchNormHandler(Handler):
    """BatchNorm1d/2d/3d: channel-wise; scale, shift and running statistics follow the channel."""

    def propagate(self, m: nn.Module, ctx: Context, x: torch.Tensor, *rest, **kw) -> torch.Tensor:
        cdim = 1 if x.dim() > 1 else 0
        c = ctx.channels(x, cdim)
        for name, role in (("weight", Role.SCALE), ("bias", Role.ADDITIVE)):
            if getattr(m, name, None) is not None:
                ctx.member(name, 0, c, role)
        if getattr(m, "running_mean", None) is not None:
            ctx.member("running_mean", 0, c, Role.MEAN)
            ctx.member("running_var", 0, c, Role.VAR)
        # a channel that is always zero leaves BatchNorm as a constant
        return _zero_to_const(x)

    def compact(self, m: nn.Module, keep: Keep) -> nn.Module:
        k = keep("running_mean", 0) if getattr(m, "running_mean", None) is not None else keep("weight", 0)
        params = {
            n: _take(getattr(m, n, None), 0, k) for n in ("weight", "bias", "running_mean", "running_var")
        }
        n = m.num_features if k is None else int(k.numel())
        return resized(m, params, num_features=n)


class GroupNormHandler(Handler):
    """GroupNorm: statistics are per group, so a whole group is one unit (removing it is exact)."""

    def propagate(self, m: nn.GroupNorm, ctx: Context, x: torch.Tensor, *rest, **kw) -> torch.Tensor:
        c = ctx.channels(x, 1)
        groups = c.view(m.num_groups, -1)
        for row in groups:
            ctx.ids.union_all(row)
        if m.affine:
            ctx.member("weight", 0, c, Role.SCALE)
            ctx.member("bias", 0, c, Role.ADDITIVE)
        return _zero_to_const(x)

    def compact(self, m: nn.GroupNorm, keep: Keep) -> nn.Module:
        k = keep("weight", 0) if m.affine else None
        if k is None:
            return m
        per_group = m.num_channels // m.num_groups
        return resized(
            m,
            {"weight": _take(m.weight, 0, k), "bias": _take(m.bias, 0, k)},
            num_channels=int(k.numel()),
            num_groups=int(k.numel()) // per_group,
        )


class LayerNormHandler(Handler):
    """LayerNorm over the last dimensions: the mean and variance mix the normalized channels, so
    removing one would change every output. Those channels are frozen (kept whole)."""

    def propagate(self, m: nn.LayerNorm, ctx: Context, x: torch.Tensor, *rest, **kw) -> torch.Tensor:
        k = len(m.normalized_shape)
        block = x.reshape(-1, *x.shape[x.dim() - k :])
        ctx.freeze(block, f"is normalized by LayerNorm '{ctx.module_name}' together with other channels")
        if m.elementwise_affine:
            ids = block[0] if k > 1 else ctx.channels(x, -1)
            dim = None if k > 1 else 0
            ctx.member("weight", dim, ids, Role.SCALE)
            if m.bias is not None:
                ctx.member("bias", dim, ids, Role.ADDITIVE)
        return x

    def compact(self, m: nn.LayerNorm, keep: Keep) -> nn.Module:
        return m  # its channels are frozen


class EmbeddingHandler(Handler):
    """Embedding: a producer of its embedding dimension (weight columns)."""

    def propagate(self, m: nn.Embedding, ctx: Context, x: torch.Tensor, *rest, **kw) -> torch.Tensor:
        out = ctx.fresh(m.embedding_dim)
        ctx.member("weight", 1, out, Role.FILTER)
        return ctx.broadcast(out, ctx.out.shape, -1)

    def compact(self, m: nn.Embedding, keep: Keep) -> nn.Module:
        k = keep("weight", 1)
        weight = _take(m.weight, 1, k)
        return resized(m, {"weight": weight}, embedding_dim=weight.shape[1])


class PReLUHandler(Handler):
    """PReLU with one slope per channel (channel-wise), or one shared slope (nothing to slice)."""

    def propagate(self, m: nn.PReLU, ctx: Context, x: torch.Tensor, *rest, **kw) -> torch.Tensor:
        if m.num_parameters > 1:
            ctx.member("weight", 0, ctx.channels(x, 1 if x.dim() > 1 else 0), Role.SCALE)
        return x

    def compact(self, m: nn.PReLU, keep: Keep) -> nn.Module:
        k = keep("weight", 0) if m.num_parameters > 1 else None
        if k is None:
            return m
        return resized(m, {"weight": _take(m.weight, 0, k)}, num_parameters=int(k.numel()))


def _attention_inputs(ctx: Context, query, key, value) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One id per channel of the query, key and value (self-attention passes one tensor three times)."""
    q_in = ctx.positions(query, -1)
    k_in = q_in if key is query else ctx.positions(key, -1)
    v_in = q_in if value is query else k_in if value is key else ctx.positions(value, -1)
    return q_in, k_in, v_in


def _attention_output(ctx: Context, rows: torch.Tensor, out_proj: nn.Linear) -> tuple:
    """out_proj reads the heads' rows and produces the output channels; ids of (output, weights)."""
    name = f"{ctx.module_name}.out_proj"
    ctx.member("weight", 1, rows, Role.CONSUMER, module=name)
    out = ctx.fresh(out_proj.out_features)
    ctx.member("weight", 0, out, Role.FILTER, module=name)
    if out_proj.bias is not None:
        ctx.member("bias", 0, out, Role.ADDITIVE, module=name)
    result = ctx.out
    weights = None if result[1] is None else torch.full(result[1].shape, CONST)
    return ctx.broadcast(out, result[0].shape, -1), weights


class MultiheadAttentionHandler(Handler):
    """nn.MultiheadAttention: a consumer of the query/key/value channels, a producer of out_proj's
    outputs, and one unit per head (its q, k and v rows and its out_proj columns), so heads are
    removed whole and the head size stays valid. A masked head outputs exactly zero (q = k = v = 0),
    so removing it is exact. The compact module is a :class:`PrunedMultiheadAttention`."""

    def propagate(self, m: nn.MultiheadAttention, ctx: Context, query, key, value, *rest, **kw):
        E, H = m.embed_dim, m.num_heads
        q_in, k_in, v_in = _attention_inputs(ctx, query, key, value)
        heads = ctx.fresh(H)
        rows = heads.repeat_interleave(E // H)
        if m.bias_k is not None or m.add_zero_attn:
            ctx.freeze(heads, f"attention '{ctx.module_name}' uses bias_k/bias_v or add_zero_attn")
        if m._qkv_same_embed_dim:
            ctx.union(q_in, k_in)
            ctx.union(q_in, v_in)
            ctx.member("in_proj_weight", 1, q_in, Role.CONSUMER)
            ctx.member("in_proj_weight", 0, torch.cat([rows, rows, rows]), Role.FILTER)
        else:
            for name, ids in (("q_proj_weight", q_in), ("k_proj_weight", k_in), ("v_proj_weight", v_in)):
                ctx.member(name, 1, ids, Role.CONSUMER)
                ctx.member(name, 0, rows, Role.FILTER)
        if m.in_proj_bias is not None:
            ctx.member("in_proj_bias", 0, torch.cat([rows, rows, rows]), Role.ADDITIVE)
        return _attention_output(ctx, rows, m.out_proj)

    def compact(self, m: nn.MultiheadAttention, keep: Keep) -> nn.Module:

        return PrunedMultiheadAttention.from_module(m, keep)


class PrunedAttentionHandler(Handler):
    """softprune's own :class:`~softprune.layers.PrunedMultiheadAttention` (a compact model pruned
    again): heads are units, as for nn.MultiheadAttention, over separate q/k/v projections."""

    def propagate(self, m, ctx: Context, query, key, value, *rest, **kw):
        q_in, k_in, v_in = _attention_inputs(ctx, query, key, value)
        rows = ctx.fresh(m.num_heads).repeat_interleave(m.head_dim)
        name = ctx.module_name
        for proj, ids in (("q_proj", q_in), ("k_proj", k_in), ("v_proj", v_in)):
            ctx.member("weight", 1, ids, Role.CONSUMER, module=f"{name}.{proj}")
            ctx.member("weight", 0, rows, Role.FILTER, module=f"{name}.{proj}")
            if getattr(m, proj).bias is not None:
                ctx.member("bias", 0, rows, Role.ADDITIVE, module=f"{name}.{proj}")
        return _attention_output(ctx, rows, m.out_proj)

    def compact(self, m, keep: Keep) -> nn.Module:

        rows = keep("q_proj.weight", 0)
        heads = torch.arange(m.num_heads) if rows is None else torch.unique(rows // m.head_dim)
        cols = {p: keep(f"{p}.weight", 1) for p in ("q_proj", "k_proj", "v_proj")}
        out_rows = keep("out_proj.weight", 0)
        row_index = (heads[:, None] * m.head_dim + torch.arange(m.head_dim)).reshape(-1)

        def width(index, full):
            return full if index is None else int(index.numel())

        new = PrunedMultiheadAttention(
            width(cols["q_proj"], m.embed_dim), int(heads.numel()), m.head_dim, width(cols["k_proj"], m.kdim),
            width(cols["v_proj"], m.vdim), bias=m.q_proj.bias is not None, batch_first=m.batch_first,
            dropout=m.dropout, out_dim=width(out_rows, m.out_dim),
        )  # fmt: skip
        with torch.no_grad():
            for p in ("q_proj", "k_proj", "v_proj"):
                old, fresh = getattr(m, p), getattr(new, p)
                fresh.weight.copy_(_take_2d(old.weight, row_index, cols[p]))
                if old.bias is not None:
                    fresh.bias.copy_(_take(old.bias, 0, row_index))
            new.out_proj.weight.copy_(_take_2d(m.out_proj.weight, out_rows, row_index))
            new.out_proj.bias.copy_(_take(m.out_proj.bias, 0, out_rows))
        return new.to(m.out_proj.weight.device, m.out_proj.weight.dtype)


class StdConvHandler(ConvHandler):
    """A weight-standardized convolution (timm's StdConv2d, ScaledStdConv2d and their "same"
    variants, in NF-Nets): each filter is standardized over its own input channels and taps, so
    removing a filter is exact and removing an input channel is not (it changes every filter's mean
    and variance): output channels are pruned, input channels kept whole (except depthwise, where a
    filter has one input channel). ``gain`` follows the filters."""

    def propagate(self, m: nn.Module, ctx: Context, x: torch.Tensor, *rest, **kw) -> torch.Tensor:
        out = super().propagate(m, ctx, x, *rest, **kw)
        cdim = x.dim() - (m.weight.dim() - 2) - 1
        depthwise = m.groups > 1 and m.in_channels // m.groups == 1
        if not depthwise:
            ctx.freeze(
                ctx.positions(x, cdim),
                f"is read by '{ctx.module_name}', whose weights are standardized over it",
            )
        if getattr(m, "gain", None) is not None:
            ctx.member("gain", 0, ctx.channels(out, cdim), Role.SCALE)
        return out

    def compact(self, m: nn.Module, keep: Keep) -> nn.Module:
        new = super().compact(m, keep)
        rows = keep("weight", 0)
        if getattr(m, "gain", None) is not None and rows is not None:
            new.gain = nn.Parameter(_take(m.gain, 0, rows).detach(), requires_grad=m.gain.requires_grad)
        return new


class BlurPoolHandler(Handler):
    """timm's BlurPool2d (anti-aliased downsampling): a fixed depthwise filter per channel, with the
    channel count stored as a number that its forward passes to F.conv2d as groups."""

    def propagate(self, m: nn.Module, ctx: Context, x: torch.Tensor, *rest, **kw) -> torch.Tensor:
        c = ctx.channels(x, 1)
        if m.channels is not None:
            ctx.member("filt", 0, c, Role.SCALE)
        return ctx.broadcast(c, ctx.out.shape, 1)

    def compact(self, m: nn.Module, keep: Keep) -> nn.Module:
        k = keep("filt", 0) if m.channels is not None else None
        if k is None:
            return m
        return resized(m, {"filt": _take(m.filt, 0, k)}, channels=int(k.numel()))


class KeepWhole(Handler):
    """A module softprune does not look inside: its inputs and outputs keep every channel.

    Used for modules whose forward hard-codes a relation between widths (torchvision's Swin and
    MaxViT attention compute head_dim = channels // num_heads), and for modules listed in ignore=.
    """

    def __init__(self, reason: str = "is kept whole") -> None:
        self.reason = reason

    def propagate(self, m: nn.Module, ctx: Context, *args, **kwargs):

        for t in collect_tensors(args) + collect_tensors(kwargs):
            ctx.freeze(t, f"flows through '{ctx.module_name}', which {self.reason}")
        token = ctx.fresh(1)
        ctx.freeze(token, f"comes out of '{ctx.module_name}', which {self.reason}")
        return map_values(ctx.out, lambda v: token.expand(v.shape) if isinstance(v, torch.Tensor) else None)

    def compact(self, m: nn.Module, keep: Keep) -> nn.Module:
        return m


HANDLERS: dict[type, Handler] = {}
for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    HANDLERS[_cls] = ConvHandler()
for _cls in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear):
    HANDLERS[_cls] = LinearHandler()
for _cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
    HANDLERS[_cls] = BatchNormHandler()
for _cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    HANDLERS[_cls] = ConvTransposeHandler()
HANDLERS[nn.GroupNorm] = GroupNormHandler()
HANDLERS[nn.LayerNorm] = LayerNormHandler()
HANDLERS[nn.Embedding] = EmbeddingHandler()
HANDLERS[nn.PReLU] = PReLUHandler()
HANDLERS[nn.MultiheadAttention] = MultiheadAttentionHandler()
for _cls in (nn.LSTM, nn.GRU, nn.RNN):  # Sequencer's token mixers: softprune does not prune their gates
    HANDLERS[_cls] = KeepWhole("is a recurrent layer (its widths are kept)")


class ChannelRemapHandler(Handler):
    """softprune's ChannelRemap in a compact model being analysed again: positions move as its index
    lists say; with a second input (an add of a pruned branch into a stream) the moved ids are added to
    it like any residual add."""

    def propagate(self, m, ctx: Context, x, base=None, **kw):

        shape = list(x.shape)
        shape[m.dim] = m.out_size
        moved = torch.full(shape, ZERO, dtype=torch.long)
        moved.index_copy_(m.dim, m.dst, x.index_select(m.dim, m.src))
        if base is None:
            return moved
        return combine(ctx, base, moved, add_vec).expand(ctx.out.shape)

    def compact(self, m, keep: Keep) -> nn.Module:  # pragma: no cover - compact.py rebuilds remaps itself
        return m


def _torchvision_modules() -> None:
    try:
        from torchvision.models.maxvit import RelativePositionalMultiHeadAttention
        from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2
    except ImportError:  # pragma: no cover - torchvision is a dependency; older versions lack these
        return
    from torchvision.ops.misc import FrozenBatchNorm2d

    reason = "computes its head size from the channel count (attention heads kept whole)"
    for cls in (ShiftedWindowAttention, ShiftedWindowAttentionV2, RelativePositionalMultiHeadAttention):
        HANDLERS.setdefault(cls, KeepWhole(reason))
    # detection backbones: a BatchNorm whose scale, shift and statistics are buffers
    HANDLERS.setdefault(FrozenBatchNorm2d, BatchNormHandler())


_torchvision_modules()
HANDLERS[PrunedMultiheadAttention] = PrunedAttentionHandler()  # a compact model analysed again
HANDLERS[ChannelRemap] = ChannelRemapHandler()


def register_optional_modules() -> None:
    """Handlers for layers of libraries the user has imported (never imported here): timm's
    norm+activation layers and its Linear are their torch.nn twins followed by an elementwise
    activation, so the twin's handler is exact for them (traced through, their forward calls
    F.batch_norm with their own parameters); its "same"-padded and weight-standardized convolutions
    compute their padding or weights in Python that fx cannot trace or the ids cannot follow."""
    layers = sys.modules.get("timm.layers")
    if layers is None or getattr(layers, "_softprune_registered", False):
        return
    twins = {
        "BatchNormAct2d": BatchNormHandler,
        "SyncBatchNormAct": BatchNormHandler,
        "GroupNormAct": GroupNormHandler,
        "GroupNorm1Act": GroupNormHandler,
        "Linear": LinearHandler,
        # "same" padding computed from the input's size in Python: fx cannot trace it, and it is
        # a convolution's own business
        "Conv2dSame": ConvHandler,
        "StdConv2d": StdConvHandler,
        "StdConv2dSame": StdConvHandler,
        "ScaledStdConv2d": StdConvHandler,
        "ScaledStdConv2dSame": StdConvHandler,
        "BlurPool2d": BlurPoolHandler,
    }
    for name, handler in twins.items():
        cls = getattr(layers, name, None)
        if isinstance(cls, type):
            HANDLERS.setdefault(cls, handler())
    layers._softprune_registered = True


def register_handler(module_type: type, handler: Handler) -> None:
    """Use ``handler`` for every module of exactly this type (subclasses are traced through)."""
    HANDLERS[module_type] = handler
