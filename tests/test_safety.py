"""Files that load safely, and input that fails cleanly: malicious, truncated and wrong checkpoints;
random configs and command lines; bf16 autocast and channels-last with exact masks."""

import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import softprune
from softprune.cli import main
from softprune.errors import SoftpruneError
from softprune.train.checkpoint import load_checkpoint, save_checkpoint
from softprune.train.config import PruneConfig, RunConfig, config_from_dict, load_config
from softprune.train.engine import pruning_interval

RECIPE = Path(softprune.__file__).parent / "configs" / "fashion_mnist_ghfp.yaml"


class Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "softprune-checkpoint-1", "model": Exploit(marker)}, path)
    with pytest.raises(SoftpruneError, match="refusing to load .*could run code"):
        load_checkpoint(path)
    assert not marker.exists()


def test_a_plain_pickle_is_refused_too(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(pickle.dumps(Exploit(marker)))
    with pytest.raises(SoftpruneError, match=r"checkpoint\.pt"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_and_corrupt_checkpoints_give_one_line_errors(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint({"epoch": 1, "model": {"w": torch.randn(64, 64)}}, good)
    assert load_checkpoint(good)["epoch"] == 1
    data = good.read_bytes()
    for name, content in (
        ("truncated.pt", data[: len(data) // 3]),
        ("zeros.pt", b"\0" * 4096),
        ("text.pt", b"hello"),
    ):
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(SoftpruneError) as info:
            load_checkpoint(bad)
        message = str(info.value)
        assert (
            name in message
            and "\n" not in message
            and ("truncated or corrupt" in message or "corrupt" in message)
        )
    not_ours = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(3)}, not_ours)
    with pytest.raises(SoftpruneError, match="not a softprune checkpoint"):
        load_checkpoint(not_ours)


def test_saving_over_a_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"epoch": 1}, path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # a crash while the new file is being written

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1  # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no leftovers


def _tiny(data_root, out, name, *extra):
    return [
        "train", str(RECIPE), f"output={out}", f"name={name}", f"data.root={data_root}", "data.train_limit=256",
        "data.test_limit=128", "train.epochs=2", "train.batch_size=64", "report.latency_repeats=1",
        "prune.recalibrate_bn=2", *extra, "--quiet",
    ]  # fmt: skip


@pytest.mark.slow
def test_resume_from_a_malicious_or_wrong_checkpoint_is_a_clean_error(tmp_path, data_root, capsys):
    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"format": "softprune-checkpoint-1", "x": Exploit(marker)}, run / "checkpoint.pt")
    assert main([*_tiny(data_root, tmp_path, "run"), "--resume"]) == 2
    assert "could run code" in capsys.readouterr().err and not marker.exists()
    # a checkpoint of another architecture
    assert main(_tiny(data_root, tmp_path, "a")) == 0
    os.replace(tmp_path / "a" / "checkpoint.pt", run / "checkpoint.pt")
    assert main([*_tiny(data_root, tmp_path, "run", "model.name=lenet5"), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("softprune: error:") and "different 'model' section" in err and "\n" not in err


@pytest.mark.slow
def test_bf16_autocast_and_channels_last_keep_masks_exact(tmp_path, data_root):
    amp = ("train.amp=bf16", "train.channels_last=true", "prune.residual=independent")  # unit i is filter i
    assert main(_tiny(data_root, tmp_path, "amp", *amp)) == 0
    summary = json.loads((tmp_path / "amp" / "summary.json").read_text())
    eq = summary["equivalence"]
    assert eq["max_abs_diff"] <= 1e-5 * eq["output_scale"]
    pruner = load_checkpoint(tmp_path / "amp" / "checkpoint.pt")["pruner"]
    weights = load_file(str(tmp_path / "amp" / "model.safetensors"))
    stem = next(g for g in pruner["groups"] if g["name"].startswith("conv1"))
    hard = stem["hard"]
    assert hard.any() and torch.count_nonzero(weights["conv1.weight"][hard]) == 0
    assert (
        torch.count_nonzero(weights["bn1.weight"][hard]) == 0
        and weights["conv1.weight"].dtype == torch.float32
    )


# -- property tests: every failure is a clean error --------------------------------------------

SECTIONS = {f.name: f for f in __import__("dataclasses").fields(RunConfig)}
keys = st.sampled_from(
    [
        "name",
        "seed",
        "output",
        "data",
        "model",
        "train",
        "prune",
        "checkpoint",
        "report",
        "trian",
        "prune.rate",
        "x",
    ]
)
leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 500), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.integers(-3, 300), max_size=4),
)  # fmt: skip
inner_keys = st.sampled_from(
    ["method", "rate", "criterion", "residual", "epochs", "lr", "batch_size", "milestones", "name", "root",
     "train_limit", "every_epochs", "every_iterations", "decay", "hardness", "amp", "device", "mask_scope", "bogus"]
)  # fmt: skip
section = st.dictionaries(inner_keys, leaf, max_size=5)
configs = st.dictionaries(keys, st.one_of(leaf, section), max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs)
def test_random_configs_either_validate_or_fail_cleanly(data):
    try:
        config = config_from_dict(data)
    except SoftpruneError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert isinstance(config, RunConfig) and 0.0 <= config.prune.rate < 1.0 and config.train.epochs >= 1


tokens = st.one_of(
    st.sampled_from(["train", "profile", "report", "demo", "--resume", "--quiet", "--debug", "--json", "-x"]),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["prune.rate", "train.epochs", "prune.method", "a.b", "x"]),
              st.one_of(st.integers(-2, 9), st.text(max_size=6), st.sampled_from(["[1,2", "{a: 1}", "null"]))),
    st.text(max_size=10),
)  # fmt: skip


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(tokens, max_size=6))
def test_random_command_lines_fail_cleanly(monkeypatch, capsys, argv):
    import softprune.train.engine as engine

    def no_training(*args, **kwargs):  # a valid command line would start a real run: stop it here
        raise SoftpruneError("stopped before training")

    monkeypatch.setattr(engine, "train", no_training)
    monkeypatch.setattr(
        "softprune.cli.load_for_profile", lambda *a: (_ for _ in ()).throw(SoftpruneError("stop"))
    )
    monkeypatch.setattr(
        "softprune.report.make_report", lambda *a, **k: (_ for _ in ()).throw(SoftpruneError("stop"))
    )
    monkeypatch.setattr("softprune.cli.cmd_demo", lambda args: (_ for _ in ()).throw(SoftpruneError("stop")))
    argv = [a for a in argv if a != "--debug"]  # --debug re-raises errors on purpose
    capsys.readouterr()  # one captured output per example
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors: exit 2, a usage line and one error line
        assert exc.code in (0, 2)
        return
    assert code in (0, 1, 2)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code:
        assert err.startswith("softprune: ") and err.count("\n") == 1


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_random_yaml_files_fail_cleanly(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except SoftpruneError as exc:
        assert "\n" not in str(exc)


def test_zip_but_not_a_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"not a pickle")
    with pytest.raises(SoftpruneError, match="c.pt"):
        load_checkpoint(path)
    assert yaml  # (imported for the YAML property test)


@pytest.mark.slow
def test_initial_step_and_finetuning_tail(tmp_path, data_root):
    """prune.initial_step: a step before the first epoch (GHFP's code); prune.finetune_epochs: the last
    epochs train with every selected unit hard and no pruning step."""
    extra = ("train.epochs=3", "prune.method=sfp", "prune.initial_step=true", "prune.finetune_epochs=1",
             "prune.min_steps=1")  # fmt: skip
    assert main(_tiny(data_root, tmp_path, "tail", *extra)) == 0
    rows = [json.loads(line) for line in (tmp_path / "tail" / "metrics.jsonl").read_text().splitlines()]
    state = load_checkpoint(tmp_path / "tail" / "checkpoint.pt")["pruner"]
    assert state["total_steps"] == 3 and len(state["history"]) == 3  # before epoch 1, after epochs 1 and 2
    assert [r["step"] for r in rows] == [2, 3, 3]
    assert rows[0]["soft"] > 0 and rows[0]["hard"] == 0  # SFP: soft while it prunes
    # the last step (after epoch 2) makes every selected unit hard: epoch 3 fine-tunes the pruned model
    assert rows[1]["soft"] == rows[2]["soft"] == 0 and rows[1]["hard"] == rows[2]["hard"] == rows[0]["soft"]
    assert json.loads((tmp_path / "tail" / "summary.json").read_text())["compact"]["macs"] == rows[2]["macs"]


@pytest.mark.slow
def test_a_short_run_spreads_its_pruning_steps_over_the_iterations(tmp_path, data_root):
    """prune.min_steps: 2 epochs of 4 iterations give 2 epoch-end steps; min_steps=3 asks for more, so a
    step comes every 8 // 3 = 2 optimizer steps: 4 steps, 2 in each epoch (with no step-free tail)."""
    extra = ("prune.method=ghfp", "prune.min_steps=3", "prune.finetune_epochs=0")
    assert main(_tiny(data_root, tmp_path, "spread", *extra)) == 0
    rows = [json.loads(line) for line in (tmp_path / "spread" / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "spread" / "summary.json").read_text())
    assert [r["step"] for r in rows] == [2, 4]
    assert summary["pruning_steps"] == 4 and summary["pruning_interval"] == 2
    assert rows[-1]["hardness"] == 1.0  # GHFP's ramp ends hard at the last of the 4 steps
    # each epoch's row counts the soft units that came back at every step of that epoch
    steps = load_checkpoint(tmp_path / "spread" / "checkpoint.pt")["pruner"]["history"]
    assert [r["steps"] for r in rows] == [2, 2]
    assert [r["revived"] for r in rows] == [steps[0]["revived"] + steps[1]["revived"],
                                            steps[2]["revived"] + steps[3]["revived"]]  # fmt: skip


@pytest.mark.parametrize(
    "settings, epochs, per_epoch, expected",
    [
        ({}, 6, 79, 19),  # the methods benchmark: 474 iterations // 24 steps
        ({}, 24, 79, None),  # enough epochs: one step at the end of each
        ({"min_steps": 1}, 6, 79, None),  # the papers' protocol
        ({"every_iterations": 50}, 6, 79, 50),  # an explicit interval wins
        ({"every_epochs": 2}, 6, 79, None),  # an explicit epoch interval too
        ({}, 2, 4, 1),  # fewer iterations than min_steps: a step after each one
        ({"method": "hfp"}, 6, 79, None),  # HFP's one decision stays after the first epoch
        ({"method": "sfp"}, 6, 79, None),  # a constant rate: more steps would only prune earlier
    ],
)
def test_pruning_interval(settings, epochs, per_epoch, expected):
    assert pruning_interval(PruneConfig(**settings), epochs, per_epoch) == expected
