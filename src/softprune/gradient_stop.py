"""The gradient stop of soft units (softprune.soft): a producer's backward that gives its weights
the whole output gradient and its input only alpha_t of each soft row's share.

A soft channel is masked where it is read and trained straight through, so the gradient arriving at
its producer's output is the gradient it would have if it were alive. Its own filter should learn
from it; the layers before it should not (they would train for a channel the network does not use).
PyTorch's convolution backward computes the input's and the weights' gradients from one output
gradient; here they are computed from two (``torch.ops.aten.convolution_backward`` with its output
mask, once each): the input's with the soft rows of the weight scaled by alpha_t, which scales their
share, the weights' from the whole gradient. No second backward, and no pass over the gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable


@dataclass(frozen=True)
class Layer:
    """What the backward of a producer's layer needs: a linear layer, or a convolution's geometry
    with its padding as numbers."""

    linear: bool
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1

    @classmethod
    def of(cls, module: nn.Module) -> Layer | None:
        """None for a convolution whose padding the backward cannot repeat (a padding mode other than
        zeros pads before the convolution; "same" with an even kernel span pads one side more)."""
        if isinstance(module, nn.Linear):
            return cls(linear=True)
        if module.padding_mode != "zeros":
            return None
        padding = module.padding
        if padding == "valid":
            padding = (0,) * len(module.kernel_size)
        elif padding == "same":
            spans = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
            if any(span % 2 for span in spans):
                return None
            padding = tuple(span // 2 for span in spans)
        return cls(False, tuple(module.stride), tuple(padding), tuple(module.dilation), module.groups)


class SoftRowsGradient(torch.autograd.Function):
    """A producer's output as its layer computed it, differentiated so that the layer's parameters get
    all of the output's gradient and its input only ``scale`` of each output row's share (alpha_t for
    a soft row, 1 for a kept one). The stop used to take the soft rows' share out with a
    second, partial backward of the layer: a ResNet-56 training step with soft units cost 32-35% more
    than a plain one, now 7-11% (benchmarks/results/overhead.md)."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer: Layer, scale: torch.Tensor, computed: list):
        # the output arrives in a list, not as an argument: returned as an argument it would become a
        # view, and an in-place activation after the layer would then be refused
        ctx.save_for_backward(x, weight)
        ctx.layer, ctx.scale, ctx.has_bias = layer, scale, bias is not None
        return computed[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        layer, dtype = ctx.layer, grad.dtype  # under autocast the layer ran in the gradient's dtype
        xs, ws = x.to(dtype), weight.to(dtype)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = gw = gb = None
        if layer.linear:
            if need_x:  # scaling the weight's rows scales their share: cheaper than scaling the gradient
                gx = grad @ (ws * ctx.scale.to(ws).unsqueeze(1))
            flat = grad.reshape(-1, grad.shape[-1])
            if need_w:
                gw = flat.T @ xs.reshape(-1, xs.shape[-1])
            if need_b:
                gb = flat.sum(0)
        else:
            unbatched = xs.dim() == ws.dim() - 1
            if unbatched:
                xs, grad = xs.unsqueeze(0), grad.unsqueeze(0)
            geometry = (
                layer.stride,
                layer.padding,
                layer.dilation,
                False,
                (0,) * len(layer.stride),
                layer.groups,
            )
            conv_backward = torch.ops.aten.convolution_backward
            if need_x:  # the rows' share scaled through the (small) weight, not the (large) gradient
                scaled = ws * ctx.scale.to(ws).view(-1, *[1] * (ws.dim() - 1))
                gx = conv_backward(grad, xs, scaled, None, *geometry, (True, False, False))[0]
                gx = gx.squeeze(0) if unbatched else gx
            if need_w or need_b:
                sizes = [ws.shape[0]] if ctx.has_bias else None
                _, gw, gb = conv_backward(grad, xs, ws, sizes, *geometry, (False, need_w, need_b))
        gx = gx.to(x.dtype) if gx is not None else None
        gw = gw.to(weight.dtype) if gw is not None else None
        return gx, gw, gb, None, None, None
