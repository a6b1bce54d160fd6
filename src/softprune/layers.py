"""The layers compaction puts into a model: ``ChannelRemap`` (a pruned branch's kept channels added
back at their indices) and ``PrunedMultiheadAttention`` (attention with heads removed).

A leaf: plain modules that import nothing of softprune, so that a compact model loads with torch
alone in reach of this file, and the graph's handlers can recognise them without importing compaction.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ChannelRemap(nn.Module):
    """Moves slices along ``dim``: output position ``dst[i]`` gets input position ``src[i]``, the
    other output positions are zero; given a second input ``base``, the result is added to it.

    This is how a compact graph adds a pruned branch's kept channels back at their indices (SFP's
    compact ResNet), gathers surviving channels, or widens a tensor for an op that must run at full
    width. On channels-last 4-D tensors a remap along channels runs as a 1x1 convolution with a 0/1
    weight: index operations there are several times slower and return the wrong memory format.
    """

    def __init__(self, dim: int, src: torch.Tensor, dst: torch.Tensor, in_size: int, out_size: int) -> None:
        super().__init__()
        self.dim, self.in_size, self.out_size = dim, in_size, out_size
        self.register_buffer("src", src.clone(), persistent=False)
        self.register_buffer("dst", dst.clone(), persistent=False)
        weight = torch.zeros(out_size, in_size, 1, 1)
        weight[dst, src] = 1.0
        self.register_buffer("weight", weight, persistent=False)

    def _channels_last(self, x: torch.Tensor) -> bool:
        return (
            self.dim == 1
            and x.dim() == 4
            and x.is_floating_point()
            and x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous()
        )

    def forward(self, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        if self._channels_last(x):
            moved = F.conv2d(x, self.weight.to(x.dtype))
            return moved if base is None else base + moved
        part = x.index_select(self.dim, self.src)
        if base is not None:
            return base.index_add(self.dim, self.dst, part)
        shape = list(x.shape)
        shape[self.dim] = self.out_size
        return x.new_zeros(shape).index_copy(self.dim, self.dst, part)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, {self.in_size} -> {self.out_size}, moved={self.src.numel()}"


class PrunedMultiheadAttention(nn.Module):
    """nn.MultiheadAttention with heads removed: queries, keys and values are projected to
    ``num_heads * head_dim`` channels (fewer than ``embed_dim``) and out_proj maps them back.

    Same call signature and results as the module it replaces; returned attention weights (when asked
    for) average over the kept heads. Attention masks given per head ([N*H, L, S]) must be for the
    kept heads.
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, kdim: int, vdim: int, *,
                 bias: bool, batch_first: bool, dropout: float, out_dim: int | None = None) -> None:  # fmt: skip
        super().__init__()
        out_dim = embed_dim if out_dim is None else out_dim
        self.embed_dim, self.num_heads, self.head_dim, self.out_dim = embed_dim, num_heads, head_dim, out_dim
        self.kdim, self.vdim, self.batch_first, self.dropout = kdim, vdim, batch_first, dropout
        inner = num_heads * head_dim
        # no random init: from_module overwrites every weight
        self.q_proj = nn.utils.skip_init(nn.Linear, embed_dim, inner, bias=bias)
        self.k_proj = nn.utils.skip_init(nn.Linear, kdim, inner, bias=bias)
        self.v_proj = nn.utils.skip_init(nn.Linear, vdim, inner, bias=bias)
        self.out_proj = nn.utils.skip_init(nn.Linear, inner, out_dim, bias=True)

    @classmethod
    def from_module(cls, m: nn.MultiheadAttention, keep) -> PrunedMultiheadAttention:
        E, H = m.embed_dim, m.num_heads
        D = E // H
        if m._qkv_same_embed_dim:
            rows = keep("in_proj_weight", 0)
            cols = keep("in_proj_weight", 1)
            w = m.in_proj_weight
            weights = [w[:E], w[E : 2 * E], w[2 * E :]]
            col_keep = [cols, cols, cols]
        else:
            rows = keep("q_proj_weight", 0)
            weights = [m.q_proj_weight, m.k_proj_weight, m.v_proj_weight]
            col_keep = [keep(n, 1) for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight")]
        kept_rows = torch.arange(3 * E) if rows is None else rows
        per_part = [kept_rows[(kept_rows >= i * E) & (kept_rows < (i + 1) * E)] - i * E for i in range(3)]
        heads = per_part[0].numel() // D

        def width(index, full):
            return full if index is None else int(index.numel())

        out_rows = keep("out_proj.weight", 0)
        dims = [width(c, full) for c, full in zip(col_keep, (E, m.kdim, m.vdim))]
        new = cls(
            dims[0], heads, D, dims[1], dims[2], bias=m.in_proj_bias is not None, batch_first=m.batch_first,
            dropout=m.dropout, out_dim=width(out_rows, E),
        )  # fmt: skip
        with torch.no_grad():
            for i, proj in enumerate((new.q_proj, new.k_proj, new.v_proj)):
                w = weights[i].index_select(0, per_part[i].to(weights[i].device))
                if col_keep[i] is not None:
                    w = w.index_select(1, col_keep[i].to(w.device))
                proj.weight.copy_(w)
                if m.in_proj_bias is not None:
                    proj.bias.copy_(
                        m.in_proj_bias[i * E : (i + 1) * E].index_select(0, per_part[i].to(w.device))
                    )
            # out_proj's columns follow the kept heads (the value rows)
            w = m.out_proj.weight.index_select(1, per_part[2].to(m.out_proj.weight.device))
            if out_rows is not None:
                w = w.index_select(0, out_rows.to(w.device))
            new.out_proj.weight.copy_(w)
            if m.out_proj.bias is not None:
                b = m.out_proj.bias
                new.out_proj.bias.copy_(b if out_rows is None else b.index_select(0, out_rows.to(b.device)))
            else:
                new.out_proj.bias.zero_()
        return new.to(m.out_proj.weight.device, m.out_proj.weight.dtype)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):  # fmt: skip
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) if t.dim() == 3 else t for t in (query, key, value))
        batched = query.dim() == 3
        if not batched:
            query, key, value = query[None], key[None], value[None]
        n, length, _ = query.shape
        source = key.shape[1]
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).view(n, length, h, d).transpose(1, 2)
        k = self.k_proj(key).view(n, source, h, d).transpose(1, 2)
        v = self.v_proj(value).view(n, source, h, d).transpose(1, 2)
        mask = None
        if attn_mask is not None:
            mask = attn_mask
            if mask.dim() == 3:
                mask = mask.view(n, h, length, source)
            if mask.dtype == torch.bool:
                mask = torch.zeros_like(mask, dtype=q.dtype).masked_fill(mask, float("-inf"))
        if key_padding_mask is not None:
            pad = key_padding_mask.view(n, 1, 1, source)
            pad = (
                torch.zeros_like(pad, dtype=q.dtype).masked_fill(pad, float("-inf"))
                if pad.dtype == torch.bool
                else pad
            )
            mask = pad if mask is None else mask + pad
        drop = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)
            if mask is not None:
                scores = scores + mask
            attn = torch.softmax(scores, dim=-1)
            weights = attn.mean(1) if average_attn_weights else attn
            out = F.dropout(attn, drop, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=drop, is_causal=is_causal and mask is None
            )
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, h * d))
        if not batched:
            out = out[0]
            weights = None if weights is None else weights[0]
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        out = f", out_dim={self.out_dim}" if self.out_dim != self.embed_dim else ""
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}{out}"
