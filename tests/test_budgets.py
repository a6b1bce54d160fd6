"""Budgets: how a step's rate becomes the units each group gives up."""

import torch

import softprune
from softprune.budgets import Quota


def _quota_oracle(owners, is_producer, gone, order, hard, frozen, rate, n_sel):
    """The selection rule of Quota.pick written out unit by unit, row by row."""
    width = owners.sum(1)
    quota = torch.where(is_producer, torch.floor((width + gone) * rate + 1e-9).long() - gone, width)
    quota = torch.minimum(quota, width - 1).clamp(min=0)
    used = torch.zeros_like(width)
    picked = []
    for u in order.tolist():
        if len(picked) >= n_sel:
            break
        if frozen[u]:
            continue
        take = owners[:, u].long()
        if not hard[u] and bool((used + take > quota).any()):
            continue
        picked.append(u)
        used += take
    return picked


def test_selection_respects_every_producers_quota_like_the_rule_says():
    from softprune.models import resnet20

    torch.manual_seed(0)
    pruner = softprune.Pruner(resnet20(), "sfp", 0.5, 1, example_inputs=torch.randn(1, 3, 32, 32))
    # the stage-3 stream: 19 producers, stage-1 and stage-2 channels are subsets (padding shortcuts)
    quota = max((Quota.of(g) for g in pruner.prunable), key=lambda q: q.owners.shape[0])
    owners, is_producer = quota.owners, quota.is_producer
    assert owners.shape[0] >= 7 and not bool(owners.all())
    size = owners.shape[1]
    generator = torch.Generator().manual_seed(1)
    for trial in range(20):
        order = torch.randperm(size, generator=generator)
        hard = torch.rand(size, generator=generator) < 0.1
        frozen = torch.rand(size, generator=generator) < 0.05
        order = torch.cat([order[hard[order]], order[~hard[order]]])  # hard units come first
        rate, n_sel = 0.2 + 0.03 * trial, int(torch.randint(1, size, (1,), generator=generator))
        got = quota.pick(order, hard, frozen, rate, n_sel).tolist()
        assert got == _quota_oracle(owners, is_producer, quota.gone, order, hard, frozen, rate, n_sel)
