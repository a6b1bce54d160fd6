"""Architecture checks for softprune's models and the model registry."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from softprune.errors import SoftpruneError
from softprune.models import (
    CifarResNet,
    ShortcutA,
    create_model,
    lenet5,
    list_models,
    resnet20,
    resnet56,
    resnet110,
    vgg16_bn_cifar,
)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def cifar_resnet_params(n: int, num_classes: int = 10) -> int:
    """Parameter count of ResNet-(6n+2) with option-A shortcuts, derived by hand from the architecture.

    stem:    conv 3*16*9 = 432, BN 2*16 = 32
    stage 1: 2n convs 16*16*9 = 2304, 2n BNs of 2*16
    stage 2: one conv 16*32*9 = 4608, 2n-1 convs 32*32*9 = 9216, 2n BNs of 2*32
    stage 3: one conv 32*64*9 = 18432, 2n-1 convs 64*64*9 = 36864, 2n BNs of 2*64
    head:    64*num_classes + num_classes; option-A shortcuts have no parameters.
    """
    stem = 432 + 32
    stage1 = 2 * n * 2304 + 2 * n * 32
    stage2 = 4608 + (2 * n - 1) * 9216 + 2 * n * 64
    stage3 = 18432 + (2 * n - 1) * 36864 + 2 * n * 128
    return stem + stage1 + stage2 + stage3 + 64 * num_classes + num_classes


@pytest.mark.parametrize(
    ("builder", "n", "published"),
    # Published sizes (He et al. 2016, Table 6): 0.27M, 0.85M, 1.7M.
    [(resnet20, 3, 269_722), (resnet56, 9, 853_018), (resnet110, 18, 1_727_962)],
)
def test_resnet_parameter_counts(builder, n, published):
    assert cifar_resnet_params(n) == published
    assert n_params(builder()) == published


def test_vgg_and_lenet_parameter_counts():
    # VGG-16-BN CIFAR: conv weights 3*64*9 + 64*64*9 + 64*128*9 + 128*128*9 + 128*256*9 + 2*256*256*9
    # + 256*512*9 + 5*512*512*9 = 14_710_464; BN 2*(2*64 + 2*128 + 3*256 + 6*512) = 8_448; fc 512*10+10.
    assert n_params(vgg16_bn_cifar()) == 14_710_464 + 8_448 + 5_130
    # LeNet-5: (1*6*25+6) + (6*16*25+16) + (400*120+120) + (120*84+84) + (84*10+10).
    assert n_params(lenet5()) == 156 + 2_416 + 48_120 + 10_164 + 850


def test_resnet_layout_and_names():
    model = resnet20()
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [3, 3, 3]
    block = model.layer2[0]
    assert isinstance(block.shortcut, ShortcutA)
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)
    assert {"conv1", "bn1", "conv2", "bn2"} <= {name for name, _ in block.named_children()}
    assert model.fc.in_features == 64


def test_init_follows_he_et_al():
    model = resnet20()
    conv = model.layer3[1].conv2
    # kaiming_normal_ with fan_out: std = sqrt(2 / (out_channels * 3 * 3)).
    expected_std = (2.0 / (64 * 9)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.05)
    assert torch.equal(model.bn1.weight, torch.ones(16))
    assert torch.equal(model.bn1.bias, torch.zeros(16))


@pytest.mark.parametrize("name", ["resnet20", "resnet32", "vgg16_bn_cifar"])
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32])
def test_cifar_models_output_shapes(name, in_channels, size):
    model = create_model(name, num_classes=7, in_channels=in_channels, input_size=size).eval()
    assert model.example_input_shape == (1, in_channels, size, size)
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 7)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_lenet_output_shape(in_channels):
    model = create_model("lenet5", num_classes=10, in_channels=in_channels).eval()
    assert model.example_input_shape == (1, in_channels, 28, 28)
    assert model(torch.randn(3, in_channels, 28, 28)).shape == (3, 10)


def test_lenet_rejects_other_input_sizes():
    with pytest.raises(SoftpruneError, match="28x28"):
        create_model("lenet5", input_size=32)


@pytest.mark.parametrize("name", ["resnet20", "vgg16_bn_cifar", "lenet5"])
def test_fx_trace_matches_model(name):
    torch.manual_seed(0)
    model = create_model(name, in_channels=1 if name == "lenet5" else 3).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, *model.example_input_shape[1:])
    torch.testing.assert_close(traced(x), model(x))


def test_fx_trace_shows_shortcut_as_pad():
    traced = torch.fx.symbolic_trace(resnet20())
    pads = [n for n in traced.graph.nodes if n.op == "call_function" and n.target is torch.nn.functional.pad]
    # One option-A pad per stage transition (16->32 and 32->64).
    assert len(pads) == 2


def test_shortcut_a_keeps_channels_and_appends_zeros():
    x = torch.randn(2, 16, 8, 8) + 5.0  # shifted away from zero so that a kept channel can't be all-zero
    out = ShortcutA(16, 32, 2)(x)
    assert out.shape == (2, 32, 4, 4)
    for c in range(16):
        torch.testing.assert_close(out[:, c], x[:, c, ::2, ::2], rtol=0, atol=0)
    assert torch.count_nonzero(out[:, 16:]).item() == 0


@pytest.mark.parametrize("depth", [18, 21, 2, 0])
def test_bad_depth_raises(depth):
    with pytest.raises(SoftpruneError, match="6n\\+2"):
        CifarResNet(depth)


def test_unknown_name_lists_choices():
    with pytest.raises(SoftpruneError) as info:
        create_model("resnet21")
    message = str(info.value)
    for name in list_models():
        assert name in message
    assert "torchvision" in message


def test_list_models():
    assert list_models() == sorted(
        ["resnet20", "resnet32", "resnet56", "resnet110", "vgg16_bn_cifar", "lenet5"]
    )


def test_torchvision_model():
    model = create_model("resnet18", num_classes=7).eval()
    assert model.example_input_shape == (1, 3, 224, 224)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    assert create_model("resnet18", input_size=96).example_input_shape == (1, 3, 96, 96)


def test_torchvision_model_rejects_other_channel_counts():
    with pytest.raises(SoftpruneError, match="not supported yet"):
        create_model("resnet18", in_channels=1)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"num_classes": 0}, "num_classes"),
        ({"in_channels": 0}, "in_channels"),
        ({"input_size": -1}, "input_size"),
    ],
)
def test_invalid_sizes_raise(kwargs, pattern):
    with pytest.raises(SoftpruneError, match=pattern):
        create_model("resnet20", **kwargs)
