"""Plugins: the Pruner calls each hook at its point of training with a view of the groups and masks."""

import pytest
import torch
from torch import nn

import softprune
from softprune.errors import SoftpruneError
from softprune.plugins import PLUGINS, Plugin, make_plugin
from softprune.plugins.regularizers import BNL1, make_regularizer


class Recorder(Plugin):
    """Counts its hooks and what the view showed it."""

    name = "recorder"

    def __init__(self, tag: str = "x") -> None:
        self.tag = tag
        self.calls = {"attach": 0, "before": 0, "after": 0, "pruned": [], "compaction": 0}
        self.grads_seen = 0

    def attach(self, view):
        self.calls["attach"] += 1
        self.groups = len(view.groups)

    def before_optimizer_step(self, view):
        self.calls["before"] += 1
        self.grads_seen += sum(p.grad is not None for p in view.model.parameters())

    def after_optimizer_step(self, view):
        self.calls["after"] += 1

    def before_pruning_step(self, view):
        self.calls.setdefault("order", []).append("before_pruning_step")

    def after_selection(self, view, previous_hard):
        # the new masks are chosen, the weights not masked yet: the newly hard filters still hold values
        new = [m.hard & ~old for m, old in zip(view.masks, previous_hard)]
        weight = view.model[0].weight
        live = sum(float(weight[n].abs().sum()) > 0 for n in new[0].nonzero().view(-1))
        self.calls.setdefault("order", []).append(("after_selection", int(new[0].sum()), live))

    def after_pruning_step(self, view, report):
        self.calls.setdefault("order", []).append("after_pruning_step")
        self.calls["pruned"].append((view.step, report.t, view.counts()[1] + view.counts()[2]))

    def before_compaction(self, view):
        self.calls["compaction"] += 1

    def options(self):
        return {"tag": self.tag}

    def state_dict(self):
        return {"before": self.calls["before"]}

    def load_state_dict(self, state):
        self.calls["before"] = state["before"]


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))


def _train(net, opt, steps):
    for _ in range(steps):
        opt.zero_grad()
        net(torch.randn(2, 3, 6, 6)).square().mean().backward()
        opt.step()


def test_hooks_run_at_their_points_with_the_view():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(1, 3, 6, 6)
    with PLUGINS.temporarily("recorder", Recorder):
        pruner = softprune.Pruner(
            net, "sfp", 0.5, 2, opt, example_inputs=x, plugins=[{"kind": "recorder", "tag": "a"}]
        )
    (plugin,) = pruner.plugins
    assert isinstance(plugin, Recorder) and plugin.tag == "a"
    assert plugin.calls["attach"] == 1 and plugin.groups == len(pruner.prunable) == 1
    _train(net, opt, 3)
    assert (plugin.calls["before"], plugin.calls["after"]) == (3, 3)
    assert plugin.grads_seen == 3 * len(list(net.parameters()))  # gradients are there before the step
    pruner.step()
    _train(net, opt, 2)
    pruner.step()
    assert plugin.calls["pruned"] == [(1, 0, 4), (2, 1, 4)]  # after the masks are set, t advanced
    step = ["before_pruning_step", ("after_selection", 0, 0), "after_pruning_step"]  # SFP: soft only
    assert plugin.calls["order"] == step + step
    pruner.compact()
    assert plugin.calls["compaction"] == 1
    # compact() makes the 4 selected units hard: the plugin sees them before they are zeroed
    assert plugin.calls["order"][-1] == ("after_selection", 4, 4)


def test_compensation_is_a_plugin_built_from_the_setting_and_saved_with_the_settings():
    x = torch.randn(1, 3, 6, 6)
    pruner = softprune.Pruner(_net(), "hfp", 0.5, 2, example_inputs=x, compensate="weights")
    (plugin,) = pruner.plugins
    assert isinstance(plugin, softprune.Compensator) and plugin.options() == {
        "source": "weights",
        "ridge": 1e-4,
    }
    assert pruner.state_dict()["plugins"] == []  # rebuilt from the settings, as before it was a plugin
    assert isinstance(make_plugin({"kind": "compensate", "source": "weights"}), softprune.Compensator)
    with pytest.raises(SoftpruneError, match="fits the next layers on calibration data"):
        softprune.Pruner(_net(), "hfp", 0.5, 2, example_inputs=x, compensate="activations")


def _gate_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4)
    )


def test_the_tick_plugin_is_a_tick_by_hand_before_every_step():
    import torch.nn.functional as F

    torch.manual_seed(1)
    data = [(torch.randn(4, 3, 6, 6), torch.randint(0, 4, (4,))) for _ in range(3)]
    x = data[0][0][:1]

    def run(plugin: bool):
        net = _gate_net().train()
        kw = {"plugins": [{"kind": "tick", "batches": 2, "lr": 0.05}]} if plugin else {}
        pruner = softprune.Pruner(net, "hfp", 0.5, 2, example_inputs=x, criterion="taylor", calibration=data,
                                  loss_fn=F.cross_entropy, **kw)  # fmt: skip
        for _ in range(2):
            if not plugin:
                pruner.tick(data[:2], lr=0.05)
            pruner.step()
        return net, pruner

    auto, p_auto = run(True)
    by_hand, p_hand = run(False)
    assert [m.hard.tolist() for m in p_auto.masks] == [m.hard.tolist() for m in p_hand.masks]
    assert all(torch.equal(a, b) for a, b in zip(auto.state_dict().values(), by_hand.state_dict().values()))
    assert not torch.equal(auto[1].weight, _gate_net()[1].weight)  # the gates trained
    assert p_auto.state_dict()["plugins"] == [
        {"kind": "tick", "batches": 2, "lr": 0.05, "momentum": 0.9, "state": {}}
    ]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"criterion": "l2"}, "needs a criterion that scores gradients; criterion 'l2' does not use them"),
        ({"criterion": "taylor", "calibration": None}, "trains the gates on calibration batches"),
        ({"criterion": "taylor", "interval": 3}, "runs before pruning steps at epoch ends"),
    ],
)
def test_the_tick_plugin_refuses_what_it_cannot_do(settings, message):
    import torch.nn.functional as F

    data = [(torch.randn(4, 3, 6, 6), torch.randint(0, 4, (4,)))]
    kw = {"calibration": data, "loss_fn": F.cross_entropy, **settings}
    with pytest.raises(SoftpruneError, match=message):
        softprune.Pruner(_gate_net(), "hfp", 0.5, 2, example_inputs=data[0][0][:1], plugins=["tick"], **kw)
    with pytest.raises(SoftpruneError, match="tick batches must be a positive integer"):
        make_plugin({"kind": "tick", "batches": 0})


def test_a_refused_pruner_leaves_the_optimizer_unhooked():
    # a plugin that refuses at attach comes after the regularizer: the user's optimizer must not be
    # left calling a half-built pruner (here: adding its L1 penalty to every later step)
    net = _gate_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    with pytest.raises(SoftpruneError, match="needs a criterion that scores gradients"):
        softprune.Pruner(net, "hfp", 0.5, 2, opt, example_inputs=torch.randn(1, 3, 6, 6), plugins=["tick"],
                         regularizer={"kind": "bn_l1", "strength": 0.5})  # fmt: skip
    opt.zero_grad()
    net(torch.randn(2, 3, 6, 6)).square().mean().backward()
    before = net[1].weight.grad.clone()
    opt.step()
    assert torch.equal(net[1].weight.grad, before)


def test_plugin_state_is_saved_and_a_different_set_of_plugins_is_refused():
    x = torch.randn(1, 3, 6, 6)
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with PLUGINS.temporarily("recorder", Recorder):
        pruner = softprune.Pruner(net, "sfp", 0.5, 2, opt, example_inputs=x, plugins=["recorder"])
        _train(net, opt, 2)
        state = pruner.state_dict()
        assert state["plugins"] == [{"kind": "recorder", "tag": "x", "state": {"before": 2}}]
        again = softprune.Pruner(_net(), "sfp", 0.5, 2, example_inputs=x, plugins=[Recorder()])
        again.load_state_dict(state)
        assert again.plugins[0].calls["before"] == 2
    bare = softprune.Pruner(_net(), "sfp", 0.5, 2, example_inputs=x)
    with pytest.raises(SoftpruneError, match=r"saved with plugins \['recorder'\], this pruner has \[\]"):
        bare.load_state_dict(state)
    assert "recorder" not in PLUGINS  # the temporary registration is gone


def test_regularizers_are_plugins_by_name_and_only_regularizers_are_regularizers():
    assert isinstance(make_plugin({"kind": "bn_l1", "strength": 1e-3}), BNL1)
    assert make_regularizer("bn_l1").strength == 1e-4
    with PLUGINS.temporarily("recorder", Recorder):
        with pytest.raises(SoftpruneError, match="'recorder' is a plugin but not a regularizer"):
            make_regularizer("recorder")
    with pytest.raises(SoftpruneError, match="unknown plugin 'bn_l2'"):
        make_plugin("bn_l2")


def test_a_regularizer_reaches_the_gradients_through_the_plugin_hook():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # lr 0: the step changes nothing, gradients stay
    x = torch.randn(1, 3, 6, 6)
    pruner = softprune.Pruner(
        net, "sfp", 0.5, 2, opt, example_inputs=x, regularizer={"kind": "bn_l1", "strength": 0.5}
    )
    opt.zero_grad()
    net(torch.randn(2, 3, 6, 6)).square().mean().backward()
    before = net[1].weight.grad.clone()
    opt.step()
    assert pruner.plugins == [pruner.regularizer]
    assert torch.allclose(
        net[1].weight.grad - before, 0.5 * torch.sign(net[1].weight.detach()).double().float()
    )


def test_the_writing_a_method_guide_runs_and_its_plugin_resets_exactly_the_selected_filters():
    from pathlib import Path

    from softprune.methods import METHODS

    guide = (Path(__file__).resolve().parents[1] / "docs" / "writing_a_method.md").read_text()
    blocks = [b.split("```", 1)[0] for b in guide.split("```python\n")[1:]]
    assert len(blocks) == 3
    namespace: dict = {}
    try:
        for block in blocks:
            exec(compile(block, "writing_a_method.md", "exec"), namespace)
        pruner, model = namespace["pruner"], namespace["model"]
        plugin = pruner.plugins[0]
        assert softprune.list_methods().count("sfp_reset") == 1
        # known answer: after the hook, the selected filters' gradient is zero, the others' unchanged
        net = softprune.create_model("resnet20")
        p = softprune.Pruner(net, "sfp_reset", 0.4, 2)  # the method brings its plugin
        p.step()
        net(torch.randn(4, 3, 32, 32)).sum().backward()
        before = net.conv1.weight.grad.clone()
        p.plugins[0].before_optimizer_step(p.view)
        member = p.prunable[0].members_with(softprune.graph.Role.FILTER)[0]
        assert member.qualname == "conv1.weight"
        soft = p.masks[0].soft[member.unit]  # conv1's rows: its 16 units of the 64 of its residual stream
        assert net.conv1.weight.grad[soft].abs().max() == 0 and bool(soft.any())
        assert torch.equal(net.conv1.weight.grad[~soft], before[~soft])
        assert plugin.resets > 0 and model is pruner.model and len(p.plugins) == 1
        # a caller's plugin of the method's kind sets its options; others come after the method's
        both = softprune.Pruner(
            softprune.create_model("resnet20"),
            "sfp_reset",
            0.4,
            2,
            plugins=[{"kind": "reset_selected", "scale": 0.5}, {"kind": "bn_l1"}],
        )
        assert [q.name for q in both.plugins] == ["reset_selected", "bn_l1"] and both.plugins[0].scale == 0.5
    finally:
        for registry, name in ((PLUGINS, "reset_selected"), (METHODS, "sfp_reset")):
            if name in registry:
                registry.unregister(name)


def test_every_plugin_reports_the_options_it_was_built_with_and_is_rebuilt_from_them():
    for kind in PLUGINS.names():
        options = make_plugin(kind).options()
        assert options, kind  # every built-in plugin has settings a checkpoint must record
        again = make_plugin({"kind": kind, **options})
        assert again.options() == options, kind
    changed = make_plugin({"kind": "bwcp", "tau": 0.25, "eval_mask": "threshold"}).options()
    assert changed["tau"] == 0.25 and changed["eval_mask"] == "threshold" and changed["group_size"] == 16
