"""Id rules of the parameter-free torch.nn modules (activations, pooling, flatten, padding, shuffles),
the leaves of the trace that have no handler. Most reuse the function rules of ``ops.py``."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import nn

from .functional import fold_rule, unfold_rule
from .ids import Context
from .ops import (
    elementwise,
    elementwise_nonzero_at_zero,
    normalize_over,
    pad,
    resize,
    spatial,
)


def _module_from(fn_rule: Callable) -> Callable:
    def rule(ctx: Context, module: nn.Module, arg_ids, kwarg_ids, args, kwargs):
        return fn_rule(ctx, arg_ids, kwarg_ids, args, kwargs)

    return rule


def _flatten_module(ctx: Context, module: nn.Flatten, arg_ids, kwarg_ids, args, kwargs):
    return arg_ids[0].flatten(module.start_dim, module.end_dim)


def _unflatten_module(ctx: Context, module: nn.Unflatten, arg_ids, kwarg_ids, args, kwargs):
    return arg_ids[0].unflatten(module.dim, module.unflattened_size)


def _softmax_module(ctx: Context, module, arg_ids, kwarg_ids, args, kwargs):
    dim = module.dim if module.dim is not None else -1
    return normalize_over(1, type(module).__name__)(ctx, [arg_ids[0], dim], {}, [args[0], dim], {})


def _channel_shuffle_module(ctx: Context, module: nn.ChannelShuffle, arg_ids, kwarg_ids, args, kwargs):
    return F.channel_shuffle(arg_ids[0], module.groups)


def _pixel_shuffle_module(ctx: Context, module, arg_ids, kwarg_ids, args, kwargs):
    return module(arg_ids[0])  # a pure permutation of elements: the module works on ids directly


def _pad_module(ctx: Context, module, arg_ids, kwarg_ids, args, kwargs):
    mode = (
        getattr(module, "mode", "constant")
        if not isinstance(module, nn.modules.padding._ConstantPadNd)
        else "constant"
    )
    value = getattr(module, "value", 0)
    return pad(ctx, arg_ids, {}, [args[0], module.padding, mode, value], {})


def _unfold_module(ctx: Context, module: nn.Unfold, arg_ids, kwarg_ids, args, kwargs):
    params = {n: getattr(module, n) for n in ("kernel_size", "dilation", "padding", "stride")}
    return unfold_rule(ctx, arg_ids, {}, args[:1], params)


def _fold_module(ctx: Context, module: nn.Fold, arg_ids, kwarg_ids, args, kwargs):
    return fold_rule(ctx, arg_ids, {}, args, {})


MODULE_RULES: dict[type, Callable] = {}
MODULE_RULES[nn.Unfold] = _unfold_module
MODULE_RULES[nn.Fold] = _fold_module
for cls in (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish,
    nn.Hardtanh, nn.Tanh, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
    nn.Softsign, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink, nn.Threshold,
):  # fmt: skip
    MODULE_RULES[cls] = _module_from(elementwise)
for cls in (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid):
    MODULE_RULES[cls] = _module_from(elementwise_nonzero_at_zero)
for cls, n in (
    (nn.MaxPool1d, 1), (nn.MaxPool2d, 2), (nn.MaxPool3d, 3), (nn.AvgPool1d, 1), (nn.AvgPool2d, 2),
    (nn.AvgPool3d, 3), (nn.AdaptiveAvgPool1d, 1), (nn.AdaptiveAvgPool2d, 2), (nn.AdaptiveAvgPool3d, 3),
    (nn.AdaptiveMaxPool1d, 1), (nn.AdaptiveMaxPool2d, 2), (nn.AdaptiveMaxPool3d, 3), (nn.LPPool2d, 2),
):  # fmt: skip
    MODULE_RULES[cls] = _module_from(spatial(n))
MODULE_RULES[nn.Upsample] = _module_from(resize)
MODULE_RULES[nn.Flatten] = _flatten_module
MODULE_RULES[nn.Unflatten] = _unflatten_module
MODULE_RULES[nn.Softmax] = _softmax_module
MODULE_RULES[nn.LogSoftmax] = _softmax_module
MODULE_RULES[nn.ChannelShuffle] = _channel_shuffle_module
MODULE_RULES[nn.PixelShuffle] = _pixel_shuffle_module
MODULE_RULES[nn.PixelUnshuffle] = _pixel_shuffle_module
for cls in (
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d,
    nn.ReplicationPad3d,
):  # fmt: skip
    MODULE_RULES[cls] = _pad_module

# Compaction checks these on compact tensors (see compact.py); other rules keep layouts by construction.
for _rule in (
    _flatten_module,
    _unflatten_module,
    _channel_shuffle_module,
    _pad_module,
    _pixel_shuffle_module,
):
    _rule.kind = "movement"


def register_optional_rules() -> None:
    """timm's "same"-padded pooling (padding computed from the input's size, which fx cannot trace):
    channel-wise, as the pooling it wraps. Registered only when the user has imported timm."""
    import sys

    pools = sys.modules.get("timm.layers.pool2d_same")
    if pools is None:
        return
    for name in ("MaxPool2dSame", "AvgPool2dSame"):
        cls = getattr(pools, name, None)
        if isinstance(cls, type):
            MODULE_RULES.setdefault(cls, _module_from(spatial(2)))
