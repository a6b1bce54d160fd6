"""Compaction: the compact model computes what the masked model computes, and is really smaller."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import softprune
from softprune.check import max_difference
from softprune.compact import ChannelRemap
from softprune.cost import measure_macs, paper_flops_cifar_resnet

MODELS = [
    pytest.param(name, channels, id=name, marks=[pytest.mark.slow] if name == "resnet110" else [])
    for name, channels in [
        ("resnet20", 3),
        ("resnet32", 3),
        ("resnet56", 3),
        ("resnet110", 3),  # the deepest, 6.5 s of make test-fast: make test only
        ("vgg16_bn_cifar", 3),
        ("lenet5", 1),
    ]
]


def _pruned(name, channels, residual, method="ghfp", rate=0.4, steps=3):
    torch.manual_seed(0)
    model = softprune.create_model(name, in_channels=channels)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    pruner = softprune.Pruner(
        model, method=method, rate=rate, total_steps=steps, optimizer=opt, residual=residual
    )
    shape = model.example_input_shape[1:]
    for _ in range(steps):
        x, y = torch.randn(8, *shape), torch.randint(0, 10, (8,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        pruner.step()
    return model, pruner


@pytest.mark.parametrize("residual", ["independent", "coupled"])
@pytest.mark.parametrize("name,channels", MODELS)
def test_compact_equals_masked_on_random_inputs(name, channels, residual):
    model, pruner = _pruned(name, channels, residual)
    small = pruner.compact()
    x = torch.randn(6, *model.example_input_shape[1:]) * 2
    diff, scale = max_difference(model, small, (x,))
    assert scale > 0
    assert diff <= 1e-5 * scale, (diff, scale)
    dense_params = sum(p.numel() for p in model.parameters())
    small_params = sum(p.numel() for p in small.parameters())
    assert small_params < 0.75 * dense_params
    # every pruned filter is physically gone: producers have exactly their kept filters
    for group, mask in zip(pruner.prunable, pruner.masks):
        kept = int((~mask.hard).sum())
        for producer in group.producers:
            if residual == "independent" or len(group.producers) == 1:
                assert small.get_submodule(producer).out_channels == kept, producer


def test_compact_of_a_model_without_graph_changes_is_the_users_class():
    model, pruner = _pruned("vgg16_bn_cifar", 3, "independent")
    small = pruner.compact()
    assert type(small) is type(model) and isinstance(small.features, nn.Sequential)
    assert small.features[0].out_channels == 64 - math.floor(64 * 0.4)
    assert small.classifier.in_features == 512 - math.floor(512 * 0.4)
    assert model.features[0].out_channels == 64  # the masked model is left as it was


def test_lenet_flatten_removes_hw_columns_per_channel():
    model, pruner = _pruned("lenet5", 1, "independent", method="sfp", steps=1)
    small = pruner.compact()
    kept = 16 - math.floor(16 * 0.4)
    assert small.fc1.in_features == kept * 5 * 5  # each channel spans the 5x5 features of the flatten


def test_residual_graph_keeps_the_users_containers():
    model, pruner = _pruned("resnet20", 3, "independent", steps=1)
    small = pruner.compact()
    assert isinstance(small, torch.fx.GraphModule)  # the adds place kept channels at their indices
    assert isinstance(small.layer1, nn.Sequential) and small.layer1[0].conv1 is small.get_submodule(
        "layer1.0.conv1"
    )
    remaps = [m for n, m in small.named_modules() if n.startswith("_softprune_remap")]
    assert remaps and all(isinstance(m, ChannelRemap) for m in remaps)
    assert "_softprune_remap" in small.code


@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_remap_is_exact_in_both_memory_formats(channels_last):
    torch.manual_seed(0)
    src, dst = torch.tensor([0, 2, 3]), torch.tensor([1, 4, 6])
    remap = ChannelRemap(1, src, dst, in_size=5, out_size=8)
    x, base = torch.randn(2, 5, 4, 3), torch.randn(2, 8, 4, 3)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, base = x.contiguous(memory_format=fmt), base.contiguous(memory_format=fmt)
    expected = torch.zeros(2, 8, 4, 3)
    expected[:, dst] = x[:, src]
    assert torch.equal(remap(x), expected)
    assert torch.allclose(remap(x, base), base + expected, atol=0, rtol=0)
    assert remap(x).is_contiguous(memory_format=fmt)


def test_compact_model_in_channels_last_equals_masked():
    model, pruner = _pruned("resnet20", 3, "independent", steps=1)
    small = pruner.compact()
    x = torch.randn(4, 3, 32, 32)
    ref_diff, scale = max_difference(model, small, (x,))
    small_cl = small.to(memory_format=torch.channels_last)
    diff, _ = max_difference(model, small_cl, (x.contiguous(memory_format=torch.channels_last),))
    assert diff <= 1e-5 * scale and ref_diff <= 1e-5 * scale


def test_compact_resnet_realizes_the_papers_flops():
    """SFP's independent branches: the compact model's conv MACs are at most the papers' count and
    within 3% of it, at a rate where every layer's floor(N*P) is exact (the papers' k = 1 - P)."""
    for depth in (20, 56):
        model, pruner = _pruned(f"resnet{depth}", 3, "independent", method="sfp", rate=0.25, steps=1)
        small = pruner.compact()
        x = torch.randn(1, 3, 32, 32)
        measured = measure_macs(small, x)["conv_macs"]
        paper = paper_flops_cifar_resnet(depth, 0.25)
        assert measured <= paper + 1
        assert measured >= 0.97 * paper
        assert measure_macs(model, x)["conv_macs"] == paper_flops_cifar_resnet(depth, 0.0)


def test_compact_trains_and_is_smaller_to_run():
    model, pruner = _pruned("resnet20", 3, "coupled", steps=1)
    small = pruner.compact()
    opt = torch.optim.SGD(small.parameters(), lr=0.05)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    small.train()
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.cross_entropy(small(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert measure_macs(small, x[:1])["macs"] < 0.55 * measure_macs(model, x[:1])["macs"]


def test_shared_module_called_twice_is_pruned_consistently():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.block = nn.Conv2d(8, 8, 3, padding=1)  # used twice: its filters must match in both calls
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            x = F.relu(self.stem(x))
            x = F.relu(self.block(x))
            x = F.relu(self.block(x))
            return self.head(x.mean((2, 3)))

    torch.manual_seed(0)
    model = Shared()
    pruner = softprune.Pruner(model, "sfp", 0.5, 1, example_inputs=torch.randn(2, 3, 8, 8))
    pruner.step()
    small = pruner.compact()
    # the shared conv feeds itself, so its input and output channels are one group
    assert small.block.in_channels == small.block.out_channels == small.stem.out_channels == 4
    x = torch.randn(3, 3, 8, 8)
    diff, scale = max_difference(model, small, (x,))
    assert diff <= 1e-5 * scale


def test_compact_modules_share_nothing_with_the_masked_model():
    model, pruner = _pruned("resnet20", 3, "coupled", steps=1)
    small = pruner.compact()
    fired = []
    small.layer1[0].conv1.register_forward_hook(lambda *a: fired.append("compact"))
    model(torch.randn(1, 3, 32, 32))
    assert fired == []  # a hook on the compact layer is not a hook on the masked one
    dense_tensors = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    small_tensors = {t.data_ptr() for t in list(small.parameters()) + list(small.buffers()) if t.numel()}
    assert not dense_tensors & small_tensors


def test_copy_module_is_a_deep_copy_that_shares_nothing():
    from softprune.graph.handlers import copy_module

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    model.features[0][0].register_forward_hook(lambda *a: None)
    model.note = {"kept": [1, 2]}
    kept_alone = model.classifier[1]
    copied = copy_module(model, {id(kept_alone): kept_alone})
    assert type(copied.features) is type(model.features)  # containers keep their classes
    assert copied.classifier[1] is kept_alone  # the memo is honoured, as in copy.deepcopy
    assert copied.note == model.note and copied.note is not model.note
    assert len(copied.features[0][0]._forward_hooks) == 1
    assert copied.features[0][0]._forward_hooks is not model.features[0][0]._forward_hooks
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(copied(x), model(x))
    ours = {t.data_ptr() for n, t in model.state_dict().items() if not n.startswith("classifier.1")}
    theirs = {t.data_ptr() for n, t in copied.state_dict().items() if not n.startswith("classifier.1")}
    assert not ours & theirs


def test_resized_replaces_tensors_and_copies_the_rest():
    from softprune.graph.handlers import resized

    bn = nn.BatchNorm2d(4)
    bn.running_mean.add_(1.0)
    small = resized(bn, {"weight": torch.ones(2), "running_mean": torch.zeros(2)}, num_features=2)
    assert small.num_features == 2 and small.weight.shape == (2,) and isinstance(small.weight, nn.Parameter)
    assert torch.equal(small.running_mean, torch.zeros(2))
    assert torch.equal(small.bias, bn.bias) and small.bias.data_ptr() != bn.bias.data_ptr()
    assert torch.equal(bn.running_mean, torch.ones(4))  # the original is untouched


def test_apply_layout_keeps_broadcast_dimensions_broadcast():
    from softprune.compact import apply_layout

    ids = torch.arange(6).view(1, 6, 1, 1).expand(1, 6, 5, 7)
    small = apply_layout(ids, (None, torch.tensor([0, 2, 5]), None, None))
    assert small.shape == (1, 3, 5, 7) and small.stride(2) == small.stride(3) == 0
    assert torch.equal(small, ids.contiguous().index_select(1, torch.tensor([0, 2, 5])))


def test_a_compact_model_that_cannot_run_is_an_error_naming_the_module():
    reference = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    broken = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(6, 4, 1))
    with pytest.raises(
        softprune.SoftpruneError, match=r"fails in '1' \(BatchNorm2d\): running_mean should contain 6"
    ):
        max_difference(reference, broken, (torch.randn(1, 3, 8, 8),))


class _BatchNormCallingF(nn.BatchNorm2d):
    """As timm's norm+act layers: a BatchNorm subclass whose forward calls F.batch_norm itself."""

    def forward(self, x):
        stats = (self.running_mean, self.running_var, self.weight, self.bias)
        return torch.relu(F.batch_norm(x, *stats, self.training, 0.1, self.eps))


class _GroupNormCallingF(nn.GroupNorm):
    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def test_functional_norms_with_their_own_parameters_compact_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), _BatchNormCallingF(8), nn.Conv2d(8, 8, 3), _GroupNormCallingF(4, 8), nn.ReLU(),
        nn.Conv2d(8, 4, 1), nn.Flatten(1), nn.Linear(144, 3),
    )  # fmt: skip
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2)
    pruner = softprune.Pruner(model, "hfp", 0.5, 1, example_inputs=torch.randn(2, 3, 10, 10))
    frozen = {g.name: g.prunable for g in pruner.groups}
    # F.batch_norm's tensors follow the channels; F.group_norm's fixed number of groups keeps them whole
    assert frozen["0"] and not frozen["2"]
    pruner.step()
    small = pruner.compact()
    assert small.get_submodule("1").running_mean.numel() == 4 and small.get_submodule("2").out_channels == 8
    assert pruner.last_verification["max_abs_diff"] < 1e-6


class _PaddedStem(nn.Module):
    """HGNetV2's stem: a feature map zero-padded on one side, pooled and convolved."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, stride=2), nn.Conv2d(8, 8, 2)
        self.pool = nn.MaxPool2d(2, stride=1, ceil_mode=True)
        self.conv3 = nn.Conv2d(16, 4, 3)

    def forward(self, x):
        x = F.pad(torch.relu(self.conv1(x)) - 0.1, (0, 1, 0, 1))
        return self.conv3(torch.cat([self.pool(x), self.conv2(x)], 1))


def test_the_border_f_pad_adds_is_never_removed():
    torch.manual_seed(0)
    model = _PaddedStem()
    x = torch.randn(1, 3, 21, 21)
    for rate in (0.0, 0.5):  # nothing pruned: the compact model is the model
        pruner = softprune.Pruner(model, "hfp", rate, 1, example_inputs=x)
        pruner.step()
        small = pruner.compact()
        assert small(x).shape == model(x).shape == (1, 4, 8, 8)
        assert pruner.last_verification["max_abs_diff"] < 1e-6


class _BlurByFunction(nn.Module):
    """A fixed depthwise filter held by the model and applied with F.conv2d (anti-aliasing)."""

    def __init__(self, channels):
        super().__init__()
        self.register_buffer("filt", torch.rand(channels, 1, 3, 3))

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.filt, stride=2, groups=x.shape[1])


class _MixByFunction(_BlurByFunction):
    def forward(self, x):
        return F.conv2d(x, self.filt.expand(8, 8, 3, 3), padding=1)


def test_functional_depthwise_filters_follow_their_channels_and_other_functional_convs_are_refused():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), _BlurByFunction(8), nn.Conv2d(8, 4, 3))
    pruner = softprune.Pruner(model, "hfp", 0.5, 1, example_inputs=x)
    pruner.step()
    small = pruner.compact()
    assert small.get_submodule("2").filt.shape == (4, 1, 3, 3)
    assert pruner.last_verification["max_abs_diff"] < 1e-6
    mixing = nn.Sequential(nn.Conv2d(3, 8, 3), _MixByFunction(8), nn.Conv2d(8, 4, 3))
    with pytest.raises(softprune.SoftpruneError, match="convolution called as a function"):
        softprune.Pruner(mixing, "hfp", 0.5, 1, example_inputs=x)


class _PositionalEncoding(nn.Module):
    """EdgeNeXt-style: a sine encoding computed from a constant mask (~, cumsum, sin), added to the
    features: it is a constant per position, so the channels it is added to stay prunable."""

    def forward(self, x):
        mask = torch.zeros_like(x[:, 0], dtype=torch.bool)
        y = (~mask).cumsum(1, dtype=torch.float32)
        return x + y.sin().unsqueeze(1) * 0.1


def test_a_positional_encoding_from_a_mask_is_a_constant():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), _PositionalEncoding(), nn.Conv2d(8, 4, 3)
    )
    pruner = softprune.Pruner(model, "hfp", 0.5, 1, example_inputs=torch.randn(1, 3, 12, 12))
    assert [g.prunable for g in pruner.groups][:2] == [True, True]
    pruner.step()
    small = pruner.compact()
    assert small.get_submodule("2").out_channels == 4 and pruner.last_verification["max_abs_diff"] < 1e-6
