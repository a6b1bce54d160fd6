"""The recipes in configs/ load, validate, and say what METHODS.md says."""

from pathlib import Path

import pytest

from softprune.errors import SoftpruneError
from softprune.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.name != "base.yaml")


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
