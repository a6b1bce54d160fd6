"""The recipes in configs/ load, validate, and say what METHODS.md says."""

from pathlib import Path

import pytest

from softprune.errors import SoftpruneError
from softprune.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if not p.name.startswith("base"))


def test_every_paper_setting_has_a_recipe():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in RECIPES}
    for depth in (20, 32, 56, 110):
        for method in ("dense", "sfp", "asfp", "srfp", "asrfp", "ghfp", "fpgm"):
            assert f"cifar10/resnet{depth}_{method}.yaml" in names
    assert "fashion_mnist_ghfp.yaml" in names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_loads_and_validates(path):
    c = load_config(path)
    assert c.name and c.model.name
    if "cifar10" in path.parts:
        t, p = c.train, c.prune
        assert (t.epochs, t.batch_size, t.lr, t.momentum, t.nesterov, t.weight_decay) == (
            200,
            128,
            0.1,
            0.9,
            True,
            5e-4,
        )
        assert (t.milestones, t.gamma, c.data.name) == ([60, 120, 160], 0.2, "cifar10")
        assert c.model.name in path.stem and p.residual == "independent"
        if p.method != "dense":
            depth = int(c.model.name[6:])
            expected = 0.4 if depth == 56 or path.stem.endswith("fpgm") else 0.3
            assert p.rate == expected


def test_imagenet_recipes_follow_the_papers_settings():
    names = {p.stem for p in RECIPES if "imagenet" in p.parts}
    for depth in (18, 34, 50, 101):
        assert f"resnet{depth}_sfp" in names and f"resnet{depth}_fpgm_pretrained" in names
    for path in (p for p in RECIPES if "imagenet" in p.parts):
        c = load_config(path)
        t, p = c.train, c.prune
        pretrained = path.stem.endswith("_pretrained")
        assert (t.epochs, t.batch_size, t.weight_decay, t.milestones, t.gamma) == (
            100,
            256,
            1e-4,
            [30, 60, 90],
            0.1,
        )
        assert t.lr == (0.01 if pretrained else 0.1) and c.model.weights == (
            "DEFAULT" if pretrained else None
        )
        assert (c.data.name, c.data.image_size, p.residual, p.ignore) == (
            "imagefolder",
            224,
            "independent",
            ["*downsample*"],
        )
        assert p.rate == (0.4 if "fpgm40" in path.stem else 0.3) and c.model.name in path.stem


def test_imagenet_selection_keeps_the_projection_shortcuts_whole():
    import softprune

    prune = load_config(ROOT / "configs/imagenet/resnet18_sfp.yaml").prune
    model = softprune.create_model("resnet18", num_classes=10, input_size=64)
    pruner = softprune.Pruner(model, prune.method, prune.rate, 2, **prune.pruner_settings())
    producers = {name for g in pruner.prunable for name in g.producers}
    assert len(producers) == 17 and not any(
        "downsample" in name for name in producers
    )  # 20 convs, 3 shortcuts
    pruner.step()
    pruner.step()
    small = pruner.compact()
    assert pruner.last_verification["max_abs_diff"] <= 1e-5 * pruner.last_verification["output_scale"]
    assert small.layer2[0].downsample[0].out_channels == 128 and small.layer2[0].conv1.out_channels < 128


def test_fpgm_recipes_follow_the_paper_table():
    mix = load_config(ROOT / "configs/cifar10/resnet110_fpgm.yaml").prune
    only = load_config(ROOT / "configs/cifar10/resnet56_fpgm.yaml").prune
    assert (mix.criterion, mix.criterion_options, mix.rate) == ("fpgm_mix", {"norm_fraction": 0.25}, 0.4)
    assert (only.criterion, only.rate) == ("fpgm", 0.4)


def test_base_cycles_are_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(SoftpruneError, match="includes itself"):
        load_config(tmp_path / "a.yaml")
