"""The literature's criteria, regularizers, compensation and budgets, each against a known answer."""

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import softprune
from softprune import Compensator
from softprune.cli import main

ROOT = Path(__file__).resolve().parents[1]
METHOD_RECIPES = sorted((ROOT / "configs" / "methods").glob("*.yaml"))


class Tiny(nn.Module):
    """conv1 (6 filters) -> BN -> ReLU -> conv2 (8) -> BN -> ReLU -> pool -> fc: two groups."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


X = torch.zeros(1, 1, 8, 8)


def batches(n=3, size=16, seed=0, targets=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(size, 1, 8, 8, generator=g)
        out.append((x, torch.randint(0, 4, (size,), generator=g)) if targets else x)
    return out


def tiny(seed=0):
    torch.manual_seed(seed)
    return Tiny().eval()


def pruned_units(model, criterion, rate=0.2, layers=("conv1",), **kwargs):
    """Units made hard by one HFP step, per pruned group name."""
    p = softprune.Pruner(
        model, "hfp", rate, 1, criterion=criterion, example_inputs=X, layers=list(layers) if layers else None,
        **kwargs,
    )  # fmt: skip
    p.step()
    return p, {g.name: set(torch.nonzero(m.hard).view(-1).tolist()) for g, m in zip(p.prunable, p.masks)}


# -- criteria on hand-built answers ---------------------------------------------------------------
def test_similarity_drops_the_weaker_of_two_proportional_channels():
    model = tiny()
    with torch.no_grad():
        model.conv1.weight[5] = 2 * model.conv1.weight[0]  # map 5 = 2 x map 0 after BN (eval) and ReLU
    p, hard = pruned_units(model, "similarity", calibration=batches())
    assert hard == {"conv1": {0}}  # correlation 1; unit 0 has a quarter of unit 5's energy
    scores = p.criterion.scores(p.prunable[0], model)
    assert float(scores[0]) == pytest.approx(0.0, abs=1e-9) and float(scores[1:].min()) > 0.01


def test_lrf_finds_a_duplicated_filter_and_weight_compensation_makes_its_removal_lossless():
    model = tiny()
    with torch.no_grad():
        model.conv1.weight[5] = model.conv1.weight[0]
    dense = copy.deepcopy(model)
    p, hard = pruned_units(model, "lrf", compensate="weights")
    assert len(hard["conv1"]) == 1 and hard["conv1"] <= {0, 5}
    x = torch.randn(8, 1, 8, 8)
    # the duplicate's maps are the kept twin's (same BN), so folding its conv2 columns is exact
    assert (model(x) - dense(x)).abs().max() < 1e-5
    compact = p.compact()
    assert compact.conv1.out_channels == 5 and (compact(x) - dense(x)).abs().max() < 1e-5


def test_lrf_scores_are_the_least_squares_residuals_times_the_consumer_norms():
    model = tiny(1)
    p = softprune.Pruner(model, "hfp", 0.2, 1, criterion="lrf", example_inputs=X, layers=["conv1"])
    order, scores = p.criterion.order_and_scores(p.prunable[0], model, 1)
    rows = model.conv1.weight.detach().flatten(1).double()
    norms = model.conv2.weight.detach().transpose(0, 1).flatten(1).double().norm(dim=1)
    u = int(order[0])
    others = torch.cat([rows[:u], rows[u + 1 :]])
    coef = torch.linalg.lstsq(others.T, rows[u]).solution
    residual = (rows[u] - others.T @ coef).norm() * norms[u]
    assert float(scores[u]) == pytest.approx(float(residual), rel=1e-3)


@pytest.mark.parametrize("criterion", ["hrank", "ezcrop"])
def test_a_constant_feature_map_is_pruned_first_by_rank_and_by_fft_energy(criterion):
    model = tiny()
    with torch.no_grad():
        model.conv1.weight[2] = 0
        model.bn1.bias[2] = 0.5  # map 2 is 0.5 everywhere: rank 1, all its spectrum at frequency 0
    p, hard = pruned_units(model, criterion, calibration=batches(), calibration_batches=2)
    assert hard == {"conv1": {2}}
    scores = p.criterion.scores(p.prunable[0], model)
    others = torch.cat([scores[:2], scores[3:]])
    if criterion == "hrank":
        assert float(scores[2]) == pytest.approx(1.0, abs=1e-5)
        assert float(others.min()) >= 7.0  # random 8 x 8 maps are (nearly) full rank
    else:
        assert float(scores[2]) == pytest.approx(0.0, abs=1e-5) and float(others.min()) > 0.05


def test_hrank_needs_calibration_batches():
    with pytest.raises(softprune.SoftpruneError, match="calibration="):
        softprune.Pruner(tiny(), "hfp", 0.2, 1, criterion="hrank", example_inputs=X)


def test_bn_scale_ranks_globally_across_layers():
    model = tiny()
    with torch.no_grad():
        model.bn1.weight[3] = 0.0
        model.bn2.weight[[1, 4]] = torch.tensor([1e-3, -2e-3])
        model.bn2.weight[6] = 0.5
    # 3 of the 14 channels: the three smallest |gamma| wherever they are
    _, hard = pruned_units(model, "bn_scale", rate=3 / 14 + 1e-6, layers=None, budget="global")
    assert hard == {"conv1": {3}, "conv2": {1, 4}}
    _, hard = pruned_units(tiny(), "bn_scale", rate=0.25, layers=None)  # layer-wise: 1 and 2
    assert [len(v) for v in hard.values()] == [1, 2]


def test_taylor_scores_are_the_accumulated_gate_gradients():
    model = tiny().train()
    with torch.no_grad():
        model.conv2.weight[:, 4] = 0  # nothing reads channel 4: its gradient is exactly 0
    p = softprune.Pruner(model, "hfp", 0.2, 1, criterion="taylor", example_inputs=X, layers=["conv1"])
    seen = []
    handle = model.conv2.register_forward_pre_hook(lambda m, a: seen.append(a[0].retain_grad() or a[0]))
    expected = torch.zeros(6, dtype=torch.float64)
    for x, y in batches(3, targets=True):
        F.cross_entropy(model(x), y).backward()
        a = seen.pop()
        expected += (a * a.grad).sum((0, 2, 3)).abs().double()
    handle.remove()
    scores = p.criterion.scores(p.prunable[0], model)
    assert torch.allclose(scores.double(), expected, rtol=1e-4, atol=1e-9)
    assert float(scores[4]) == 0.0 and float(scores.max()) > 0
    p.step()
    assert torch.nonzero(p.masks[0].hard).view(-1).tolist() == [4]


def test_taylor_scores_on_calibration_batches_when_nothing_was_trained():
    model = tiny()
    with torch.no_grad():
        model.conv2.weight[:, 1] = 0
    _, hard = pruned_units(model, "taylor", calibration=batches(targets=True), loss_fn=F.cross_entropy)
    assert hard == {"conv1": {1}}
    with pytest.raises(softprune.SoftpruneError, match="seen no feature maps.*loss_fn="):
        pruned_units(tiny(), "taylor")


def test_random_is_reproducible_per_seed_and_exact_in_count():
    def picks(seed):
        model = softprune.create_model("resnet20")
        p = softprune.Pruner(model, "hfp", 0.4, 1, criterion="random", criterion_options={"seed": seed})
        p.step()
        return [torch.nonzero(m.hard).view(-1).tolist() for m in p.masks], p

    a, p = picks(0)
    b, _ = picks(0)
    c, _ = picks(1)
    assert a == b and a != c
    assert [len(h) for h in a] == [int(g.size * 0.4) for g in p.prunable]


def test_tick_trains_only_one_dimensional_parameters_while_taylor_accumulates():
    model = tiny()
    p = softprune.Pruner(model, "hfp", 0.2, 2, criterion="taylor", example_inputs=X, loss_fn=F.cross_entropy)
    before = copy.deepcopy(model.state_dict())
    assert p.tick(batches(3, targets=True), lr=0.1) == 3
    after = model.state_dict()
    for name in ("conv1.weight", "conv2.weight", "fc.weight"):
        assert torch.equal(before[name], after[name])
    assert not torch.equal(before["bn1.weight"], after["bn1.weight"])
    assert not model.training and all(p_.requires_grad for p_ in model.parameters())
    assert p.criterion.observed() and float(p.criterion.scores(p.prunable[0], model).sum()) > 0


# -- compensation -----------------------------------------------------------------------------
class TwoConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.conv2(F.relu(self.conv1(x))).mean((2, 3)))


def _compensated(compensate):
    """TwoConv with half of conv1's channels pruned (and compensated): (pruned, dense, pruner, data)."""
    torch.manual_seed(0)
    model = TwoConv()
    with torch.no_grad():  # channels 4..7 are noisy copies of 0..3: what goes is partly predictable
        w = model.conv1.weight
        w[4:] = 0.8 * w[:4] + 0.2 * torch.randn_like(w[:4])
        model.conv1.bias[4:] = model.conv1.bias[:4]
    dense = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randn(32, 3, 8, 8, generator=g) for _ in range(4)]
    p = softprune.Pruner(
        model, "hfp", 0.5, 1, example_inputs=torch.zeros(1, 3, 8, 8), layers=["conv1"], criterion="l1",
        calibration=calibration, compensate=compensate,
    )  # fmt: skip
    p.step()
    return (
        model,
        dense,
        p,
        {"calibration": torch.cat(calibration), "held_out": torch.randn(64, 3, 8, 8, generator=g)},
    )


@torch.no_grad()
def _conv2_io(model, x):
    seen = {}
    h = model.conv2.register_forward_hook(lambda m, a, y: seen.update(x=a[0], y=y))
    model(x)
    h.remove()
    return seen["x"], seen["y"]


def _relative_error(y, ref):
    return float((y - ref).pow(2).mean() / ref.pow(2).mean())


def test_compensation_reduces_the_next_layers_output_error():
    errors = {}
    for source in (False, "weights", "activations"):
        model, dense, _, data = _compensated(source)
        errors[source] = _relative_error(
            _conv2_io(model, data["held_out"])[1], _conv2_io(dense, data["held_out"])[1]
        )
    # measured: 0.086 without compensation, 0.053 from the filters, 0.044 from calibration activations
    assert errors[False] > 0.05
    assert errors["activations"] < 0.6 * errors[False]
    assert errors["weights"] < 0.7 * errors[False]


def test_activation_compensation_is_the_least_squares_optimum_on_the_calibration_data():
    model, dense, p, data = _compensated("activations")
    removed = p.masks[0].hard
    x, ref = _conv2_io(dense, data["calibration"])
    cols = x.movedim(1, -1).reshape(-1, 8).double()
    kept = torch.cat([cols[:, ~removed], torch.ones(len(cols), 1, dtype=torch.float64)], 1)
    fit = torch.linalg.lstsq(kept, cols[:, removed]).solution  # x_R ~ [x_K, 1] @ fit
    w = dense.conv2.weight.detach().double()[:, :, 0, 0]
    best_w = w[:, ~removed] + w[:, removed] @ fit[:-1].T
    best_b = dense.conv2.bias.detach().double() + w[:, removed] @ fit[-1]
    best = (cols[:, ~removed] @ best_w.T + best_b).float()
    optimum = _relative_error(best, ref.movedim(1, -1).reshape(-1, 6))
    achieved = _relative_error(_conv2_io(model, data["calibration"])[1], ref)
    assert achieved == pytest.approx(optimum, rel=0.02)
    uncompensated, _, _, _ = _compensated(False)
    assert achieved < 0.6 * _relative_error(_conv2_io(uncompensated, data["calibration"])[1], ref)


def test_compensator_rejects_an_unknown_source():
    with pytest.raises(softprune.SoftpruneError, match="compensation source"):
        Compensator("gradients")


# -- budgets --------------------------------------------------------------------------------
def _example(name):
    if name == "resnet20":
        return softprune.create_model("resnet20"), torch.randn(1, 3, 32, 32)
    return getattr(torchvision.models, name)(num_classes=10), torch.randn(1, 3, 64, 64)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "regnet_x_400mf", "resnet20"])
def test_a_macs_target_is_met_within_one_percent_by_the_compact_model(name):
    torch.manual_seed(0)
    model, x = _example(name)
    dense_macs = softprune.profile(model, x)["macs"]
    p = softprune.Pruner(model.eval(), "hfp", 0.5, 1, example_inputs=x, budget="macs")
    p.step()
    compact = p.compact()  # verified equal to the masked model
    cut = 1 - softprune.profile(compact, x)["macs"] / dense_macs
    assert 0.5 <= cut <= 0.51


def test_the_rate_schedule_drives_a_macs_target():
    x = torch.randn(1, 3, 32, 32)
    dense = softprune.profile(softprune.create_model("resnet20"), x)["macs"]
    cuts = {}
    for seed, method in enumerate(("ghfp", "asfp", "sfp")):
        torch.manual_seed(seed)
        p = softprune.Pruner(softprune.create_model("resnet20"), method, 0.5, 4, budget="macs")
        cuts[method] = []
        for _ in range(4):
            report = p.step()
            cuts[method].append((report.rate, 1 - p.profile()["macs"] / dense))
        if method == "ghfp":
            assert p.counts()[1] == 0  # GHFP ends with every pruned unit hard
    for rate, cut in sum(cuts.values(), []):  # soft and hard units together meet P_t of the MACs
        assert rate <= cut <= rate + 0.005
    asfp = [rate for rate, _ in cuts["asfp"]]
    assert asfp == sorted(asfp) and asfp[0] < 0.5 and asfp[-1] == pytest.approx(0.5, abs=1e-3)


def test_a_params_target_with_round_to_8():
    torch.manual_seed(0)
    model, x = _example("resnet18")
    dense = softprune.profile(model, x)["params"]
    p = softprune.Pruner(
        model.eval(), "hfp", 0.3, 1, example_inputs=x, budget={"kind": "params", "round_to": 8}
    )
    p.step()
    compact = p.compact()
    assert 0.3 <= 1 - softprune.profile(compact, x)["params"] / dense <= 0.31
    widths = [m.out_channels for m in compact.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths)


def test_global_budget_caps_each_layer_and_rounds_widths():
    model = softprune.create_model("resnet20")
    budget = {"kind": "global", "max_rate": 0.5, "round_to": 4}
    p = softprune.Pruner(model, "hfp", 0.4, 1, budget=budget, criterion="l1")
    p.step()
    total = sum(g.size for g in p.prunable)
    hard = [int(m.hard.sum()) for m in p.masks]
    assert all(h <= 0.5 * g.size for h, g in zip(hard, p.prunable))
    assert all((g.size - h) % 4 == 0 for h, g in zip(hard, p.prunable))
    assert int(0.4 * total) - 4 * len(hard) <= sum(hard) <= int(0.4 * total)
    assert len(set(h / g.size for h, g in zip(hard, p.prunable))) > 1  # not the layer-wise answer


def test_budget_errors_are_clear():
    with pytest.raises(softprune.SoftpruneError, match="budget"):
        softprune.Pruner(softprune.create_model("resnet20"), "hfp", 0.4, 1, budget="flops")
    with pytest.raises(softprune.SoftpruneError, match="max_rate"):
        softprune.Pruner(
            softprune.create_model("resnet20"), "hfp", 0.4, 1, budget={"kind": "global", "max_rate": 1.5}
        )


# -- regularizers ---------------------------------------------------------------------------
def _zero_loss_step(model, optimizer):
    optimizer.zero_grad()
    (0.0 * sum(p.sum() for p in model.parameters())).backward()
    optimizer.step()


def test_bn_l1_subtracts_strength_times_sign_until_units_are_hard():
    model = tiny()
    with torch.no_grad():
        model.bn1.weight.copy_(torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, 0.0]))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    p = softprune.Pruner(
        model, "hfp", 0.2, 1, example_inputs=X, optimizer=opt, regularizer={"kind": "bn_l1", "strength": 0.01}
    )
    gamma = model.bn1.weight.detach().clone()
    _zero_loss_step(model, opt)
    assert torch.allclose(model.bn1.weight.detach(), gamma - 0.01 * torch.sign(gamma))
    assert torch.allclose(model.bn2.weight.detach(), torch.full((8,), 0.99))
    p.step()
    gamma = model.bn2.weight.detach().clone()
    _zero_loss_step(model, opt)  # "until: pruned": the fine-tuning runs without the penalty
    assert torch.equal(model.bn2.weight.detach(), gamma)


def test_greg_grows_an_l2_penalty_on_the_selected_filters_only():
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    reg = {"kind": "greg1", "delta": 0.01, "every": 2, "ceiling": 0.025}
    p = softprune.Pruner(
        model, "sfp", 0.34, 2, example_inputs=X, optimizer=opt, layers=["conv1"], decay=1.0, hardness=0.0,
        keep_first=True, regularizer=reg,
    )  # fmt: skip
    p.step()
    selected = p.masks[0].soft.clone()
    assert int(selected.sum()) == 2 and not bool(p.masks[0].hard.any())
    w = model.conv1.weight.detach().clone()
    factor = torch.ones(6)
    for step in range(1, 8):
        _zero_loss_step(model, opt)
        penalty = min(0.01 * (step // 2), 0.025)  # grows every 2 steps, capped
        factor[selected] *= 1 - penalty
    assert p.regularizer.penalty[0][selected].tolist() == pytest.approx([0.025, 0.025])
    expected = w * factor.view(6, 1, 1, 1)
    assert torch.allclose(model.conv1.weight.detach(), expected, atol=1e-6)
    state = p.state_dict()
    fresh = softprune.Pruner(tiny(), "sfp", 0.34, 2, example_inputs=X, layers=["conv1"], decay=1.0, hardness=0.0,
                             keep_first=True, regularizer=reg)  # fmt: skip
    fresh.load_state_dict(state)
    assert fresh.regularizer.steps == 7 and torch.equal(
        fresh.regularizer.penalty[0], p.regularizer.penalty[0]
    )


def test_greg2_grows_a_uniform_penalty_before_the_selection():
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    p = softprune.Pruner(
        model, "sfp", 0.34, 2, example_inputs=X, optimizer=opt, layers=["conv1"], decay=1.0,
        regularizer={"kind": "greg2", "uniform_delta": 0.1, "uniform_ceiling": 0.15, "every": 1},
    )  # fmt: skip
    w = model.conv1.weight.detach().clone()
    for _ in range(3):
        _zero_loss_step(model, opt)  # penalties 0.1, 0.15, 0.15 on every filter
    assert torch.allclose(model.conv1.weight.detach(), w * 0.9 * 0.85 * 0.85, atol=1e-6)
    assert p.regularizer.name == "greg2"


# -- recipes end to end ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("recipe", METHOD_RECIPES, ids=[p.stem for p in METHOD_RECIPES])
def test_each_method_recipe_trains_compacts_and_stays_equivalent(recipe, tmp_path, data_root):
    args = [
        "train", str(recipe), f"output={tmp_path}", "name=run", f"data.root={data_root}",
        "data.train_limit=384", "data.test_limit=128", "train.epochs=3", "train.batch_size=64",
        "report.latency_repeats=1", "--quiet",
    ]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["equivalence"]["max_abs_diff"] <= 1e-5 * summary["equivalence"]["output_scale"]
    assert summary["compact"]["test_acc"] == pytest.approx(summary["test_acc_masked"], abs=0.8)
    config = softprune.train.config.load_config(recipe)
    assert summary["criterion"] == config.prune.criterion and summary["budget"] == config.prune.budget
    assert summary["compact"]["macs"] < summary["dense"]["macs"]
    if config.prune.method == "resrep":  # every compactor merged into ResNet-20's nine inner layers
        assert summary["plugins"]["resrep"]["merged"] == summary["plugins"]["resrep"]["compactors"] == 9
    if config.prune.budget == "macs":
        assert summary["reduction"]["macs"] >= config.prune.rate
    else:
        assert summary["compact"]["params"] < 0.7 * summary["dense"]["params"]


def test_accumulated_taylor_scores_survive_a_pruner_state_round_trip():
    model = tiny().train()
    p = softprune.Pruner(model, "hfp", 0.2, 2, criterion="taylor", example_inputs=X)
    for x, y in batches(2, targets=True):
        F.cross_entropy(model(x), y).backward()
    state = p.state_dict()
    fresh = softprune.Pruner(copy.deepcopy(model), "hfp", 0.2, 2, criterion="taylor", example_inputs=X)
    fresh.load_state_dict(state)
    expected = p.criterion.scores(p.prunable[0], model)
    assert torch.equal(fresh.criterion.scores(fresh.prunable[0], fresh.model), expected)
    assert float(expected.sum()) > 0


@pytest.mark.parametrize(
    "override, message",
    [
        ("prune.budget=flops", "prune.budget"),
        ("prune.criterion=hrank prune.calibration_batches=0", "calibration_batches must be >= 1"),
        ("prune.plugins=[tick]", "does not use them"),
        ("prune.regularizer=l3", "regularizer"),
        ("prune.compensate=gradients", "prune.compensate"),
        ("prune.max_rate=1.5", "max_rate"),
    ],
)
def test_bad_method_settings_are_one_line_errors(override, message, capsys):
    recipe = ROOT / "configs" / "fashion_mnist_ghfp.yaml"
    assert main(["train", str(recipe), *override.split(), "output=/nonexistent/never"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
