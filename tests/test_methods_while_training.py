"""Methods that prune while training (ResRep, ADSC, PFWT, FRS), each against a known answer."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import softprune
from softprune.budgets import normalized
from softprune.errors import SoftpruneError
from softprune.schedules import AnnealingRate, schedule_from_dict
from test_methods import Tiny, X, batches, tiny


def _resrep(model, rate=0.3, steps=2, strength=0.1, momentum=0.0, lr=0.1, **kwargs):
    """ResRep's plugin and criterion on a plain SGD (no momentum, no decay), so updates are known."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    p = softprune.Pruner(
        model, "sfp", rate, steps, opt, example_inputs=X, criterion="compactor", decay=1.0,
        plugins=[{"kind": "resrep", "strength": strength, "momentum": momentum}], **kwargs,
    )  # fmt: skip
    return p, opt, next(q for q in p.plugins if q.name == "resrep")


def _randomize_batchnorm(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g)
            m.running_mean = torch.randn(n, generator=g)
            m.running_var = torch.rand(n, generator=g) + 0.2


class NoBN(nn.Module):
    """A convolution without a BatchNorm: nothing for the BatchNorm-based methods to act on."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


# -- ResRep -----------------------------------------------------------------------------------
def test_resrep_merges_its_compactors_exactly_and_removes_the_zero_rows():
    model = tiny()
    _randomize_batchnorm(model)
    model.conv1.bias = nn.Parameter(torch.randn(6))  # a convolution bias folds in too
    p, _, plugin = _resrep(model)
    assert sorted(plugin.sites) == [0, 1]
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for i, q in plugin.compactors.items():
            q.copy_(torch.eye(q.shape[0]) + 0.3 * torch.randn(q.shape, generator=g))
            q[1] = 0.0  # zero rows, the lowest scores: channel 1 of conv1, channels 1 and 2 of conv2
            if i == 1:
                q[2] = 0.0
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        expected = model.eval()(x)  # compactors in the forward, in eval mode
    p.step()
    assert [torch.nonzero(m.soft).view(-1).tolist() for m in p.masks] == [[1], [1, 2]]
    small = p.compact()
    assert not model.bn1._forward_hooks and not model.bn2._forward_hooks  # merged: a plain model again
    assert small.conv1.out_channels == 6 - 1 and small.conv2.out_channels == 8 - 2
    with torch.no_grad():
        assert torch.allclose(small.eval()(x), expected, atol=1e-5)
    # the rows cut were zero already: the largest over its layer's median kept row is 0
    assert plugin.summary()["largest_cut_row_over_median_kept_row"] == 0.0
    assert plugin.summary()["merged"] == 2


def test_resrep_resets_the_task_gradient_of_selected_rows_and_adds_the_group_lasso():
    model = tiny().train()
    p, opt, plugin = _resrep(model, rate=0.5, strength=0.1, lr=0.1)
    with torch.no_grad():
        plugin.compactors[0][0] *= 0.5  # the lowest row norms: channels 0, and then the others tie
    p.step()
    selected = p.masks[0].soft.clone()
    assert bool(selected[0]) and int(selected.sum()) == 3
    q = plugin.compactors[0].detach().clone()
    x, y = batches(1, targets=True)[0]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    task = plugin.compactors[0].grad.clone()
    opt.step()
    penalty = 0.1 * q / q.norm(dim=1, keepdim=True)
    expected = q - 0.1 * (task * (~selected).float().view(-1, 1) + penalty)
    assert torch.allclose(plugin.compactors[0].detach(), expected, atol=1e-7)
    assert float(task[~selected].abs().max()) > 1e-4  # kept rows did get a task gradient
    assert plugin.compactors[0].grad is None  # its own optimizer cleared it


def test_resrep_holds_the_residual_stream_and_reaches_a_macs_target_with_the_inner_layers():
    torch.manual_seed(0)
    model = softprune.create_model("resnet20", in_channels=1, input_size=28)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    p = softprune.Pruner(model, "resrep", 0.4, 4, opt, example_inputs=(torch.randn(1, 1, 28, 28),))
    plugin = next(q for q in p.plugins if q.name == "resrep")
    held = [g.name for g, h in zip(p.prunable, p.held) if bool(h.all())]
    assert len(plugin.sites) == 9 and len(held) == 1  # nine inner layers; the stream is held
    assert plugin.summary()["held_groups"] == held
    for _ in range(4):
        p.step()
    stream = p.prunable.index(next(g for g in p.prunable if g.name == held[0]))
    assert int(p.masks[stream].pruned.sum()) == 0
    dense = softprune.profile(
        softprune.create_model("resnet20", in_channels=1, input_size=28), torch.randn(1, 1, 28, 28)
    )
    small = p.compact()
    macs = softprune.profile(small, torch.randn(1, 1, 28, 28))["macs"]
    assert 0.6 * dense["macs"] * 0.99 <= macs <= 0.6 * dense["macs"]
    assert p.last_verification["max_abs_diff"] <= 1e-5 * p.last_verification["output_scale"]


def test_resrep_state_round_trip_keeps_the_compactors_and_their_momentum():
    model = tiny().train()
    p, opt, plugin = _resrep(model, momentum=0.9)
    x, y = batches(1, targets=True)[0]
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    state = p.state_dict()
    twin = tiny().train()
    twin.load_state_dict(model.state_dict())
    q2, _, plugin2 = _resrep(twin, momentum=0.9)
    q2.load_state_dict(state)
    for i in plugin.compactors:
        assert torch.equal(plugin2.compactors[i].detach(), plugin.compactors[i].detach())
    assert plugin2._optimizer.state_dict()["state"][0]["momentum_buffer"].abs().sum() > 0


def test_resrep_without_batchnorm_is_a_one_line_error():
    with pytest.raises(
        SoftpruneError, match="method resrep needs convolutions followed directly by a BatchNorm"
    ):
        softprune.Pruner(NoBN(), "resrep", 0.3, 2, example_inputs=X)


def test_resrep_holds_a_layer_whose_batchnorm_reads_something_else_than_the_convolution():
    class ReluBeforeBN(Tiny):
        def forward(self, x):
            x = self.bn1(F.relu(self.conv1(x)))  # the BatchNorm does not read conv1's output: no merge
            x = F.relu(self.bn2(self.conv2(x)))
            return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    torch.manual_seed(0)
    p, _, plugin = _resrep(ReluBeforeBN().eval())
    assert list(plugin.sites) == [1] and plugin.summary()["held_groups"] == ["conv1"]
    p.step()
    assert int(p.masks[0].pruned.sum()) == 0 and int(p.masks[1].pruned.sum()) == 2


# -- ADSC -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "t, expected",
    [(0, 0.5 * (1 - 38 / 50)), (9, 0.5 * (1 - 20 / 140)), (19, 0.5), (35, 0.5), (39, 0.5)],
)
def test_adsc_annealing_rate_at_0_a_quarter_half_and_the_end(t, expected):
    # M_e = k + (M - k) max(0, (N - 2e) / (2 e mu + N)) with e = t + 1, N = T = 40, mu = 5
    assert AnnealingRate(0.5, mu=5.0)(t, 40) == pytest.approx(expected, abs=1e-12)
    assert schedule_from_dict({"kind": "annealing", "value": 0.5, "mu": 5.0})(t, 40) == pytest.approx(
        expected
    )


def test_adsc_keeps_the_annealed_count_and_removes_for_good():
    model = tiny()
    p = softprune.Pruner(model, "adsc", 0.5, 4, example_inputs=X, layers=["conv2"])
    kept = []
    for _ in range(4):
        p.step()
        kept.append(8 - int(p.masks[0].hard.sum()))
    # P_t = 0.5 [1 - max(0, (4 - 2e)/(10 e + 4))]: e=1: 0.5 * (1 - 2/14); e >= 2: 0.5
    assert kept == [8 - int(8 * 0.5 * (1 - 2 / 14)), 4, 4, 4]
    assert int(p.masks[0].soft.sum()) == 0


# -- PFWT and FRS's criteria ------------------------------------------------------------------
def _consumed_maps(model, x):
    """conv1's channels as conv2 reads them (after BN and ReLU)."""
    return F.relu(model.bn1(model.conv1(x)))


def test_activation_scores_are_the_mean_absolute_feature_map():
    model = tiny()
    data = batches(2)
    p = softprune.Pruner(model, "pfwt", 0.5, 1, example_inputs=X, layers=["conv1"], criterion="activation",
                         calibration=data, calibration_batches=2)  # fmt: skip
    with torch.no_grad():
        maps = torch.cat([_consumed_maps(model, x) for x in data])
    expected = maps.abs().mean((2, 3)).mean(0)
    p.step()
    assert torch.allclose(p.criterion.scores(p.prunable[0], model), expected, atol=1e-6)
    assert set(torch.nonzero(p.masks[0].hard).view(-1).tolist()) == set(torch.argsort(expected)[:3].tolist())


def test_relevance_scores_are_activation_times_the_true_class_gradient():
    model = tiny()
    data = batches(2, targets=True)
    p = softprune.Pruner(model, "frs", 0.5, 1, example_inputs=X, layers=["conv1"], calibration=data,
                         calibration_batches=2)  # fmt: skip
    total = torch.zeros(6)
    for x, y in data:
        h = _consumed_maps(model, x).detach().requires_grad_(True)
        out = model.fc(F.adaptive_avg_pool2d(F.relu(model.bn2(model.conv2(h))), 1).flatten(1))
        (g,) = torch.autograd.grad(out.gather(1, y.view(-1, 1)).sum(), h)
        total += (h * g).sum((2, 3)).sum(0).detach()
    expected = (total / 32).abs()
    seen = []  # the scores the step ranked by (a gradient criterion starts afresh after each step)
    rank = p.criterion.order_and_scores
    p.criterion.order_and_scores = lambda *a: seen.append(rank(*a)[1]) or rank(*a)
    p.step()
    assert torch.allclose(seen[0], expected, atol=1e-5)
    assert set(torch.nonzero(p.masks[0].hard).view(-1).tolist()) == set(torch.argsort(expected)[:3].tolist())


def test_l2_normalization_divides_each_layer_by_the_norm_of_its_scores():
    scores = torch.tensor([3.0, 4.0])
    free = torch.ones(2, dtype=torch.bool)
    assert torch.allclose(normalized(scores, free, torch.argsort(scores), "l2"), torch.tensor([0.6, 0.8]))


def test_frs_needs_calibration_batches():
    with pytest.raises(SoftpruneError, match="calibration"):
        softprune.Pruner(Tiny(), "frs", 0.3, 2, example_inputs=X)


def test_a_macs_target_beyond_what_the_method_may_remove_is_a_one_line_error():
    model = softprune.create_model("resnet20", in_channels=1, input_size=28)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    example = (torch.randn(1, 1, 28, 28),)
    # ResRep leaves the residual stream whole: the inner layers alone cut at most ~96% of the MACs
    with pytest.raises(
        SoftpruneError, match=r"method resrep: rate=0.97 of the macs cannot be met .* at most 9\d\.\d%"
    ):
        softprune.Pruner(model, "resrep", 0.97, 4, opt, example_inputs=example)
    assert softprune.Pruner(model, "resrep", 0.9, 4, opt, example_inputs=example).t == 0


def test_a_plugin_of_the_methods_kind_sets_its_options_instead_of_adding_a_second():
    method = softprune.get_method("resrep")
    once = method.resolve({"plugins": [{"kind": "resrep", "strength": 0.004}]})
    assert once["plugins"] == [{"kind": "resrep", "strength": 0.004}]
    assert method.resolve(once)["plugins"] == once["plugins"]
    tick = softprune.get_method("tick_tock").resolve({"plugins": [{"kind": "bn_l1"}]})
    assert tick["plugins"] == [{"kind": "tick", "batches": 20, "lr": 0.01}, {"kind": "bn_l1"}]


# -- DMCP -------------------------------------------------------------------------------------
def test_dmcp_marginals_are_products_of_the_transition_probabilities():
    from softprune.plugins.dmcp import markov_marginals

    alpha = torch.tensor([0.0, float(torch.log(torch.tensor(3.0)))])  # sigmoid: 0.5, 0.75
    assert torch.allclose(markov_marginals(alpha), torch.tensor([1.0, 0.5, 0.375]))


def test_dmcp_budget_loss_is_piecewise_log_around_the_target():
    from softprune.plugins.dmcp import flops_loss

    assert float(flops_loss(torch.tensor(0.3), 0.5)) == pytest.approx(math.log(0.2))
    assert float(flops_loss(torch.tensor(0.49), 0.5)) == 0.0  # within [0.95 T, T]
    assert float(flops_loss(torch.tensor(0.7), 0.5)) == pytest.approx(math.log(0.7 - 0.475))


def test_expected_macs_are_the_layers_macs_times_their_mean_keep_probabilities():
    p = softprune.Pruner(tiny(), "hfp", 0.3, 1, example_inputs=X, budget="macs")
    costs = p.view.cost_model
    keep = torch.ones(p.view.class_count)
    keep[p.prunable[0].classes] = 0.5  # conv1's six channels
    keep[p.prunable[1].classes] = torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0])  # conv2: half
    # conv1 1->6 (3x3, 8x8): 3456 MACs; conv2 6->8: 27648; fc 8->4: 32
    expected = 3456 * 0.5 + 27648 * 0.5 * 0.5 + 32 * 0.5
    assert float(costs.expected(keep)["macs"]) == pytest.approx(expected)


def _dmcp(model, **options):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    p = softprune.Pruner(model, "dmcp", 0.5, 3, opt, example_inputs=X,
                         plugins=[{"kind": "dmcp", "chunks": 2, **options}])  # fmt: skip
    return p, opt, next(q for q in p.plugins if q.name == "dmcp")


def test_dmcp_sandwich_pass_trains_only_the_narrow_networks_channels():
    model = tiny().train()
    p, opt, plugin = _dmcp(model, random_widths=0, warmup=10.0)  # the narrowest network only, no search
    assert plugin.chunk_of[1].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    x, y = batches(1, targets=True)[0]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    before = model.conv2.weight.grad.clone()
    plugin.before_optimizer_step(p.view)
    added = model.conv2.weight.grad - before
    assert float(added[4:].abs().max()) == 0.0  # conv2's second chunk is off in the narrowest network
    assert float(added[:4].abs().max()) > 0.0
    assert plugin.arch_steps == 0


def test_dmcp_sandwich_gradients_are_added_whole_or_over_the_number_of_passes():
    x, y = batches(1, targets=True)[0]
    added = {}
    for how in ("sum", "mean"):
        model = tiny().train()
        p, opt, plugin = _dmcp(model, random_widths=0, warmup=10.0, sandwich=how)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before = model.conv2.weight.grad.clone()
        plugin.before_optimizer_step(p.view)
        added[how] = model.conv2.weight.grad - before
    assert float(added["sum"].abs().max()) > 0
    assert torch.allclose(added["mean"], added["sum"] / 2, atol=1e-7)  # two passes: full and narrowest


def test_dmcp_searches_the_chains_and_keeps_the_prefixes_they_expect():
    model = tiny().train()
    p, opt, plugin = _dmcp(model, warmup=0.0)
    alpha0 = {i: a.detach().clone() for i, a in plugin.alphas.items()}
    for x, y in batches(3, targets=True) * 2:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert plugin.arch_steps == 6 and any(
        not torch.equal(a.detach(), alpha0[i]) for i, a in plugin.alphas.items()
    )
    for _ in range(3):
        p.step()
    for i, mask in enumerate(p.masks):  # what goes is a suffix of positions: the chain's last chunks
        pruned = torch.nonzero(mask.hard).view(-1).tolist()
        assert pruned == list(range(p.prunable[i].size - len(pruned), p.prunable[i].size))
    assert sum(int(m.hard.sum()) for m in p.masks) > 0 and not plugin._handles  # chosen: hooks gone
    small = p.compact()
    assert p.last_verification["max_abs_diff"] <= 1e-5 * p.last_verification["output_scale"]
    assert softprune.profile(small, X)["macs"] <= 0.5 * softprune.profile(tiny(), X)["macs"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"budget": "layer", "plugins": [{"kind": "dmcp", "chunks": 2}]},
            "method dmcp searches widths for a MACs target",
        ),
        ({}, "method dmcp needs layers of at least 10 channels"),  # Tiny's layers have 6 and 8
    ],
)
def test_dmcp_settings_it_cannot_use_are_one_line_errors(kwargs, message):
    with pytest.raises(SoftpruneError, match=message):
        softprune.Pruner(tiny(), "dmcp", 0.3, 2, example_inputs=X, **kwargs)


# -- BWCP -------------------------------------------------------------------------------------
def test_bwcp_newton_iteration_whitens_a_block():
    from softprune.plugins.bwcp import newton_inverse_sqrt

    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    sigma = a @ a.t() + 0.5 * torch.eye(5, dtype=torch.float64)
    values, vectors = torch.linalg.eigh(sigma / sigma.trace())
    exact = vectors @ torch.diag(values.rsqrt()) @ vectors.t()
    assert torch.allclose(newton_inverse_sqrt(sigma, 60), exact, atol=1e-6)
    # one step by hand: (3 I - Sigma_N) / 2
    assert torch.allclose(newton_inverse_sqrt(sigma, 1), (3 * torch.eye(5) - sigma / sigma.trace()) / 2)


def test_bwcp_activation_probability_is_phi_of_shift_over_scale():
    from softprune.plugins.bwcp import activation_probability

    gamma, beta = torch.tensor([2.0, 1.0, 0.5]), torch.tensor([2.05, 0.05, -0.45])
    p = activation_probability(torch.eye(3), gamma, beta, delta=0.05)
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    assert torch.allclose(p, torch.tensor([phi(1.0), 0.5, phi(-1.0)]), atol=1e-6)
    s = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])  # gammahat = S gamma
    assert abs(float(activation_probability(s, gamma, beta, 0.05)[1]) - phi((-0.4 - 0.05) / 1.5)) < 1e-6


def _bwcp(model, rate=0.3, steps=2, lr=0.1, **options):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    p = softprune.Pruner(
        model, "hfp", rate, steps, opt, example_inputs=X, criterion="bwcp",
        plugins=[{"kind": "bwcp", "group_size": 4, **options}],
    )  # fmt: skip
    return p, opt, next(q for q in p.plugins if q.name == "bwcp")


def test_bwcp_training_output_is_the_whitened_batchnorm_output_times_a_mask_in_0_1():
    model = tiny().train()
    _, _, plugin = _bwcp(model, iterations=30)
    seen = {}
    model.bn2.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out))
    model(batches(1, size=64)[0])
    out = seen["out"].detach()
    flat = out.transpose(0, 1).reshape(8, -1)
    # whitened blocks (channels 0-3 and 4-7): uncorrelated inside a block, up to the mask's scale
    corr = torch.corrcoef(flat[:4])
    assert float((corr - torch.diag(corr.diagonal())).abs().max()) < 0.05
    assert not torch.allclose(plugin.running[1], torch.eye(8))  # the running whitening moved
    assert plugin.running[1][:4, 4:].abs().max() == 0  # block diagonal


def test_bwcp_eval_mask_is_the_probability_or_the_papers_threshold():
    x = batches(1)[0]
    outs = {}
    for how in ("mean", "threshold"):
        model = tiny().eval()
        _, _, plugin = _bwcp(model, eval_mask=how)
        with torch.no_grad():
            model.bn1.bias.copy_(torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, 1.0]))
        seen = {}
        model.bn1.register_forward_hook(lambda m, a, out, seen=seen: seen.__setitem__("out", out))
        with torch.no_grad():
            model(x)
            plain = F.batch_norm(model.conv1(x), model.bn1.running_mean, model.bn1.running_var,
                                 model.bn1.weight, model.bn1.bias, False, 0.0, model.bn1.eps)  # fmt: skip
        outs[how] = (seen["out"], plain)
    # running whitening is the identity at first: p = Phi((beta - 0.05) / |gamma|) with gamma = 1
    beta = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, 1.0])
    p = 0.5 * (1 + torch.erf((beta - 0.05) / math.sqrt(2)))
    out, plain = outs["mean"]
    assert torch.allclose(out, plain * p.view(1, -1, 1, 1), atol=1e-6)
    out, plain = outs["threshold"]  # channels 1 and 3 (p = Phi(-1.05)) are zero, the others whole
    assert float(out[:, [1, 3]].abs().max()) == 0.0
    assert torch.allclose(out[:, [0, 2, 4, 5]], plain[:, [0, 2, 4, 5]], atol=1e-6)


def test_bwcp_training_mask_is_a_sample_or_the_probability_itself():
    x = batches(1, size=64)[0]
    outs = {}
    for how in ("sample", "mean"):
        model = tiny().train()
        _, _, plugin = _bwcp(model, train_mask=how, iterations=30)
        seen = {}
        model.bn1.register_forward_hook(lambda m, a, out, seen=seen: seen.__setitem__("out", out))
        model(x)
        outs[how] = seen["out"].detach()
    # train_mask mean: the whitened output times p, no noise; a sample of the mask differs from it
    model = tiny().train()
    _, _, plugin = _bwcp(model, train_mask="mean", iterations=30)
    y = F.batch_norm(model.conv1(x), None, None, model.bn1.weight, model.bn1.bias, True).detach()
    s = plugin._batch_whitening(y)
    from softprune.plugins.bwcp import activation_probability

    p = activation_probability(s, model.bn1.weight.float(), model.bn1.bias.float(), plugin.delta).detach()
    expected = torch.movedim(torch.movedim(y, 1, -1) @ (p.unsqueeze(1) * s).t(), -1, 1)
    assert torch.allclose(outs["mean"], expected, atol=1e-4)
    assert not torch.allclose(outs["sample"], expected, atol=1e-2)


def test_bwcp_sparsity_term_adds_l1_sign_gamma_and_l2_to_the_batchnorm_gradients():
    model = tiny().train()
    p, opt, plugin = _bwcp(model, l1=0.01, l2=0.02, warmup=0.0)
    x, y = batches(1, targets=True)[0]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    task_w, task_b = model.bn1.weight.grad.clone(), model.bn1.bias.grad.clone()
    gamma = model.bn1.weight.detach().clone()
    plugin.before_optimizer_step(p.view)
    assert torch.allclose(model.bn1.weight.grad, task_w + 0.01 * torch.sign(gamma))
    assert torch.allclose(model.bn1.bias.grad, task_b + 0.02)


def test_bwcp_removes_the_least_probable_channels_and_merges_the_whitening_exactly():
    model = tiny().train()
    _randomize_batchnorm(model)
    p, opt, plugin = _bwcp(model, rate=0.5, steps=1)
    for x, y in batches(3, targets=True):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    probabilities = [plugin._scorer(i)(g.size) for i, g in enumerate(p.prunable)]
    x = torch.randn(4, 1, 8, 8)
    p.step()
    for prob, mask in zip(probabilities, p.masks):
        assert float(prob[mask.hard].max()) <= float(prob[~mask.hard].min())  # the lowest go
    assert not model.bn1._forward_hooks and plugin.summary()["merged"] == 2
    with torch.no_grad():
        masked = model.eval()(x)
    small = p.compact()
    assert small.conv1.out_channels == 3 and small.conv2.out_channels == 4
    with torch.no_grad():
        assert torch.allclose(small.eval()(x), masked, atol=1e-5)


def test_bwcp_without_batchnorm_and_with_bad_options_are_one_line_errors():
    with pytest.raises(
        SoftpruneError, match="method bwcp needs convolutions followed directly by a BatchNorm"
    ):
        softprune.Pruner(NoBN(), "bwcp", 0.3, 2, example_inputs=X)
    with pytest.raises(SoftpruneError, match=r"bwcp tau must be a number >= 1e-06, got 0"):
        _bwcp(tiny(), tau=0)


# -- CONet ---------------------------------------------------------------------------------------------
def _low_rank(rows, cols, rank, noise, seed):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=g))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g))
    values = torch.zeros(rows)
    values[:rank] = torch.linspace(10.0, 6.0, rank)
    return u @ torch.diag(values) @ v[:, :rows].t() + noise * torch.randn(rows, cols, generator=g)


def test_evbmf_finds_the_rank_and_the_noise_of_a_low_rank_matrix():
    from softprune.plugins.conet import evbmf

    signal = _low_rank(40, 90, 3, 0.1, seed=0)
    kept, sigma2 = evbmf(signal)
    assert kept.numel() == 3 and abs(sigma2 - 0.01) < 0.001  # the noise's variance, estimated
    assert torch.allclose(kept, torch.tensor([10.0, 8.0, 6.0]), atol=0.1)  # shrunk slightly
    assert evbmf(signal.t())[0].numel() == 3  # either orientation
    assert evbmf(0.1 * torch.randn(40, 90, generator=torch.Generator().manual_seed(1)))[0].numel() == 0
    assert evbmf(_low_rank(6, 9, 2, 0.0, seed=2))[0].numel() == 2  # no noise at all


def test_conet_rank_slope_direction_and_need_by_hand():
    from softprune.plugins.conet import CONet, rank_slope

    assert rank_slope([0.1, 0.3, 0.5, 0.4]) == pytest.approx(0.4 / (2 + 1e-4))
    assert rank_slope([0.5, 0.4, 0.3]) == 0.0  # the rank never rose above the first epoch's
    step, rank = CONet(delta=0.02, condition=10.0, factor=0.2), CONet(factor=0.2, widths="rank")
    for plugin in (step, rank):
        plugin.history = {0: [0.2, 0.5], 1: [0.5, 0.505], 2: [0.2, 0.6]}
        plugin.conditions = {0: 3.0, 1: 3.0, 2: 12.0}
        assert [plugin.direction(i) for i in range(3)] == [1, -1, -1]  # grows; flat slope; bad condition
        assert plugin.need(3, 16) == 16.0  # never measured: the whole group
    assert [step.need(i, 10) for i in range(3)] == pytest.approx([12.0, 8.0, 8.0])
    assert [rank.need(i, 10) for i in range(3)] == pytest.approx([0.5 * 12, 0.505 * 8, 0.6 * 8])


def test_conet_keeps_widths_in_proportion_to_each_layers_need_and_the_smallest_filters_go_first():
    from softprune.plugins.conet import rank_measures

    model = tiny()
    with torch.no_grad():  # conv1: rank 2 of 6 plus a little noise; the consumer conv2 is random
        model.conv1.weight.copy_(_low_rank(6, 9, 2, 1e-3, seed=3).view(6, 1, 3, 3))
        model.conv2.weight.copy_(_low_rank(8, 54, 6, 1e-3, seed=4).view(8, 6, 3, 3))
    p = softprune.Pruner(
        model,
        "conet",
        0.5,
        1,
        example_inputs=X,
        budget="global",
        plugins=[{"kind": "conet", "widths": "rank"}],
    )
    plugin = next(q for q in p.plugins if q.name == "conet")
    ratio, _ = rank_measures(p.prunable[0], model)
    assert ratio == pytest.approx((2 / 6 + 0 / 6) / 2)  # producer rank 2 of 6, random consumer none
    norms = [softprune.criteria.L2().scores(g, model) for g in p.prunable]
    p.step()
    needs = [plugin.need(i, g.size) for i, g in enumerate(p.prunable)]
    kept = [int((~m.hard).sum()) for m in p.masks]
    assert sum(kept) == 14 - 7  # the global budget: half of all units
    # one threshold tau across layers: group g keeps ceil(tau * need_g) units
    taus = [(k - 1) / n for k, n in zip(kept, needs)], [k / n for k, n in zip(kept, needs)]
    assert max(taus[0]) < min(taus[1])
    for norm, mask in zip(norms, p.masks):  # in each group, the smallest filters went
        if mask.hard.any():
            assert float(norm[mask.hard].max()) <= float(norm[~mask.hard].min())


def test_conet_resumes_its_rank_history_and_refuses_a_layer_budget():
    model = tiny()
    p = softprune.Pruner(model, "conet", 0.5, 3, example_inputs=X)
    p.step()
    again = softprune.Pruner(tiny(), "conet", 0.5, 3, example_inputs=X)
    again.load_state_dict(p.state_dict())
    mine, theirs = (next(q for q in r.plugins if q.name == "conet") for r in (again, p))
    assert mine.history == theirs.history and len(mine.history[0]) == 1
    with pytest.raises(SoftpruneError, match="method conet .* needs a budget across layers .* not 'layer'"):
        softprune.Pruner(tiny(), "conet", 0.5, 1, example_inputs=X, budget="layer")
    with pytest.raises(SoftpruneError, match=r"conet factor must be a number in \[0.0, 1.0\), got 1.5"):
        softprune.Pruner(
            tiny(), "conet", 0.5, 1, example_inputs=X, plugins=[{"kind": "conet", "factor": 1.5}]
        )


# -- C2S2 ----------------------------------------------------------------------------------------------
def _train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _c2s2(model, rate=0.5, steps=4, lr=0.1, **options):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    p = softprune.Pruner(
        model,
        "c2s2",
        rate,
        steps,
        opt,
        example_inputs=X,
        budget="global",
        plugins=[{"kind": "c2s2", **options}],
    )
    return p, opt, next(q for q in p.plugins if q.name == "c2s2")


def test_c2s2_forward_applies_the_real_factor_and_the_binary_copy_counts_what_it_would_mask():
    model = tiny().train()
    _, _, plugin = _c2s2(model)
    w = torch.tensor([1.0, 0.4, 0.7, 0.5, 0.9, 0.2])
    with torch.no_grad():
        plugin.factors[0].copy_(w)
    seen = {}
    model.bn1.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out))
    x = batches(1)[0]
    model(x).sum().backward()
    plain = F.batch_norm(model.conv1(x), None, None, model.bn1.weight, model.bn1.bias, True)
    assert torch.allclose(seen["out"], plain * w.view(1, -1, 1, 1), atol=1e-5)
    assert float(plugin.factors[0].grad.abs().min()) > 0  # every channel's factor learns
    assert torch.equal(plugin.binary(0), torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0]))  # 1[w > 0.5]
    assert plugin.summary()["binary_copy_off"] == 3


def test_c2s2_sparsity_is_weighted_by_each_channels_macs_and_layers_start_in_turn():
    model = tiny().train()
    p, opt, plugin = _c2s2(model, strength=0.01, span=0.5, steps=4)
    # a conv1 channel: 9 x 64 MACs of its own + 8 x 9 x 64 in conv2; a conv2 channel: 6 x 9 x 64 + 4 in fc
    units = torch.tensor([5184.0] * 6 + [3460.0] * 8)
    assert torch.allclose(torch.cat([plugin.costs[0], plugin.costs[1]]), units / units.mean(), atol=1e-5)
    assert plugin.starts == {0: 0.0, 1: 0.25}  # group 1 starts at step 1 of 4
    x, y = batches(1, targets=True)[0]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    task = plugin.factors[0].grad.clone()
    opt.step()  # step 0: only group 0 trains
    expected = (1.0 - 0.1 * (task + 0.01 * plugin.costs[0])).clamp(0.0, 1.0)
    assert torch.allclose(plugin.factors[0].detach(), expected, atol=1e-6)
    assert torch.equal(plugin.factors[1].detach(), torch.ones(8))


def test_c2s2_removes_the_lowest_factors_and_the_compact_model_equals_the_trained_one():
    model = tiny().train()
    p, opt, plugin = _c2s2(model, strength=0.5, steps=1, span=0.0)
    _train(model, opt, batches(3, targets=True))
    factors = [plugin.factors[i].detach().clone() for i in (0, 1)]
    assert 0.0 < float(torch.cat(factors).min()) < 0.9  # the sparsity term moved them
    gamma = model.bn1.weight.detach().clone()
    p.step()
    kept = ~p.masks[0].hard  # folded into the BatchNorm (the removed channels are zero)
    assert torch.allclose(model.bn1.weight.detach()[kept], (gamma * factors[0])[kept])
    for w, mask in zip(factors, p.masks):
        assert float(w[mask.hard].max()) <= float(w[~mask.hard].min())  # the lowest go
    # 7 of the 14 by the lowest factors, but max_rate 0.9 keeps one of conv1's 6: 5 there, 1 in conv2
    assert [int(m.hard.sum()) for m in p.masks] == [5, 1] and not model.bn1._forward_hooks
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        masked = model.eval()(x)
        small = p.compact()
        assert torch.allclose(small.eval()(x), masked, atol=1e-5)


def test_c2s2_folds_its_factors_exactly_when_compacted_without_a_step():
    model = tiny().train()
    p, opt, plugin = _c2s2(model, strength=0.5, steps=1, span=0.0)
    _train(model, opt, batches(3, targets=True))
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        trained = model.eval()(x)  # the pruning layers' factors applied by the hooks
        small = p.compact()
        assert not model.bn1._forward_hooks and float((plugin.factors[0] - 1).abs().max()) > 0.01
        assert torch.allclose(small.eval()(x), trained, atol=1e-5)


def test_c2s2_without_batchnorm_and_with_bad_options_are_one_line_errors():
    with pytest.raises(
        SoftpruneError, match="method c2s2 needs layers whose every producer is followed by a BatchNorm"
    ):
        softprune.Pruner(NoBN(), "c2s2", 0.3, 2, example_inputs=X, budget="global")
    with pytest.raises(SoftpruneError, match=r"c2s2 threshold must be a number in \[0.0, 1.0\), got 1.5"):
        _c2s2(tiny(), threshold=1.5)
