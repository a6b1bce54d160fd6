"""A representative set of torchvision models: prune at 50%, compact, and the outputs agree.

The full 80 models run in `make zoo` (benchmarks/zoo.py -> docs/zoo.md), outside CI's time.
"""

import pytest
import torch
import torchvision

import softprune
from softprune.check import max_difference

pytestmark = pytest.mark.slow  # trains, or runs scripts and subprocesses: make test-fast leaves it out

# (name, input size, what it exercises)
MODELS = [
    ("alexnet", 64, "flatten before Linear, classifier dropout"),
    ("resnet18", 32, "residual adds, downsample shortcuts"),
    ("resnext50_32x4d", 32, "grouped convolutions"),
    ("wide_resnet50_2", 32, "bottlenecks"),
    ("mobilenet_v2", 32, "depthwise, inverted residuals"),
    ("mobilenet_v3_small", 32, "SE gates with hardsigmoid, hardswish"),
    ("efficientnet_b0", 32, "SE gates, stochastic depth"),
    ("mnasnet0_5", 32, "depthwise without SE"),
    ("shufflenet_v2_x0_5", 32, "chunk, channel shuffle"),
    ("squeezenet1_0", 64, "fire concatenation, a conv classifier"),
    ("densenet121", 32, "dense concatenation"),
    ("googlenet", 64, "inception concatenation"),
    ("regnet_x_400mf", 32, "grouped bottlenecks"),
    ("regnet_y_400mf", 32, "grouped bottlenecks with SE"),
    ("convnext_tiny", 32, "LayerNorm2d, channels-last MLP, layer scale"),
    ("vgg11_bn", 32, "plain conv stack"),
]


@pytest.mark.parametrize("name,size,what", MODELS, ids=[m[0] for m in MODELS])
def test_torchvision_model_prunes_and_compacts_exactly(name, size, what):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=7).eval()
    with torch.no_grad():  # torchvision zero-initializes some layers; zero outputs would prove nothing
        for p in model.parameters():
            if p.dim() > 0 and not p.any():
                p.normal_(0, 0.02)
    x = torch.randn(2, 3, size, size)
    pruner = softprune.Pruner(model, "sfp", 0.5, 1, example_inputs=x, layers="all")
    pruner.step()
    small = pruner.compact()
    diff, scale = max_difference(model, small, (torch.randn_like(x),))
    assert scale > 0 and diff <= 1e-5 * scale, (diff, scale)
    assert small(x).shape == (2, 7)  # the classifier keeps every class
    dense, compact = softprune.profile(model, x[:1]), softprune.profile(small, x[:1])
    assert compact["params"] < 0.8 * dense["params"] and compact["macs"] < 0.8 * dense["macs"]


@pytest.mark.parametrize("name", ["vit_b_32", "swin_t"])
def test_transformers_prune_heads_and_mlps(name):
    torch.manual_seed(0)
    kw = {"image_size": 64} if name.startswith("vit") else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=7, **kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 0 and not p.any():
                p.normal_(0, 0.02)
    x = torch.randn(2, 3, 64, 64)
    pruner = softprune.Pruner(model, "sfp", 0.5, 1, example_inputs=x, layers="all")
    pruner.step()
    small = pruner.compact()
    diff, scale = max_difference(model, small, (torch.randn_like(x),))
    assert scale > 0 and diff <= 1e-5 * scale
    assert softprune.profile(small, x[:1])["params"] < 0.8 * softprune.profile(model, x[:1])["params"]


# timm's trickiest layer kinds, one small model each (the full zoo: make zoo-timm -> docs/zoo_timm.md)
TIMM_MODELS = [
    ("resnet10t", "deep stem, BatchNormAct2d"),
    ("mixnet_s", "mixed convolutions: channel splits by sizes"),
    ("cspresnet50", "cross-stage partial: split and partial concat"),
    ("dpn48b", "dual path: residual and dense paths sliced from one tensor"),
    ("repvgg_a0", "re-parameterizable branches"),
    ("ghostnet_050", "Ghost modules, timm's Linear"),
    ("skresnet18", "selective kernel attention"),
    ("resnest14d", "split attention"),
    ("regnetx_002", "grouped bottlenecks with norm+act layers"),
    ("convnext_atto", "LayerNorm2d, layer scale"),
    ("efficientnet_b0", "SE, BatchNormAct2d"),
    ("rexnet_100", "a residual added to the first channels only"),
    ("tf_efficientnetv2_b0", "'same' padding computed in Python (fx cannot trace it)"),
    ("nf_regnet_b0", "weight-standardized convolutions, no BatchNorm"),
    ("resnetblur18", "anti-aliased downsampling (a fixed depthwise filter)"),
    ("mobilevit_xxs", "control flow on feature-map sizes (plain torch.fx cannot trace it), attention"),
    ("botnet26t_256", "attention by matmul with the heads folded into the batch dimension"),
    ("edgenext_xx_small", "F.normalize of q and k, then their matmul"),
    ("convnextv2_atto", "GRN: a mean over channels, rescaled in the compact model"),
]
SETTINGS = {"botnet26t_256": {"img_size": 96}}  # its position embedding is built for one input size


@pytest.mark.parametrize("name,what", TIMM_MODELS, ids=[m[0] for m in TIMM_MODELS])
def test_timm_model_prunes_and_compacts_exactly(name, what):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=7, **SETTINGS.get(name, {})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 0 and not p.any():
                p.normal_(0, 0.02)
    x = torch.randn(1, 3, 96, 96)
    pruner = softprune.Pruner(model, "sfp", 0.4, 1, example_inputs=x)
    pruner.step()
    small = pruner.compact()
    diff, scale = max_difference(model, small, (torch.randn_like(x),))
    assert diff <= 1e-5 * scale, what
    assert sum(p.numel() for p in small.parameters()) < 0.9 * sum(p.numel() for p in model.parameters())


def _fpn_backbone():
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    return resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)


def _timm_features():
    timm = pytest.importorskip("timm")
    return timm.create_model("efficientnet_b0", pretrained=False, features_only=True)


@pytest.mark.parametrize("make", [_fpn_backbone, _timm_features], ids=["torchvision-fpn", "timm-features"])
def test_multi_output_backbone_keeps_what_the_neck_receives(make):
    """A detection backbone (torchvision's ResNet+FPN with FrozenBatchNorm2d) or timm's features_only
    model: its outputs are the model's, so they keep their widths; the body's channels that the FPN's
    lateral convolutions read are pruned with those convolutions."""
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(1, 3, 64, 64)
    pruner = softprune.Pruner(model, "sfp", 0.4, 1, example_inputs=x)
    pruner.step()
    small = pruner.compact()
    diff, scale = max_difference(model, small, (torch.randn_like(x),))
    assert diff <= 1e-5 * scale
    outputs = model(x)
    outputs = list(outputs.values()) if isinstance(outputs, dict) else list(outputs)
    compact = small(x)
    compact = list(compact.values()) if isinstance(compact, dict) else list(compact)
    assert [o.shape for o in compact] == [o.shape for o in outputs]
    assert sum(p.numel() for p in small.parameters()) < 0.7 * sum(p.numel() for p in model.parameters())
