"""Compaction during training: hard filters removed as soon as they are hard, training goes on."""

import copy

import pytest
import torch
import torch.nn.functional as F

import softprune
from softprune.check import max_difference
from softprune.pruner import rebind_scheduler


def _data(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)
    ]


def _run(compact_during: bool, residual: str, steps: int = 4):
    torch.manual_seed(0)
    model = softprune.create_model("resnet20")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    pruner = softprune.Pruner(model, "ghfp", 0.4, steps, optimizer=opt, residual=residual)
    sizes = []
    for _ in range(steps):
        for x, y in _data():
            pruner.optimizer.zero_grad()
            F.cross_entropy(pruner.model(x), y).backward()
            pruner.optimizer.step()
        sched.step()
        pruner.step()
        if compact_during:
            pruner.compact_hard()
            sched = rebind_scheduler(sched, pruner.optimizer)
        sizes.append(sum(p.numel() for p in pruner.model.parameters()))
    return pruner, sizes, sched


@pytest.mark.slow
@pytest.mark.parametrize("residual", ["coupled", "independent"])
def test_compaction_during_training_shrinks_the_model_and_keeps_the_schedule(residual):
    masked, masked_sizes, _ = _run(False, residual)
    shrunk, sizes, sched = _run(True, residual)
    hard = [r.hard for r in shrunk.history]
    for t in range(1, len(sizes)):  # smaller after every step that hardened units, the same otherwise
        assert (sizes[t] < sizes[t - 1]) == (hard[t] > hard[t - 1])
    assert masked_sizes[0] == masked_sizes[-1] > sizes[-1]
    assert masked.counts() == shrunk.counts()  # the schedule counts original widths
    assert [r.hard for r in masked.history] == hard
    assert sched.optimizer is shrunk.optimizer and shrunk.optimizer.param_groups[0]["lr"] == pytest.approx(
        0.0125
    )
    small_a, small_b = masked.compact(), shrunk.compact()
    dense = sum(p.numel() for p in softprune.create_model("resnet20").parameters())
    for small in (small_a, small_b):  # (independent residuals: the size depends on which units went)
        assert sum(p.numel() for p in small.parameters()) < 0.6 * dense


@pytest.mark.parametrize("residual", ["coupled", "independent"])
def test_the_epoch_after_compaction_trains_like_the_masked_model(residual):
    """Removing hard units changes nothing but the cost: the next epoch's losses agree to rounding.
    (Over many epochs rounding differences grow, as between any two builds of one network, and may
    flip near-ties between filters: the trajectories are the same up to float arithmetic.)"""
    losses = {}
    for compact_during in (False, True):
        torch.manual_seed(0)
        model = softprune.create_model("resnet20")
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        pruner = softprune.Pruner(model, "hfp", 0.4, 3, optimizer=opt, residual=residual)
        for x, y in _data():
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        pruner.step()
        if compact_during:
            pruner.compact_hard()
        run = []
        for x, y in _data():
            pruner.optimizer.zero_grad()
            loss = F.cross_entropy(pruner.model(x), y)
            loss.backward()
            pruner.optimizer.step()
            run.append(float(loss.detach()))
        losses[compact_during] = run
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_optimizer_state_is_cut_with_the_parameters():
    torch.manual_seed(0)
    model = softprune.create_model("resnet20")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    pruner = softprune.Pruner(model, "hfp", 0.5, 2, optimizer=opt, residual="independent")
    for x, y in _data(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    pruner.step()
    kept = torch.nonzero(~pruner.masks[0].hard).view(-1)  # the stem's filters
    before = opt.state[model.conv1.weight]["exp_avg_sq"][kept].clone()
    small = pruner.compact_hard()
    new_state = pruner.optimizer.state[small.conv1.weight]
    assert small.conv1.weight.shape[0] == kept.numel() == 8
    assert torch.equal(new_state["exp_avg_sq"], before) and int(new_state["step"]) == 2


@pytest.mark.slow
def test_resume_replays_the_compactions():
    pruner, _, _ = _run(True, "independent", steps=4)
    state = copy.deepcopy(pruner.state_dict())
    weights = copy.deepcopy(pruner.model.state_dict())
    fresh = softprune.Pruner(softprune.create_model("resnet20"), "ghfp", 0.4, 4, residual="independent")
    model = fresh.load_state_dict(state)
    model.load_state_dict(weights)
    x = torch.randn(2, 3, 32, 32)
    assert max_difference(pruner.model, model, (x,))[0] == 0.0
    assert fresh.counts() == pruner.counts() and fresh.compactions == pruner.compactions
    assert len(pruner.compactions) == sum(
        1 for a, b in zip([0] + [r.hard for r in pruner.history], [r.hard for r in pruner.history]) if b > a
    )


@pytest.mark.slow
def test_the_final_model_saves_and_loads_against_the_original_constructor(tmp_path):
    pruner, _, _ = _run(True, "coupled", steps=4)
    small = pruner.compact()
    path = softprune.save(small, tmp_path / "m.safetensors")
    back = softprune.load(path)  # built from create_model("resnet20"): the original architecture
    x = torch.randn(2, 3, 32, 32)
    assert max_difference(small, back, (x,))[0] == 0.0
