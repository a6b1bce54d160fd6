"""The Pruner: the presets' identities, hard filters under optimizers, resume, selection, errors."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import softprune
from softprune.errors import SoftpruneError
from softprune.graph import Role


def _batches(n=3, batch=8, channels=3, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, channels, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g))
        for _ in range(n)
    ]


def _epochs(model, opt, pruner, data, n):
    """n epochs over ``data``, a pruning step after each."""
    for _ in range(n):
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        pruner.step()


def _train_with(method, steps=4, model_name="resnet20", opt_name="sgd", data=None, **kw):
    """Train a fresh seeded model for ``steps`` pruning steps; return per-step snapshots."""
    torch.manual_seed(0)
    model = softprune.create_model(model_name)
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    pruner = softprune.Pruner(model, method=method, rate=0.4, total_steps=steps, optimizer=opt, **kw)
    data = data or _batches()
    snaps = []
    for _ in range(steps):
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        report = pruner.step()
        snaps.append(
            {
                "report": report,
                "hard": [m.hard.clone() for m in pruner.masks],
                "soft": [m.soft.clone() for m in pruner.masks],
                "weights": {k: v.clone() for k, v in model.state_dict().items()},
            }
        )
    return model, pruner, opt, snaps


def _assert_same(a, b):
    assert len(a) == len(b)
    for sa, sb in zip(a, b):
        assert all(torch.equal(x, y) for x, y in zip(sa["hard"], sb["hard"]))
        assert all(torch.equal(x, y) for x, y in zip(sa["soft"], sb["soft"]))
        for k in sa["weights"]:
            assert torch.equal(sa["weights"][k], sb["weights"][k]), k


@pytest.mark.parametrize(
    "ghfp_knobs,sfp_knobs",
    [
        # the preset (authors' code): SFP with GHFP's rate ramp and criterion
        ({}, {"rate_schedule": "poly", "criterion": "l2_bn"}),
        # the paper's GHFP: plain SFP
        ({"rate_schedule": "constant", "criterion": "l2"}, {}),
    ],
    ids=["code", "paper"],
)
def test_ghfp_with_zero_hardness_is_sfp_step_by_step(ghfp_knobs, sfp_knobs):
    _, ghfp_pruner, _, ghfp = _train_with("ghfp", hardness=0.0, **ghfp_knobs)
    _, _, _, sfp = _train_with("sfp", **sfp_knobs)
    _assert_same(ghfp, sfp)
    assert all(s["report"].hard == 0 for s in sfp) and sum(s["report"].soft for s in sfp) > 0
    assert ghfp_pruner.criterion.name == sfp_knobs.get("criterion", "l2")


def test_srfp_with_alpha0_zero_is_sfp():
    _, _, _, srfp = _train_with("srfp", decay={"kind": "exponential", "alpha0": 0.0})
    _, _, _, sfp = _train_with("sfp")
    _assert_same(srfp, sfp)


def test_hfp_keeps_the_set_it_chose_first():
    _, pruner, _, snaps = _train_with("hfp", steps=5)
    first = snaps[0]["hard"]
    assert sum(int(h.sum()) for h in first) > 0
    for snap in snaps[1:]:
        assert all(torch.equal(a, b) for a, b in zip(snap["hard"], first))
        assert all(not bool(s.any()) for s in snap["soft"])


def test_ghfp_counts_follow_floor_n_p_lambda_and_hard_never_comes_back():
    model, pruner, _, snaps = _train_with("ghfp", steps=6)
    T = 6
    for t, snap in enumerate(snaps):
        lam = 1 - (1 - (t + 1) / T) ** 3
        rate = 0.4 if t >= 0.95 * T else 0.4 * lam  # the authors' code ramps the rate as it hardens
        hard = sum(math.floor(g.size * rate * lam + 1e-9) for g in pruner.prunable)
        selected = sum(math.floor(g.size * rate + 1e-9) for g in pruner.prunable)
        assert snap["report"].hard == hard
        assert snap["report"].hard + snap["report"].soft == selected
        if t:
            assert all(
                bool((prev & ~now).sum() == 0) for prev, now in zip(snaps[t - 1]["hard"], snap["hard"])
            )
    assert snaps[-1]["report"].soft == 0


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
        lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
        lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5),
    ],
    ids=["sgd-momentum-wd", "sgd-nesterov", "adam", "adamw", "rmsprop"],
)
def test_hard_filters_stay_exactly_zero_and_soft_ones_move(make_opt):
    torch.manual_seed(0)
    model = softprune.create_model("resnet20")
    opt = make_opt(model.parameters())
    pruner = softprune.Pruner(model, method="ghfp", rate=0.5, total_steps=2, optimizer=opt)
    data = _batches(n=2)
    for x, y in data:  # build optimizer state (momentum, moments) before pruning
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    pruner.step()  # lambda_0 = 1 - (1/2)^3: both hard and soft units
    assert pruner.counts()[1] > 0 and pruner.counts()[2] > 0
    soft_before = {}
    for group, mask in zip(pruner.prunable, pruner.masks):
        for member in group.members_with(Role.FILTER):
            soft_before[member.qualname] = (member, group, mask.soft.clone())
    for _ in range(15):
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    checked_hard = moved_soft = 0
    for group, mask in zip(pruner.prunable, pruner.masks):
        for member in group.members:
            if member.role is Role.CONSUMER:
                continue
            t = member.tensor(model).detach()
            rows = group.unit_matrix(model, member)
            assert torch.count_nonzero(rows[mask.hard]) == 0, member.qualname
            checked_hard += int(mask.hard.sum())
            state = opt.state.get(member.tensor(model), {})
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == t.shape:
                    moved = value.movedim(member.dim, 0)[
                        torch.cat([mask.hard, mask.hard.new_zeros(1)])[member.unit]
                    ]
                    assert torch.count_nonzero(moved) == 0
        filters = sum(group.unit_matrix(model, m).abs().sum(1) for m in group.members_with(Role.FILTER))
        moved_soft += int((filters[mask.soft] > 0).sum())
    assert checked_hard > 0
    assert moved_soft == sum(
        int(m.soft.sum()) for m in pruner.masks
    )  # every soft filter recovered some weight


def test_state_dict_resumes_exactly():
    data = _batches(n=2)
    full_model, full_pruner, _, full = _train_with("ghfp", steps=4, data=data)

    torch.manual_seed(0)
    model = softprune.create_model("resnet20")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    pruner = softprune.Pruner(model, method="ghfp", rate=0.4, total_steps=4, optimizer=opt)
    _epochs(model, opt, pruner, data, 2)
    saved = copy.deepcopy(
        {"model": model.state_dict(), "opt": opt.state_dict(), "pruner": pruner.state_dict()}
    )

    model2 = softprune.create_model("resnet20")
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    pruner2 = softprune.Pruner(model2, method="ghfp", rate=0.4, total_steps=4, optimizer=opt2)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    pruner2.load_state_dict(saved["pruner"])
    assert pruner2.t == 2
    _epochs(model2, opt2, pruner2, data, 2)
    for k, v in full_model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k
    assert all(
        torch.equal(a.hard, b.hard) and torch.equal(a.soft, b.soft)
        for a, b in zip(full_pruner.masks, pruner2.masks)
    )


def test_load_state_dict_of_another_model_is_refused():
    a = softprune.Pruner(softprune.create_model("resnet20"), "sfp", 0.4, 2)
    b = softprune.Pruner(softprune.create_model("resnet32"), "sfp", 0.4, 2)
    with pytest.raises(SoftpruneError, match="different model"):
        b.load_state_dict(a.state_dict())


def test_interval_prunes_every_k_optimizer_steps():
    torch.manual_seed(0)
    model = softprune.create_model("resnet20")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = softprune.Pruner(model, "ghfp", 0.4, total_steps=3, optimizer=opt, interval=2)
    x, y = _batches(n=1)[0]
    for i in range(7):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        assert pruner.t == min((i + 1) // 2, 3)


def test_default_selection_is_every_conv_never_the_classifier():
    pruner = softprune.Pruner(softprune.create_model("resnet20"), "sfp", 0.4, 1, residual="independent")
    assert len(pruner.prunable) == 19  # the stem and both convs of 9 blocks
    assert all(isinstance(pruner.model.get_submodule(g.producers[0]), nn.Conv2d) for g in pruner.prunable)
    fc = [g for g in pruner.groups if g.producers == ["fc"]][0]
    assert not fc.prunable


def test_layer_selection_by_names_patterns_and_types():
    def prunable(**kw):
        p = softprune.Pruner(softprune.create_model("resnet20"), "sfp", 0.4, 1, residual="independent", **kw)
        return {g.producers[0] for g in p.prunable}

    assert prunable(layers=["layer1.*"]) == {f"layer1.{b}.conv{c}" for b in range(3) for c in (1, 2)}
    assert prunable(layers=["re:layer3\\.\\d\\.conv1"]) == {f"layer3.{b}.conv1" for b in range(3)}
    assert "conv1" not in prunable(ignore=["conv1"]) and len(prunable(ignore=["conv1"])) == 18
    with_linear = softprune.Pruner(
        softprune.create_model("lenet5", in_channels=1), "sfp", 0.4, 1, layers=[nn.Conv2d, nn.Linear]
    )
    assert {g.producers[0] for g in with_linear.prunable} == {"conv1", "conv2", "fc1", "fc2"}


def test_coupled_mode_prunes_every_layer_of_a_stream_at_the_rate():
    torch.manual_seed(0)
    model = softprune.create_model("resnet20")
    pruner = softprune.Pruner(model, "sfp", 0.4, 1, residual="coupled")
    stream = max(pruner.prunable, key=lambda g: len(g.producers))
    assert stream.size == 64 and len(stream.producers) == 10
    pruner.step()
    small = pruner.compact()
    widths = {
        name: small.get_submodule(name).out_channels
        for name in ("conv1", "layer1.0.conv2", "layer2.0.conv2", "layer3.0.conv2")
    }
    assert widths == {"conv1": 10, "layer1.0.conv2": 10, "layer2.0.conv2": 20, "layer3.0.conv2": 39}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            {"method": "gfhp"},
            "unknown method 'gfhp'; choose one of: adsc, asfp, asrfp, bwcp, c2s2, conet, dmcp, ezcrop, frs, ghfp, greg1, greg2, hfp, hrank, "
            "lrf, pfwt, random, resrep, sfp, similarity, slimming, srfp, tick_tock. Did you mean 'ghfp'",
        ),
        (
            {"criterion": "l3"},
            "unknown criterion 'l3'; choose one of: activation, bn_scale, bwcp, c2s2, compactor, conet, dmcp, ezcrop, fpgm, fpgm_mix, hrank, l1, l2, l2_bn, lrf, random, relevance, similarity, taylor",
        ),
        ({"rate": 1.0}, r"rate must lie in \[0, 1\)"),
        ({"rate": -0.2}, r"rate must lie in \[0, 1\)"),
        ({"total_steps": 0}, "total_steps must be an integer >= 1"),
        ({"total_steps": None}, "total_steps must be an integer >= 1"),
        (
            {"residual": "both"},
            "Pruner setting 'residual' has value 'both'; expected one of 'coupled', 'independent'",
        ),
        (
            {"mask_scope": "bn"},
            "Pruner setting 'mask_scope' has value 'bn'; expected one of 'channel', 'filter'",
        ),
        ({"max_rat": 0.5}, "unknown Pruner setting 'max_rat'. Did you mean 'max_rate'"),
        ({"max_rate": 1.5}, r"Pruner setting 'max_rate' must lie in \(0, 1\)"),
        ({"interval": 0}, "interval must be a positive"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, match):
    args = {"method": "sfp", "rate": 0.4, "total_steps": 3, **kwargs}
    with pytest.raises(SoftpruneError, match=match):
        softprune.Pruner(softprune.create_model("resnet20"), **args)


def test_model_with_nothing_to_prune_is_an_error():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    with pytest.raises(SoftpruneError, match="nothing to prune in Sequential"):
        softprune.Pruner(model, "sfp", 0.4, 2, example_inputs=torch.randn(1, 3, 2, 2))


def test_model_without_example_inputs_is_an_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    with pytest.raises(SoftpruneError, match="needs example_inputs"):
        softprune.Pruner(model, "sfp", 0.4, 2)


def test_stepping_past_total_steps_is_an_error():
    pruner = softprune.Pruner(softprune.create_model("resnet20"), "sfp", 0.4, total_steps=1)
    pruner.step()
    with pytest.raises(SoftpruneError, match="all 1 pruning steps are done"):
        pruner.step()


def test_analysis_calibration_and_checks_give_every_module_its_own_training_mode_back():
    from softprune.cost import measure_macs
    from softprune.models import resnet20

    model = resnet20().train()
    model.bn1.eval()  # a user's frozen BatchNorm inside a training model
    x = torch.randn(2, 3, 32, 32)
    pruner = softprune.Pruner(
        model, "sfp", 0.3, 1, example_inputs=x, criterion="hrank", calibration=[x], calibration_batches=1
    )
    modes = [model.training, model.layer1[0].bn1.training, model.bn1.training]
    pruner.step()  # calibration forward passes in eval mode
    modes += [model.training, model.layer1[0].bn1.training, model.bn1.training]
    measure_macs(model, x)
    pruner.compact()  # the equivalence check runs both models in eval mode
    modes += [model.training, model.layer1[0].bn1.training, model.bn1.training]
    assert modes == [True, True, False] * 3


def test_default_selection_adds_linear_layers_only_where_the_compute_is():
    from torchvision.models import VisionTransformer

    from softprune.graph import DENSE_LAYERS

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                            num_classes=10)  # fmt: skip
    x = torch.randn(2, 3, 32, 32)
    pruner = softprune.Pruner(vit, "hfp", 0.5, 1, example_inputs=x)
    assert pruner.layers == list(DENSE_LAYERS)
    names = {p for g in pruner.prunable for p in g.producers}
    assert {"encoder.layers.encoder_layer_0.mlp.0", "encoder.layers.encoder_layer_1.mlp.0"} <= names
    assert "heads.head" not in names  # the classifier never
    pruner.step()
    small = pruner.compact()
    assert small.encoder.layers.encoder_layer_0.mlp[0].out_features == 32
    assert pruner.last_verification["max_abs_diff"] < 1e-5
    # a CNN with a hidden Linear layer in its head: the convolutions dominate, only they are selected
    cnn = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10),
    )  # fmt: skip
    pruner = softprune.Pruner(cnn, "hfp", 0.5, 1, example_inputs=x)
    assert pruner.layers is None
    assert {p for g in pruner.prunable for p in g.producers} == {"0", "2"}
