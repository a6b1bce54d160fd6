"""Soft units: masked in the forward pass, trained straight through, able to come back, never kicked."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import softprune
from softprune.data import BatchLoader, load_dataset
from softprune.errors import SoftpruneError
from softprune.gradient_stop import Layer
from softprune.graph import Role
from softprune.masks import zero_units, zero_units_of


def _resnet(residual, method="sfp", seed=0, **kw):
    torch.manual_seed(seed)
    model = softprune.create_model("resnet20", in_channels=1, input_size=28)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    pruner = softprune.Pruner(model, method, 0.4, 6, optimizer=opt, residual=residual, **kw)
    return model, opt, pruner


def _loader(data_root, n=1024, batch=64):
    train = load_dataset("fashion_mnist", data_root, "train", limit=n)
    return BatchLoader(train, batch, shuffle=True, augment=False, seed=0)


def _train(model, opt, loader, steps):
    done = 0
    while done < steps:
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            done += 1
            if done == steps:
                return


def _zeroed(model, pruner):
    """A copy of the model with every soft unit zeroed whole: the network without them."""
    other = copy.deepcopy(model)
    for group, mask in zip(pruner.prunable, pruner.masks):
        zero_units(group, mask.soft, other)
    return other


def _soft_slices(model, pruner):
    """name -> bool mask of the parameter positions that belong to soft units (not consumer columns)."""
    out = {}
    params = dict(model.named_parameters())
    for group, mask in zip(pruner.prunable, pruner.masks):
        for member in group.members:
            if member.role is Role.CONSUMER or member.qualname not in params:
                continue
            flags = out.setdefault(
                member.qualname, torch.zeros_like(params[member.qualname], dtype=torch.bool)
            )
            ones = torch.ones_like(params[member.qualname])
            zero_units_of(ones, member, mask.soft)
            flags |= ones == 0
    return out


@pytest.mark.parametrize("residual", ["coupled", "independent"])
def test_soft_units_are_masked_in_the_forward_and_trained_straight_through(residual, data_root):
    model, opt, pruner = _resnet(residual)
    loader = _loader(data_root)
    _train(model, opt, loader, 5)
    pruner.step()
    assert pruner.soft_masks is not None and not pruner.soft_masks.fallback
    x, y = next(iter(loader))
    reference = _zeroed(model, pruner)
    model.train(), reference.train()
    out, ref_out = model(x), reference(x)
    assert torch.allclose(out, ref_out, atol=1e-5)  # the soft channels contribute exactly nothing
    opt.zero_grad()
    reference.zero_grad()
    F.cross_entropy(out, y).backward()
    F.cross_entropy(ref_out, y).backward()
    soft = _soft_slices(model, pruner)
    ref_params = dict(reference.named_parameters())
    moving = total = 0
    for name, p in model.named_parameters():
        flags = soft.get(name, torch.zeros_like(p, dtype=torch.bool))
        # kept parameters get the gradient of the network without the soft units, exactly
        assert torch.allclose(p.grad[~flags], ref_params[name].grad[~flags], atol=1e-6, rtol=1e-4), name
    for group, mask in zip(pruner.prunable, pruner.masks):
        for member in group.members_with(Role.FILTER):
            grad = group.unit_matrix(model, _with_grad(member)).norm(dim=1)
            present = torch.zeros(group.size, dtype=torch.bool)
            present[member.unit[member.unit >= 0]] = True  # a stage-1 layer writes 16 of the stream's 64
            moving += int((grad[mask.soft & present] > 0).sum())
            total += int((mask.soft & present).sum())
    assert total > 0 and moving >= 0.9 * total  # the soft filters themselves keep learning


def _with_grad(member):
    """The member's gradient in place of its weights (unit_matrix reads ``param``)."""
    fake = copy.copy(member)
    fake.tensor = lambda model: member.tensor(model).grad  # type: ignore[method-assign]
    return fake


@pytest.mark.slow
@pytest.mark.parametrize("residual", ["coupled", "independent"])
def test_soft_filters_do_not_regrow_out_of_bounds_at_a_high_learning_rate(residual, data_root):
    model, opt, pruner = _resnet(residual)
    loader = _loader(data_root)
    _train(model, opt, loader, 16)
    pruner.step()
    _train(model, opt, loader, 30)  # lr 0.1, momentum 0.9
    worst = 0.0
    for group, mask in zip(pruner.prunable, pruner.masks):
        norms = softprune.criteria.L2().scores(group, model)
        kept = norms[~mask.pruned]
        worst = max(worst, float(norms[mask.soft].max() / kept.median()))
    assert 0.0 < worst <= 3.0  # before forward masks: up to 90x
    report = pruner.step()
    assert report.revived > 0  # the selection moved: some soft units came back ...
    assert report.revived_norm_ratio is not None and report.revived_norm_ratio <= 3.0  # ... at a sane size


def test_a_soft_unit_comes_back_when_its_score_recovers():
    model, opt, pruner = _resnet("coupled")
    pruner.step()
    group, mask = pruner.prunable[1], pruner.masks[1]
    unit = int(torch.nonzero(mask.soft)[0])
    filters = group.members_with(Role.FILTER)
    x = torch.randn(4, 1, 28, 28)
    model.eval()
    before = model(x)
    with torch.no_grad():
        for member in filters:
            w = member.tensor(model)
            w[unit] *= 10.0  # its filter grew while it was soft: now the largest of its layer
    assert torch.allclose(model(x), before)  # still soft: still masked
    report = pruner.step()
    assert not bool(pruner.masks[1].pruned[unit])
    assert report.revived >= 1 and report.revived_norm_ratio > 3.0
    with torch.no_grad():
        for member in filters:
            member.tensor(model)[unit] /= 10.0
    assert not torch.allclose(model(x), before)  # it is read again


def test_srfp_multiplies_soft_channels_by_alpha_t_where_they_are_read():
    torch.manual_seed(0)
    model = softprune.create_model("resnet20")
    pruner = softprune.Pruner(model, method="srfp", rate=0.4, total_steps=10, residual="coupled")
    pruner.step()  # alpha_0 = 1: nothing is masked yet
    assert pruner.soft_masks is None or not pruner.soft_masks.active
    pruner.step()
    alpha = pruner.history[-1].alpha
    assert 0 < alpha < 1
    assert (
        pruner.soft_masks.active
    )  # planned when asked (else at the next forward pass), before the hooks below
    seen = {}
    consumer = model.layer3[1].conv1
    consumer.register_forward_pre_hook(lambda m, a: seen.setdefault("raw", a[0].detach()), prepend=True)
    consumer.register_forward_pre_hook(lambda m, a: seen.setdefault("masked", a[0].detach()))
    model.eval()
    model(torch.randn(2, 3, 32, 32))
    group = pruner.prunable[0]  # the stream group: conv1 and every block's conv2 write it
    assert group.producers[0] == "conv1"
    (member,) = [m for m in group.members_with(Role.CONSUMER) if m.module == "layer3.1.conv1"]
    soft = pruner.masks[0].soft[member.unit]  # per input channel of layer3.1.conv1
    assert bool(soft.any()) and bool((~soft).any())
    assert torch.allclose(seen["masked"][:, soft], alpha * seen["raw"][:, soft])
    assert torch.equal(seen["masked"][:, ~soft], seen["raw"][:, ~soft])


@pytest.mark.parametrize("residual", ["coupled", "independent"])
def test_kept_parameters_get_the_gradient_of_what_the_network_computes_at_any_alpha(residual, monkeypatch):
    """SRFP's soft channels carry alpha_t of their value forward, so the layers before them must get
    alpha_t of their gradient: exactly the gradient of the masked network's output."""
    torch.manual_seed(0)
    model = softprune.create_model("resnet20", in_channels=1, input_size=28)
    pruner = softprune.Pruner(model, "srfp", 0.4, 10, residual=residual)
    pruner.step()
    pruner.step()
    alpha = pruner.history[-1].alpha
    assert 0.1 < alpha < 0.9
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    model.train()
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    # the reference: the same forward, differentiated as it is (no straight-through, no gradient stop)
    masks = pruner.soft_masks
    masks.remove()
    monkeypatch.setattr(softprune.soft, "straight_through", lambda v, m: v * m.to(v.dtype))
    masks.install(gradient_stop=False)
    reference = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    soft = _soft_slices(model, pruner)
    checked = 0
    for name, p, g, ref in zip(names, params, grads, reference):
        kept = ~soft.get(name, torch.zeros_like(p, dtype=torch.bool))
        assert torch.allclose(g[kept], ref[kept], atol=1e-6, rtol=1e-4), name
        checked += int((ref[kept] != 0).sum())
    assert checked > 0.5 * sum(p.numel() for p in params)


def test_the_same_selection_soft_or_hard_computes_the_same_model():
    """SFP's first step and HFP's first step choose the same units; one masks them in the forward,
    the other zeroes them: the networks are the same function."""
    outs = []
    x = torch.randn(4, 1, 28, 28)
    for method in ("sfp", "hfp"):
        model, _, pruner = _resnet("coupled", method=method)
        pruner.step()
        model.eval()
        outs.append(model(x))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


class _FunctionalSum(nn.Module):
    """An "independent" residual add fed by a function call, where no module output can be masked."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x))) + x
        return self.fc(x.mean((2, 3)))


def test_groups_the_forward_masks_cannot_reach_are_masked_through_their_parameters():
    torch.manual_seed(0)
    model = _FunctionalSum()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    pruner = softprune.Pruner(
        model, "sfp", 0.5, 4, optimizer=opt, residual="independent", example_inputs=x[:1]
    )
    pruner.step()
    fallback = pruner.soft_masks.fallback
    assert fallback  # the sums are fed by F.relu
    assert pruner.soft_fallback == [pruner.prunable[g].name for g in sorted(fallback)]
    for g in fallback:
        group, mask = pruner.prunable[g], pruner.masks[g]
        for member in group.members_with(Role.FILTER):
            rows = group.unit_matrix(model, member)
            assert torch.count_nonzero(rows[mask.soft]) == 0  # zeroed, as the papers' code does
            buf = opt.state[member.tensor(model)]["momentum_buffer"]
            zeroed = torch.ones_like(buf)
            zero_units_of(zeroed, member, mask.soft)
            assert torch.count_nonzero(buf[zeroed == 0]) == 0  # and no stale momentum to kick them back


def test_soft_masks_survive_resume():
    model, opt, pruner = _resnet("coupled")
    pruner.step()
    state = pruner.state_dict()
    weights = copy.deepcopy(model.state_dict())
    model2, opt2, pruner2 = _resnet("coupled", seed=1)
    model2.load_state_dict(weights)
    pruner2.load_state_dict(state)
    x = torch.randn(3, 1, 28, 28)
    model.eval(), model2.eval()
    assert torch.equal(model(x), model2(x))
    assert torch.allclose(model2(x), _zeroed(model, pruner).eval()(x), atol=1e-5)


def test_compact_during_training_needs_the_channel_scope():
    model, opt, pruner = _resnet("coupled", method="hfp", mask_scope="filter")
    pruner.step()
    with pytest.raises(SoftpruneError, match="mask_scope='channel'"):
        pruner.compact_hard()


def test_forward_masks_are_planned_at_the_next_forward_pass_so_a_step_then_compact_never_plans(monkeypatch):
    from softprune import soft

    plans = []
    original = soft.SoftMasks.__init__

    def counting(self, *args, **kwargs):
        plans.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(soft.SoftMasks, "__init__", counting)
    torch.manual_seed(0)
    model = softprune.create_model("resnet20")
    pruner = softprune.Pruner(model, "sfp", 0.4, 2)
    pruner.step()
    small = pruner.compact()
    assert plans == [] and pruner.last_verification["max_abs_diff"] < 1e-5
    model = softprune.create_model("resnet20")
    pruner = softprune.Pruner(model, "sfp", 0.4, 2)
    pruner.step()
    x = torch.randn(2, 3, 32, 32)
    model.eval()(x)
    model(x)
    assert plans == [1] and pruner.soft_masks.active  # planned once, at the first forward pass
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def _split_reference(module, x, scale):
    """The layer's output written so that autograd itself gives the parameters every row's gradient
    and the input only ``scale`` of each row's share: layer(x, W * s) + layer(x.detach(), W * (1 - s))."""
    view = [-1] + [1] * (module.weight.dim() - 1)
    s = scale.view(view)
    if isinstance(module, nn.Linear):
        return F.linear(x, module.weight * s, module.bias) + F.linear(x.detach(), module.weight * (1 - s))
    conv = module._conv_forward
    return conv(x, module.weight * s, module.bias) + conv(x.detach(), module.weight * (1 - s), None)


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Conv2d(6, 8, 3, padding=1, bias=False), (4, 6, 9, 9)),
        (nn.Conv2d(6, 8, 3, dilation=2, padding="same", groups=2), (4, 6, 9, 9)),
        (nn.Conv2d(6, 8, 3, stride=2, padding=1), (4, 6, 9, 9)),
        (nn.Conv2d(6, 8, 4, padding="valid"), (6, 9, 9)),  # an unbatched input
        (nn.Conv1d(6, 8, 5, padding=2), (4, 6, 17)),
        (nn.Conv3d(6, 8, 3, padding=1), (2, 6, 5, 5, 5)),
        (nn.Linear(6, 8), (4, 5, 6)),  # a sequence: rows on the last dimension
    ],
)
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_a_producer_passes_its_soft_rows_only_alpha_of_their_gradient_into_its_input(layer, shape, alpha):
    """Every weight and bias gets all of the output's gradient; the input gets the kept rows' share
    and alpha of the soft rows' (the gradient stop of a producer), followed by an in-place ReLU."""
    torch.manual_seed(0)
    rows = torch.tensor([1, 4, 5])
    scale = torch.ones(8)
    scale[rows] = alpha
    x = torch.randn(shape, requires_grad=True)
    target = torch.randn_like(_split_reference(layer, x, scale))
    handle = layer.register_forward_hook(
        softprune.soft.SoftMasks._producer_hook(layer, Layer.of(layer), rows, alpha)
    )
    out = F.relu(layer(x), inplace=True)
    got = torch.autograd.grad((out * target).sum(), [x, *layer.parameters()])
    handle.remove()
    expected_out = F.relu(_split_reference(layer, x, scale))
    expected = torch.autograd.grad((expected_out * target).sum(), [x, *layer.parameters()])
    assert torch.allclose(out, expected_out, atol=1e-5)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and torch.allclose(g, e, atol=1e-5, rtol=1e-4)
    assert float(got[0].abs().sum()) > 0


def test_the_producer_gradient_follows_autocast():
    """Under bf16 autocast the layer runs in bf16: the gradient stop differentiates the same
    computation, and returns each gradient in its tensor's dtype."""
    torch.manual_seed(0)
    layer, rows = nn.Conv2d(4, 6, 3, padding=1), torch.tensor([0, 3])
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    scale = torch.ones(6)
    scale[rows] = 0.0
    handle = layer.register_forward_hook(
        softprune.soft.SoftMasks._producer_hook(layer, Layer.of(layer), rows, 0.0)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.autograd.grad(layer(x).float().square().sum(), [x, layer.weight, layer.bias])
    handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.autograd.grad(
            _split_reference(layer, x, scale).float().square().sum(), [x, layer.weight, layer.bias]
        )
    assert [g.dtype for g in got] == [torch.float32] * 3
    for g, e in zip(got, ref):
        assert torch.allclose(g, e, atol=0.05 * float(e.abs().max()))


def test_a_reflect_padded_producer_is_masked_through_its_parameters():
    """Reflect padding happens before the convolution, where the gradient stop cannot reach: such a
    group falls back to zeroed parameters rather than a wrong gradient."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))  # fmt: skip
    pruner = softprune.Pruner(model, "sfp", 0.5, 4, example_inputs=torch.randn(1, 3, 8, 8))
    pruner.step()
    model(torch.randn(2, 3, 8, 8))  # plans the masks
    assert pruner.soft_fallback == [pruner.prunable[0].name]
    assert torch.count_nonzero(model[0].weight[pruner.masks[0].soft]) == 0
