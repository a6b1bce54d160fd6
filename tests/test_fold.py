"""Masked and compact are the same function in both mask scopes; BatchNorm constants folded exactly."""

import pytest
import torch

import softprune
from softprune.errors import SoftpruneError
from softprune.graph import Role


def _pruned(name, scope, residual, method="sfp"):
    torch.manual_seed(0)
    model = softprune.create_model(name)
    pruner = softprune.Pruner(model, method, 0.4, 3, mask_scope=scope, residual=residual)
    with torch.no_grad():  # BatchNorms as training leaves them: shifts and statistics far from 0 and 1
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.bias.uniform_(-0.5, 1.0)
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 2.0)
    pruner.step()
    pruner.step()
    return model, pruner


@pytest.mark.parametrize("name", ["resnet20", "resnet32", "vgg16_bn_cifar"])
@pytest.mark.parametrize("scope", ["channel", "filter"])
def test_masked_and_compact_models_are_the_same_function(name, scope):
    model, pruner = _pruned(name, scope, "coupled")
    x = torch.randn(6, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        masked = model(x)
        small = pruner.compact().eval()
        out = small(x)
    # on inputs the compaction check never saw
    assert float((out - masked).abs().max()) <= 1e-5 * float(masked.abs().max())
    dense_width = sum(m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    small_width = sum(m.out_channels for m in small.modules() if isinstance(m, torch.nn.Conv2d))
    carriers = len(pruner.last_verification.get("carriers", {}))
    assert small_width <= 0.65 * dense_width  # 40% of every layer removed, but for the carriers
    if scope == "channel":
        assert carriers == 0
    else:
        assert carriers >= 1  # conv layers read the constants: one pruned channel per group carries them


def test_filter_scope_leaves_the_batchnorm_constant_that_compaction_folds():
    model, pruner = _pruned("resnet20", "filter", "coupled", method="hfp")
    group, mask = pruner.prunable[1], pruner.masks[1]  # layer1.0.conv1 -> bn1
    assert group.producers == ["layer1.0.conv1"]
    rows = group.unit_matrix(model, group.members_with(Role.FILTER)[0])
    assert torch.count_nonzero(rows[mask.hard]) == 0  # the filters are zero, as in the papers' code
    shift = [m for m in group.members if m.role is Role.ADDITIVE][0]
    assert torch.count_nonzero(group.unit_matrix(model, shift)[mask.hard]) == int(mask.hard.sum())
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        before = model(x)
    small = pruner.compact().eval()
    with torch.no_grad():
        assert torch.allclose(small(x), before, atol=1e-5)  # the constants were folded, not dropped
    assert pruner.last_verification["max_abs_diff"] <= 1e-5 * pruner.last_verification["output_scale"]


def test_filter_scope_refuses_constants_summed_into_independent_residuals():
    model, pruner = _pruned("resnet20", "filter", "independent")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SoftpruneError, match="residual add of independent branches"):
        pruner.compact()
    after = model.state_dict()
    # the model the user keeps is the masked model it was (finalize only made soft filters hard)
    for key, value in state.items():
        if "bn" in key or "fc" in key:
            assert torch.equal(after[key], value), key
