"""The run config schema: defaults, overrides, and every failure as a clear error."""

import pytest

import softprune
from softprune.errors import SoftpruneError
from softprune.train.config import RunConfig, config_from_dict, load_config, parse_override


def test_defaults_are_the_papers_cifar_recipe():
    c = config_from_dict({})
    assert isinstance(c, RunConfig)
    t = c.train
    assert (t.epochs, t.batch_size, t.lr, t.momentum, t.nesterov, t.weight_decay) == (
        200,
        128,
        0.1,
        0.9,
        True,
        5e-4,
    )
    assert (t.schedule, t.milestones, t.gamma) == ("multistep", [60, 120, 160], 0.2)


def test_overrides_parse_yaml_values_and_nest():
    c = config_from_dict(
        {"prune": {"rate": 0.3}},
        [
            "prune.rate=0.25",
            "train.milestones=[10, 20]",
            "prune.decay={kind: exponential, sigma: 0.001}",
            "data.root=null",
        ],
    )
    assert c.prune.rate == 0.25 and c.train.milestones == [10, 20]
    assert c.prune.decay == {"kind": "exponential", "sigma": 0.001} and c.data.root is None
    assert parse_override("a.b=x=y") == (["a", "b"], "x=y")


@pytest.mark.parametrize(
    "data,message",
    [
        ({"prune": {"method": "hhfp"}}, "'prune.method' has value 'hhfp'; expected one of"),
        ({"trian": {}}, "unknown config key 'trian'. Did you mean 'train'?"),
        ({"train": {"lr": "fast"}}, "'train.lr' has value 'fast'; expected a number"),
        ({"train": {"nesterov": "yes"}}, "'train.nesterov' has value 'yes'; expected true or false"),
        ({"train": {"milestones": [60, "x"]}}, "'train.milestones' has value"),
        ({"train": {"milestones": [120, 60]}}, "must be increasing"),
        ({"train": 5}, "section 'train' must be a mapping"),
        ({"prune": {"every_epochs": 300}}, "leaves no pruning step"),
        ({"name": "a/b"}, "must be a plain folder name"),
        ({"train": {"device": "tpu"}}, "expected auto, cpu, cuda or cuda:N"),
        ({"prune": {"recalibrate_bn": -1}}, "must be >= 0"),
    ],
)
def test_bad_configs_name_the_key_the_value_and_what_is_allowed(data, message):
    with pytest.raises(
        SoftpruneError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    ):
        config_from_dict(data)


def test_a_config_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(SoftpruneError, match="must be a mapping of sections"):
        load_config(path)


def test_setting_a_key_below_a_value_is_an_error():
    with pytest.raises(SoftpruneError, match="'name' is not a section"):
        config_from_dict({"name": "run"}, ["name.x=1"])
    with pytest.raises(SoftpruneError, match="config key 'name' has value {'x': 1}; expected a string"):
        config_from_dict({}, ["name.x=1"])


def test_a_saved_config_resolves_to_itself_and_old_tick_keys_become_the_tick_plugin():
    tick = {"kind": "tick", "batches": 20, "lr": 0.01}
    config = config_from_dict({"prune": {"method": "tick_tock"}})
    again = config_from_dict(config.to_dict())  # a run folder's config.yaml, read back
    assert again == config and again.prune.plugins == [tick]  # the method's plugin is not added twice
    for method in softprune.list_methods():  # every method: bwcp's plugin has no options at all
        config = config_from_dict({"prune": {"method": method}})
        assert config_from_dict(config.to_dict()) == config, method
    old = {"prune": {"method": "hfp", "criterion": "taylor", "tick_batches": 5, "tick_lr": 0.1}}
    assert config_from_dict(old).prune.plugins == [{"kind": "tick", "batches": 5, "lr": 0.1}]
    assert config_from_dict({"prune": {"method": "sfp", "tick_batches": 0}}).prune.plugins == []
    with pytest.raises(SoftpruneError, match="every_iterations"):
        config_from_dict({"prune": {"method": "tick_tock", "every_iterations": 10}})


def test_a_method_by_name_brings_its_settings_and_the_config_adds_its_own():
    config = config_from_dict({"prune": {"method": "slimming", "max_rate": 0.7, "plugins": ["greg1"]}})
    p = config.prune
    assert (p.method, p.criterion, p.budget, p.max_rate) == ("slimming", "bn_scale", "global", 0.7)
    assert p.regularizer == {"kind": "bn_l1", "strength": 1e-4, "until": "pruned"} and p.plugins == ["greg1"]
    assert config_from_dict({"prune": {"method": "tick_tock"}}).prune.plugins == [
        {"kind": "tick", "batches": 20, "lr": 0.01}
    ]
    with pytest.raises(
        SoftpruneError,
        match="unknown plugin 'bn_l2'; choose one of: bn_l1, bwcp, c2s2, compensate, conet, dmcp, greg1, greg2, resrep, tick",
    ):
        config_from_dict({"prune": {"method": "sfp", "plugins": ["bn_l2"]}})


def test_ghfp_runs_end_with_an_epoch_without_pruning_steps_unless_told_otherwise():
    """prune.finetune_epochs left unset takes the method's: GHFP keeps its last epoch free of steps
    (at most train.epochs - 1, so a one-epoch run still prunes), the other methods none; a value the
    config gives wins and is what the saved config says."""
    tail = {m: config_from_dict({"prune": {"method": m}, "train": {"epochs": 6}}).prune.finetune_epochs
            for m in ("ghfp", "sfp", "hfp", "dense")}  # fmt: skip
    assert tail == {"ghfp": 1, "sfp": 0, "hfp": 0, "dense": 0}
    assert config_from_dict({"train": {"epochs": 1}}).prune.finetune_epochs == 0  # ghfp, one epoch
    given = config_from_dict({"prune": {"method": "ghfp", "finetune_epochs": 0}, "train": {"epochs": 6}})
    assert given.prune.finetune_epochs == 0
    assert config_from_dict(given.to_dict()).prune.finetune_epochs == 0
