"""Hand-made modules, one per dependency pattern: what is pruned together, and exact compaction."""

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import softprune
from softprune.check import max_difference
from softprune.compact import PrunedMultiheadAttention
from softprune.errors import SoftpruneError
from softprune.graph.handlers import KeepWhole


def prune(model, x, rate=0.5, residual="coupled", layers="all", **kw):
    """SFP at ``rate``, compacted; returns (pruner, compact model) after checking equivalence."""
    torch.manual_seed(0)
    pruner = softprune.Pruner(model, "sfp", rate, 1, example_inputs=x, residual=residual, layers=layers, **kw)
    pruner.step()
    small = pruner.compact()
    diff, scale = max_difference(model, small, (torch.randn_like(x),))
    assert scale > 0 and diff <= 1e-5 * scale, (diff, scale)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    return pruner, small


def group_of(pruner, producer):
    return next(g for g in pruner.groups if producer in g.producers)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = (
            nn.Conv2d(3, 8, 3, padding=1),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.Conv2d(8, 4, 1),
        )

    def forward(self, x):
        y = F.relu(self.a(x))
        return self.head(F.relu(self.b(y) + y))


@pytest.mark.parametrize("residual", ["coupled", "independent"])
def test_residual_add(residual):
    pruner, small = prune(Residual(), torch.randn(2, 3, 8, 8), residual=residual)
    if residual == "coupled":
        assert set(group_of(pruner, "a").producers) == {"a", "b"}  # one mask across the stream
        assert small.a.out_channels == small.b.out_channels == small.head.in_channels == 4
    else:
        assert group_of(pruner, "a").producers == ["a"] and group_of(pruner, "b").producers == ["b"]
        assert small.a.out_channels == small.b.out_channels == 4
        assert 4 <= small.head.in_channels <= 8  # the union of the two kept sets


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        y = F.relu(self.conv(x))
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.head(y * gate)


def test_se_gate_multiply_couples_the_gate_with_its_channels():
    pruner, small = prune(SqueezeExcite(), torch.randn(2, 3, 8, 8))
    assert set(group_of(pruner, "conv").producers) == {"conv", "fc2"}
    assert (
        small.conv.out_channels
        == small.fc2.out_channels
        == small.fc1.in_channels
        == small.head.in_channels
        == 8
    )


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 10, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.c(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1))


def test_concatenation_offsets():
    pruner, small = prune(Concat(), torch.randn(2, 3, 5, 5))
    assert small.a.out_channels == 3 and small.b.out_channels == 5 and small.c.in_channels == 8


class SplitChunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.left, self.right = nn.Conv2d(3, 12, 1), nn.Conv2d(6, 4, 1), nn.Conv2d(6, 4, 1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        a, b = F.relu(self.stem(x)).chunk(2, dim=1)
        c, d = torch.split(F.relu(torch.cat([self.left(a), self.right(b)], 1)), [4, 4], dim=1)
        return self.head(torch.cat([d, c], 1))


def test_split_and_chunk():
    pruner, small = prune(SplitChunk(), torch.randn(2, 3, 4, 4))
    assert small.stem.out_channels == 6 and small.left.out_channels == small.right.out_channels == 2


class Depthwise(nn.Module):
    def __init__(self, multiplier=1):
        super().__init__()
        self.pw1 = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8 * multiplier, 3, padding=1, groups=8)
        self.pw2 = nn.Conv2d(8 * multiplier, 4, 1)

    def forward(self, x):
        return self.pw2(F.relu(self.dw(F.relu(self.bn(self.pw1(x))))))


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_conv_shrinks_its_groups(multiplier):
    pruner, small = prune(Depthwise(multiplier), torch.randn(2, 3, 6, 6))
    assert small.pw1.out_channels == small.dw.groups == small.dw.in_channels == small.bn.num_features
    assert small.dw.out_channels == small.dw.groups * multiplier and small.pw1.out_channels < 8


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.g, self.b = (
            nn.Conv2d(3, 16, 1),
            nn.Conv2d(16, 16, 3, padding=1, groups=4),
            nn.Conv2d(16, 5, 1),
        )

    def forward(self, x):
        return self.b(F.relu(self.g(F.relu(self.a(x)))))


def test_grouped_conv_keeps_valid_group_widths():
    pruner, small = prune(Grouped(), torch.randn(2, 3, 6, 6))
    assert small.g.groups == 4
    assert small.g.in_channels % 4 == 0 and small.g.out_channels % 4 == 0
    assert small.a.out_channels == small.g.in_channels == 8 and small.g.out_channels == 8


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.gn = nn.Conv2d(3, 12, 1), nn.GroupNorm(4, 12)
        self.b, self.ln = nn.Conv2d(12, 8, 1), nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y = self.b(F.relu(self.gn(self.a(x))))
        return self.head(self.ln(y.mean((2, 3))))


def test_groupnorm_prunes_whole_groups_and_layernorm_channels_are_frozen():
    pruner, small = prune(Norms(), torch.randn(2, 3, 4, 4))
    gn_group = group_of(pruner, "a")
    assert gn_group.size == 4  # a GroupNorm group is one unit
    assert small.gn.num_groups == 2 and small.gn.num_channels == 6 and small.a.out_channels == 6
    ln_group = group_of(pruner, "b")
    assert not ln_group.prunable and "LayerNorm 'ln'" in next(iter(ln_group.reasons.values()))


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 6, 3), nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


def test_linear_after_flatten_loses_hw_columns_per_channel():
    pruner, small = prune(FlattenLinear(), torch.randn(2, 3, 6, 6))
    assert small.conv.out_channels == 3 and small.fc.in_features == 3 * 16


class Shuffle(nn.Module):
    def __init__(self, functional):
        super().__init__()
        self.functional = functional
        self.a, self.b, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)
        if self.functional:
            y = F.channel_shuffle(y, 2)
        else:
            n, c, h, w = y.size()
            y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, -1, h, w)
        return self.head(y)


@pytest.mark.parametrize("functional", [True, False])
def test_channel_shuffle(functional):
    pruner, small = prune(Shuffle(functional), torch.randn(2, 3, 4, 4))
    assert small.head.in_channels == small.a.out_channels + small.b.out_channels


class ChannelsLastMLP(nn.Module):
    """ConvNeXt's pattern: permute to channels-last, Linear layers, permute back."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(y))).permute(0, 3, 1, 2)
        return self.head(y + x)


def test_reshape_and_permute():
    pruner, small = prune(ChannelsLastMLP(), torch.randn(2, 8, 5, 5))
    assert small.fc1.out_features == small.fc2.in_features == 16
    assert small.fc2.out_features == 8  # its outputs meet the input in an add: frozen


class Tokens(nn.Module):
    """A ViT-like model: patch embedding, class token, position embedding, attention, MLP."""

    def __init__(self, norm: bool, batch_first: bool = True):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        self.pos = nn.Parameter(torch.randn(1, 5, 16))
        self.scale = nn.Parameter(torch.rand(16) + 0.5)  # a layer scale, used outside any module
        self.norm = nn.LayerNorm(16) if norm else nn.Identity()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.batch_first = batch_first
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        h = self.norm(t)
        if not self.batch_first:
            h = h.transpose(0, 1)
        a = self.attn(h, h, h, need_weights=False)[0]
        if not self.batch_first:
            a = a.transpose(0, 1)
        t = t + a
        t = t + self.scale * self.fc2(F.gelu(self.fc1(t)))
        return self.head(t[:, 0])


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_heads_are_removed_whole(batch_first):
    pruner, small = prune(Tokens(norm=True, batch_first=batch_first), torch.randn(2, 3, 8, 8))
    assert isinstance(small.attn, PrunedMultiheadAttention)
    assert small.attn.num_heads == 2 and small.attn.head_dim == 4 and small.attn.q_proj.out_features == 8
    assert small.fc1.out_features == 16
    embed = group_of(pruner, "patch")
    assert not embed.prunable and "LayerNorm" in next(iter(embed.reasons.values()))


def test_embedding_dims_and_parameters_outside_modules_without_layernorm():
    pruner, small = prune(Tokens(norm=False), torch.randn(2, 3, 8, 8))
    embed = group_of(pruner, "patch")
    assert embed.prunable and set(embed.producers) >= {"patch", "attn.out_proj", "fc2"}
    assert small.patch.out_channels == 8
    assert small.cls.shape == (1, 1, 8) and small.pos.shape == (1, 5, 8) and small.scale.shape == (8,)
    assert small.attn.embed_dim == 8 and small.head.in_features == 8


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            x = x * 2
        return self.conv(x)


def test_untraceable_model_is_a_clear_error():
    with pytest.raises(SoftpruneError, match="torch.fx could not trace Untraceable.*ignore="):
        softprune.Pruner(Untraceable(), "sfp", 0.5, 1, example_inputs=torch.randn(1, 3, 4, 4))


class Upsample(nn.Module):
    def __init__(self, depthwise: bool):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        groups, out = (8, 8) if depthwise else (1, 6)
        self.up = nn.ConvTranspose2d(8, out, 2, stride=2, groups=groups)
        self.head = nn.Conv2d(out, 4, 1)

    def forward(self, x):
        return self.head(F.relu(self.up(F.relu(self.a(x)))))


@pytest.mark.parametrize("depthwise", [False, True])
def test_transposed_convolution_reads_dim0_and_writes_dim1(depthwise):
    pruner, small = prune(Upsample(depthwise), torch.randn(2, 3, 6, 6))
    assert small.a.out_channels == small.up.in_channels == 4
    if depthwise:  # channel-wise: its channels are a's
        assert small.up.out_channels == small.up.groups == 4 and small.head.in_channels == 4
    else:
        assert small.up.weight.shape[1] == small.up.out_channels == small.head.in_channels == 3


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1)
        self.rnn, self.head = nn.LSTM(8, 6, batch_first=True), nn.Linear(6, 4)

    def forward(self, x):
        tokens = F.relu(self.b(F.relu(self.a(x)))).flatten(2).transpose(1, 2)
        out, _ = self.rnn(tokens)
        return self.head(out.mean(1))


def test_recurrent_layers_are_kept_whole_and_the_rest_prunes():
    pruner, small = prune(Recurrent(), torch.randn(2, 3, 4, 4))
    assert small.a.out_channels == 4  # read by b only
    assert small.b.out_channels == 8 and small.rnn.input_size == 8  # read by the LSTM: kept
    assert "recurrent" in next(iter(group_of(pruner, "b").reasons.values()))


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2's GRN: each channel's spatial norm divided by the mean over channels."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.gamma, self.beta = nn.Parameter(torch.rand(1, 8, 1, 1)), nn.Parameter(torch.rand(1, 8, 1, 1))

    def forward(self, x):
        x = F.relu(self.a(x))
        g = x.norm(p=2, dim=(2, 3), keepdim=True)
        n = g / (g.mean(dim=1, keepdim=True) + 1e-6)
        return self.b(x + torch.addcmul(self.beta, self.gamma, x * n))


def test_a_mean_over_channels_is_rescaled_in_the_compact_model():
    pruner, small = prune(GlobalResponseNorm(), torch.randn(2, 3, 4, 4))
    assert small.a.out_channels == 4 and small.gamma.shape == (1, 4, 1, 1)
    # the mean runs over 4 channels where the masked model's ran over 8 (4 of them zero): x 4/8
    assert any(n.target is operator.mul and n.args[1] == 0.5 for n in small.graph.nodes)


class FoldUnfold(nn.Module):
    """im2col and back (VOLO's outlook attention): a channel's k*k rows stay that channel's."""

    def __init__(self):
        super().__init__()
        self.a, self.head, self.unfold = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1), nn.Unfold(3, padding=1)

    def forward(self, x):
        patches = self.unfold(F.relu(self.a(x))) * 0.5  # B, 8 * 9, H * W
        return self.head(F.fold(patches, x.shape[-2:], 3, padding=1))


def test_unfold_and_fold_keep_channels_apart():
    pruner, small = prune(FoldUnfold(), torch.randn(2, 3, 5, 5))
    assert small.a.out_channels == small.head.in_channels == 4


class SizeBranch(nn.Module):
    """Control flow on a feature map's size, as timm's MobileViT and TinyViT blocks have."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        if y.shape[-1] % 2 == 1:  # odd maps are padded first
            y = F.pad(y, (1, 1, 1, 1))
        return self.head(F.relu(self.b(y)))


def test_control_flow_on_sizes_is_traced_at_the_example_size():
    pruner, small = prune(SizeBranch(), torch.randn(2, 3, 8, 8))
    assert [d.split(":")[0] for d in pruner.analysis.decisions] == ["test_patterns.py"]
    assert pruner.analysis.decisions[0].endswith(": False")
    assert type(small) is SizeBranch and small.a.out_channels == 4  # the user's class, branch and all
    odd = torch.randn(2, 3, 7, 7)  # the other branch, which the example did not take
    diff, scale = max_difference(pruner.model, small, (odd,))
    assert scale > 0 and diff <= 1e-5 * scale


class SizeFromShape(nn.Module):
    """A tensor reshaped with the channel count of another (timm's lambda layer)."""

    def __init__(self):
        super().__init__()
        self.a, self.v, self.head = nn.Conv2d(3, 8, 1), nn.Linear(8, 8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.a(x))
        B, C, H, W = x.shape
        tokens = self.v(x.flatten(2).transpose(1, 2))  # B, HW, C
        return self.head(tokens.transpose(1, 2).reshape(B, C, H, W))


def test_a_size_read_from_another_tensors_shape_is_computed_at_full_width():
    # only a is selected: v's 8 outputs stay while a keeps 4, so reshape(B, C, H, W) with C read from
    # a's compact output would not fit v's tokens; the compact model reshapes at full width instead
    pruner, small = prune(SizeFromShape(), torch.randn(2, 3, 4, 4), layers=["a"])
    assert small.a.out_channels == 4 and small.v.out_features == 8 and small.head.in_channels == 8


class MatmulAttention(nn.Module):
    def __init__(self, mode: str, dim: int = 16, heads: int = 2):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 1)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, 5)
        self.mode, self.dim, self.heads = mode, dim, heads

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        B, N, _ = t.shape
        q, k, v = self.qkv(t).reshape(B, N, 3, self.heads, self.dim // self.heads).permute(2, 0, 3, 1, 4)
        if self.mode == "sdpa":  # the default scale 1/sqrt(head width)
            out = F.scaled_dot_product_attention(q, k, v)
        elif self.mode == "einsum":
            attn = (torch.einsum("bhnc,bhmc->bhnm", q, k) * 0.25).softmax(-1)
            out = torch.einsum("bhnm,bhmc->bhnc", attn, v)
        else:
            attn = (q @ k.transpose(-2, -1)) * 0.25
            if self.mode == "setitem":  # MViTv2 adds its relative positions in place
                attn[:, :, 1:, 1:] = attn[:, :, 1:, 1:] * 0.5
            out = attn.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(B, N, self.dim))


@pytest.mark.parametrize("mode", ["matmul", "einsum", "sdpa", "setitem"])
def test_attention_by_matmul_pairs_q_with_k_and_keeps_v_channels(mode):
    pruner, small = prune(MatmulAttention(mode), torch.randn(2, 3, 4, 4))
    qkv = group_of(pruner, "qkv")
    # 16 units: a q column joined with the k column it meets in q @ k^T (8), and v's 8 columns
    assert qkv.size == 16
    # without an explicit scale, removing q/k columns would change 1/sqrt(width): those are kept
    assert int(qkv.frozen.sum()) == (8 if mode == "sdpa" else 0)
    assert small.proj.in_features < 16


def _mystery(x):
    return x * torch.sigmoid(x)


torch.fx.wrap("_mystery")


class CustomOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(_mystery(self.a(x)))


def test_unknown_op_names_the_op_and_the_ways_out():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(SoftpruneError) as info:
        softprune.Pruner(CustomOp(), "sfp", 0.5, 1, example_inputs=x)
    message = str(info.value)
    assert "'_mystery'" in message and "register_op" in message and "ignore=" in message
    softprune.register_op(_mystery, softprune.RULES["elementwise"])
    try:
        pruner, small = prune(CustomOp(), x)
        assert small.a.out_channels == 4
    finally:
        from softprune.graph.ops import FUNCTION_RULES

        FUNCTION_RULES.pop(_mystery)


class MyConv(nn.Module):
    """A user's module with its own parameter, used through F.conv2d."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 3, 1, 1))

    def forward(self, x):
        return F.conv2d(x, self.weight)


class WithMyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.mine, self.a, self.b = MyConv(), nn.Conv2d(6, 8, 1), nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.b(F.relu(self.a(F.relu(self.mine(x)))))


def test_custom_module_through_a_handler_or_ignore():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(SoftpruneError, match="conv2d"):
        softprune.Pruner(WithMyConv(), "sfp", 0.5, 1, example_inputs=x)
    pruner, small = prune(WithMyConv(), x, ignore=["mine"])
    assert small.mine.weight.shape == (6, 3, 1, 1) and small.a.out_channels == 4
    softprune.register_handler(MyConv, KeepWhole("is the user's own"))
    try:
        pruner, small = prune(WithMyConv(), x)
        assert small.a.in_channels == 6 and small.a.out_channels == 4
    finally:
        from softprune.graph.handlers import HANDLERS

        HANDLERS.pop(MyConv)


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Conv2d(3, 8, 3), (1, 3, 9, 9)),
        (nn.Conv2d(4, 8, (3, 5), stride=(2, 3), padding=(1, 2), dilation=(2, 1), groups=2), (1, 4, 17, 13)),
        (nn.Conv2d(4, 4, 4, padding="same", dilation=3, groups=4, padding_mode="reflect"), (1, 4, 15, 15)),
        (nn.Conv2d(4, 6, 3, padding="valid"), (4, 7, 7)),  # unbatched
        (nn.Conv1d(2, 5, 7, stride=3, padding=2), (1, 2, 30)),
        (nn.Conv3d(2, 3, (1, 3, 2), stride=(1, 2, 2)), (1, 2, 4, 9, 8)),
        (nn.Linear(6, 3), (1, 5, 6)),
        (nn.BatchNorm2d(4).eval(), (2, 4, 5, 5)),
        (nn.BatchNorm1d(4).eval(), (3, 4, 7)),
    ],
)
def test_analysis_output_shapes_without_arithmetic_match_the_layers(layer, shape):
    from softprune.graph.trace import shape_without_arithmetic

    x = torch.randn(shape)
    shaped = shape_without_arithmetic(layer, (x,), {})
    assert shaped.shape == layer(x).shape and not bool(shaped.any())


def test_analysis_runs_layers_it_cannot_size_for_real():
    from softprune.graph.trace import shape_without_arithmetic

    class Scaled(nn.Conv2d):
        def forward(self, x):
            return super().forward(x)[:, :, ::2]

    x = torch.randn(1, 3, 8, 8)
    assert shape_without_arithmetic(Scaled(3, 4, 3), (x,), {}) is None  # its own forward: run it
    assert shape_without_arithmetic(nn.Conv2d(5, 4, 3), (x,), {}) is None  # wrong width: the layer reports it
    assert shape_without_arithmetic(nn.Conv2d(3, 4, 9), (x,), {}) is None  # larger kernel than input
    assert shape_without_arithmetic(nn.Conv2d(3, 4, 3).double(), (x,), {}) is None  # dtype mismatch
    assert shape_without_arithmetic(nn.BatchNorm2d(3).train(), (x,), {}) is None  # batch statistics: run it
    assert shape_without_arithmetic(nn.BatchNorm2d(5).eval(), (x,), {}) is None  # wrong width


@pytest.mark.parametrize(
    "batch_first, shapes, kw",
    [
        (True, ((2, 5, 8), (2, 7, 6), (2, 7, 4)), {}),
        (False, ((5, 2, 8), (7, 2, 6), (7, 2, 4)), {"average_attn_weights": False}),
        (True, ((5, 8), (7, 6), (7, 4)), {"need_weights": False}),  # unbatched
        (False, ((5, 8), (7, 6), (7, 4)), {"average_attn_weights": False}),
    ],
)
def test_analysis_attention_shapes_without_arithmetic_match_the_layer(batch_first, shapes, kw):
    from softprune.graph.trace import shape_without_arithmetic

    layer = nn.MultiheadAttention(8, 2, kdim=6, vdim=4, batch_first=batch_first).eval()
    q, k, v = (torch.randn(s) for s in shapes)
    shaped = shape_without_arithmetic(layer, (q, k, v), kw)
    real = layer(q, k, v, **kw)
    assert shaped[0].shape == real[0].shape
    assert (shaped[1] is None) == (real[1] is None)
    assert shaped[1] is None or shaped[1].shape == real[1].shape
    mask = torch.zeros(5, 7, dtype=torch.bool)  # target length 5, source length 7
    assert shape_without_arithmetic(layer, (q, k, v), {"attn_mask": mask}) is None  # masks: run it for real
