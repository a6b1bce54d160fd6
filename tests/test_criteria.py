"""Criteria: scores against hand computations on small groups."""

import copy
import math

import pytest
import torch
from torch import nn

import softprune
from softprune.criteria import make_criterion
from softprune.errors import SoftpruneError
from softprune.graph import analyze, build_groups, selector


def _group(weight: torch.Tensor):
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[2], bias=False)
    model = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(weight.shape[0], 2, 1))
    with torch.no_grad():
        conv.weight.copy_(weight)
    a = analyze(model, (torch.randn(1, weight.shape[1], 5, 5),))
    groups = build_groups(a, selector())
    return model, [g for g in groups if g.producers == ["0"]][0]


def test_l1_and_l2_are_filter_norms():
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3)
    model, group = _group(w)
    assert torch.allclose(make_criterion("l1").scores(group, model), w.abs().sum((1, 2, 3)))
    assert torch.allclose(make_criterion("l2").scores(group, model), w.flatten(1).norm(dim=1))


def test_fpgm_scores_are_relative_distance_sums_and_pick_the_filter_at_the_median():
    torch.manual_seed(0)
    w = torch.randn(5, 2, 3, 3) * 3
    w[4] = w[:4].mean(0)  # the geometric median of a symmetric set is near the mean
    model, group = _group(w)
    flat = w.flatten(1)
    sums = torch.cdist(flat, flat).sum(1)
    expected = sums / sums.mean()
    scores = make_criterion("fpgm").scores(group, model)
    assert torch.allclose(scores, expected, rtol=1e-5)
    assert int(scores.argmin()) == 4
    # the norm criterion would not pick it: the mean of random filters has a small norm, but not the smallest here
    cosine = make_criterion("fpgm", metric="cosine").scores(group, model)
    unit = flat / flat.norm(dim=1, keepdim=True)
    cosine_sums = (1 - unit @ unit.T).sum(1)
    assert torch.allclose(cosine, cosine_sums / cosine_sums.mean(), atol=1e-5)


def test_fpgm_compares_a_filter_only_with_the_filters_its_layer_has():
    # ResNet-20's residual stream is one group of 64 units; the 16-wide layers behind zero-padded
    # shortcuts have units 0..15 only. The stem's units are scored among the stem's 16 filters, not
    # against 48 zero rows (which would add 48 times each filter's norm to its score), and each
    # member's scores are relative to its own mean, so members of other widths and scales weigh alike.
    torch.manual_seed(0)
    model = softprune.create_model("resnet20")
    pruner = softprune.Pruner(model, "sfp", 0.4, 1, residual="coupled")
    stream = max(pruner.prunable, key=lambda g: len(g.producers))
    first = make_criterion("fpgm", aggregate="first").scores(stream, model)
    stem = model.conv1.weight.detach().flatten(1)
    sums = torch.cdist(stem, stem).sum(1)
    assert torch.allclose(first[:16], sums / sums.mean(), rtol=1e-5)
    assert torch.all(first[16:] == 0)  # the stem has no such units
    scaled = copy.deepcopy(model)
    scaled.layer3[2].conv2.weight.data *= 10  # a member's weight scale does not change the scores
    mean = make_criterion("fpgm").scores(stream, model)
    assert torch.allclose(make_criterion("fpgm").scores(stream, scaled), mean, rtol=1e-4)


def test_fpgm_mix_takes_a_share_by_norm_then_the_rest_by_distance():
    torch.manual_seed(0)
    w = torch.randn(10, 2, 3, 3)
    w[7] *= 0.01  # smallest norm
    model, group = _group(w)
    order = make_criterion("fpgm_mix", norm_fraction=0.25).rank(group, model, 4)
    assert int(order[0]) == 7  # floor(4 * 0.25) = 1 filter by norm
    flat = w.flatten(1)
    rest = [i for i in range(10) if i != 7]
    dist = torch.cdist(flat[rest], flat[rest]).sum(1)
    by_distance = [rest[i] for i in torch.argsort(dist).tolist()]
    assert order[1:4].tolist() == by_distance[:3]


def test_aggregates_over_a_coupled_group():
    torch.manual_seed(0)
    model = softprune.create_model("resnet20")
    pruner = softprune.Pruner(model, "sfp", 0.4, 1, residual="coupled")
    stream = max(pruner.prunable, key=lambda g: len(g.producers))
    mean = make_criterion("l2").scores(stream, model)
    first = make_criterion("l2", aggregate="first").scores(stream, model)
    stem = model.conv1.weight.detach().flatten(1).norm(dim=1)
    assert torch.allclose(first[:16], stem)  # the stem writes units 0..15
    assert torch.all(first[16:] == 0)
    total = make_criterion("l2", aggregate="sum").scores(stream, model)
    biggest = make_criterion("l2", aggregate="max").scores(stream, model)
    assert torch.all(total >= mean - 1e-6) and torch.all(biggest >= mean - 1e-6)
    assert not math.isinf(float(biggest.min()))


def test_unknown_criterion_and_options_are_errors():
    with pytest.raises(SoftpruneError, match="unknown criterion 'fpmg'.*Did you mean 'fpgm'"):
        make_criterion("fpmg")
    with pytest.raises(SoftpruneError, match="unknown aggregate"):
        make_criterion("l2", aggregate="median")
    with pytest.raises(
        SoftpruneError, match="criterion 'l1' has no option 'metric'; its options are: aggregate"
    ):
        make_criterion("l1", metric="l2")
