"""A user's own model, weights and images: factories, checkpoints, image folders, published weights."""

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import softprune
from softprune.cli import main
from softprune.data import BatchLoader, load_dataset
from softprune.data.fixtures import write_image_folder
from softprune.errors import SoftpruneError
from softprune.models import create_model, read_state_dict
from softprune.train.engine import evaluate

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "finetune_pretrained.yaml"
FACTORY = textwrap.dedent(
    """
    from torch import nn

    def tiny(num_classes=10):
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
        )

    def not_a_model(num_classes=10):
        return [num_classes]
    """
)


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    """A factory module on the Python path, as a user's project would have it."""
    (tmp_path / "usernets.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    yield "usernets:tiny"
    sys.modules.pop("usernets", None)


@pytest.fixture
def images(tmp_path):
    return write_image_folder(tmp_path / "images", classes=3, per_class={"train": 10, "val": 5})


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("name: run\n")
    return str(path)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_factory_checkpoint_and_image_folder_end_to_end(tmp_path, user_code, images, capsys):
    torch.manual_seed(3)
    trained = create_model(user_code, num_classes=3, input_size=32)
    # a training script's checkpoint: nested, saved from a DataParallel wrapper
    state = {"epoch": 7, "state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}
    torch.save(state, tmp_path / "trained.pth")
    rc = main([
        "train", str(RECIPE), f"model.name={user_code}", f"model.checkpoint={tmp_path / 'trained.pth'}",
        f"data.root={images}", "data.image_size=32", "data.workers=0", "train.epochs=3",
        "train.batch_size=10", "prune.finetune_epochs=1", "prune.recalibrate_bn=1", f"output={tmp_path}",
        "name=run", "--quiet",
    ])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # the starting accuracy is the checkpoint's, on the val images with the evaluation transforms
    val = load_dataset("imagefolder", images, "test", image_size=32)
    _, start_acc = evaluate(trained, BatchLoader(val, 8, shuffle=False, augment=False), torch.device("cpu"))
    assert summary["start"]["test_acc"] == pytest.approx(start_acc)
    assert summary["model"] == user_code and summary["data"] == "imagefolder" and summary["method"] == "ghfp"
    # GHFP at 30% of each layer, every selected filter hard after its ramps, removed in the compact model
    assert [(g["hard"], g["soft"]) for g in summary["groups"] if "hard" in g] == [(4, 0), (9, 0)]
    assert [layer["compact"] for layer in summary["layers"]] == [12, 23, 3]
    # the compact model is the masked one: same accuracy, and its file has the reported size
    small = softprune.load(tmp_path / "run" / "compact.safetensors", lambda: create_model(user_code, 3))
    assert summary["compact"]["test_acc"] == summary["test_acc_masked"]
    assert summary["compact"]["params"] == sum(p.numel() for p in small.parameters())
    assert summary["compact"]["params"] < summary["dense"]["params"]
    assert summary["equivalence"]["max_abs_diff"] < 1e-5
    # the run resumes (one more epoch) after the starting weights are gone: checkpoint.pt holds them all
    (tmp_path / "trained.pth").unlink()
    (tmp_path / "run" / "summary.json").unlink()
    rc = main([
        "train", str(tmp_path / "run" / "config.yaml"), "train.epochs=4", "--resume", "--quiet",
    ])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    resumed = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(resumed["history_test_acc"]) == 4 and resumed["start"] == summary["start"]


def test_checkpoint_unwrapping_and_a_new_head(tmp_path, user_code):
    torch.manual_seed(0)
    source = create_model(user_code, num_classes=5, input_size=16)
    lightning_like = {"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}, "epoch": 1}
    torch.save(lightning_like, tmp_path / "a.ckpt")
    softprune.save(source, tmp_path / "b.safetensors")
    for path in ("a.ckpt", "b.safetensors"):
        same = create_model(user_code, num_classes=5, checkpoint=tmp_path / path)
        assert all(
            torch.equal(a, b) for a, b in zip(same.state_dict().values(), source.state_dict().values())
        )
        assert same.softprune_reset_head is None
    # trained on 5 classes, fine-tuned on 3: the backbone comes from the file, the head starts fresh
    three = create_model(user_code, num_classes=3, checkpoint=tmp_path / "a.ckpt")
    assert three.softprune_reset_head == "8"
    assert torch.equal(three[0].weight, source[0].weight) and three[8].out_features == 3


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p, m: None, "not found"),
        (lambda p, m: p.write_bytes(b"\x00garbage" * 20), "corrupt"),
        (lambda p, m: (torch.save(m.state_dict(), p), p.write_bytes(p.read_bytes()[:200])), "truncated"),
        (lambda p, m: torch.save(m, p), "could run code"),
        (
            lambda p, m: torch.save({"0.weight": torch.zeros(8, 3, 3, 3)}, p),
            "'0.weight' has shape (8, 3, 3, 3)",
        ),
        (lambda p, m: torch.save({"fc.weight": torch.zeros(2, 2)}, p), "first 'fc.weight'"),
        (lambda p, m: torch.save({"epoch": 3}, p), "holds no tensors"),
    ],
    ids=[
        "missing",
        "garbage",
        "truncated",
        "pickled-model",
        "wrong-shape",
        "other-architecture",
        "no-tensors",
    ],
)
def test_bad_checkpoints_are_one_line_errors(tmp_path, config, images, user_code, capsys, make, message):
    path = tmp_path / "start.pt"
    make(path, create_model(user_code, num_classes=3))
    with pytest.raises(SoftpruneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        create_model(user_code, num_classes=3, checkpoint=path)
    rc = main([
        "train", config, f"model.name={user_code}", f"model.checkpoint={path}", "data.name=imagefolder",
        f"data.root={images}", f"output={tmp_path}",
    ])  # fmt: skip
    assert rc == 2 and message in one_line_error(capsys)


def test_bad_factories_are_one_line_errors(user_code):
    for name, message in (
        ("usernets:missing", "has no function 'missing'"),
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
        ("usernets:not_a_model", "returned list, not a torch.nn.Module"),
    ):
        with pytest.raises(SoftpruneError, match=message):
            create_model(name)


def test_pruning_a_pruned_model_again_saves_both_prunings(tmp_path, user_code):
    torch.manual_seed(0)
    model = create_model(user_code, num_classes=3, input_size=16)
    first = softprune.Pruner(model, "hfp", 0.5, 1)
    first.step()
    softprune.save(first.compact(), tmp_path / "once.safetensors")
    start = create_model(user_code, num_classes=3, input_size=16, checkpoint=tmp_path / "once.safetensors")
    assert start[0].out_channels == 8
    second = softprune.Pruner(start, "hfp", 0.5, 1)
    second.step()
    twice = second.compact()
    softprune.save(twice, tmp_path / "twice.safetensors")
    loaded = softprune.load(tmp_path / "twice.safetensors", lambda: create_model(user_code, num_classes=3))
    assert [loaded[0].out_channels, loaded[3].out_channels] == [4, 8]
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(loaded.eval()(x), twice.eval()(x))
    # a file names the factory it was built by; softprune imports it only when the user names it too
    with pytest.raises(SoftpruneError, match="pass model_factory="):
        softprune.load(tmp_path / "twice.safetensors")


def test_image_folder_resumes_mid_epoch_exactly_with_any_number_of_workers(images):
    train = load_dataset("imagefolder", images, "train", image_size=24)
    assert (train.num_classes, len(train), train.channels, train.image_size) == (3, 30, 3, 24)
    batches = {}
    for workers in (0, 2):
        loader = BatchLoader(train, 4, shuffle=True, augment=True, seed=5, workers=workers, cutout=6)
        loader.set_epoch(2)
        batches[workers] = list(loader.iterate(0)), list(loader.iterate(3))
    whole, resumed = batches[0]
    assert len(whole) == 8 and whole[0][0].shape == (4, 3, 24, 24)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(whole[3:], resumed))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(whole, batches[2][0]))
    loader.set_epoch(3)  # another epoch, other crops
    assert not torch.equal(next(iter(loader))[0], whole[0][0])
    limited = load_dataset("imagefolder", images, "train", limit=9)
    assert sorted({label for _, label in (limited[(i, -1)] for i in range(9))}) == [0, 1, 2]


def test_image_folder_problems_are_one_line_errors(tmp_path, config, images, capsys):
    (images / "train" / "class_1" / "broken.png").write_bytes(b"not an image")
    train = load_dataset("imagefolder", images, "train", image_size=24)
    loader = BatchLoader(train, 4, shuffle=False, augment=False, workers=2)
    with pytest.raises(SoftpruneError, match=r"^cannot read image .*broken\.png"):
        list(loader)
    (images / "train" / "class_1" / "broken.png").unlink()
    (images / "val" / "class_9").mkdir()
    with pytest.raises(SoftpruneError, match="class_9"):
        load_dataset("imagefolder", images, "test")
    with pytest.raises(SoftpruneError, match="no train split"):
        load_dataset("imagefolder", tmp_path / "nowhere", "train")
    (images / "val" / "class_9" / "x.png").write_bytes((images / "val" / "class_0" / "0.png").read_bytes())
    rc = main(
        ["train", config, "data.name=imagefolder", f"data.root={images}", f"output={tmp_path}", "--quiet"]
    )
    assert rc == 2 and "must hold the same class folders" in one_line_error(capsys)


def test_export_writes_onnx_that_matches(tmp_path, user_code, capsys):
    pytest.importorskip("onnxruntime")
    model = create_model(user_code, num_classes=3, input_size=16)
    pruner = softprune.Pruner(model, "hfp", 0.5, 1)
    pruner.step()
    softprune.save(pruner.compact(), tmp_path / "small.safetensors")
    assert main(["export", str(tmp_path / "small.safetensors")]) == 2
    assert "--model usernets:tiny" in one_line_error(capsys)
    rc = main(
        [
            "export",
            str(tmp_path / "small.safetensors"),
            "--model",
            user_code,
            "--onnx",
            str(tmp_path / "s.onnx"),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    diff = float(out.split("max |difference| ")[1].split()[0])
    assert diff < 1e-5 and (tmp_path / "s.onnx").stat().st_size > 1000


def test_torchvision_weights_start_the_model_and_a_new_head(monkeypatch):
    from torchvision.models import ResNet18_Weights

    torch.manual_seed(1)
    published = create_model("resnet18", num_classes=1000).state_dict()
    monkeypatch.setattr(ResNet18_Weights, "get_state_dict", lambda self, progress=True: published)
    model = create_model("resnet18", num_classes=10, weights="IMAGENET1K_V1")
    assert torch.equal(model.conv1.weight, published["conv1.weight"])
    assert model.fc.out_features == 10
    with pytest.raises(SoftpruneError, match="IMAGENET1K_V1, DEFAULT"):
        create_model("resnet18", weights="IMAGENET1K_V9")

    def offline(self, progress=True):
        raise OSError("<urlopen error [Errno 101] Network is unreachable>")

    monkeypatch.setattr(ResNet18_Weights, "get_state_dict", offline)
    with pytest.raises(SoftpruneError, match="without a network.*model.checkpoint"):
        create_model("resnet18", weights="DEFAULT")


def test_timm_models_by_name():
    pytest.importorskip("timm")
    model = create_model("timm:resnet10t", num_classes=4, in_channels=1, input_size=64)
    assert model.example_input_shape == (1, 1, 64, 64)
    x = torch.randn(2, 1, 64, 64)
    assert model(x).shape == (2, 4)
    pruner = softprune.Pruner(model, "hfp", 0.3, 1)
    pruner.step()
    small = pruner.compact()
    assert pruner.last_verification["max_abs_diff"] < 1e-4
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    with pytest.raises(SoftpruneError, match="timm has no model"):
        create_model("timm:resnet_nonexistent_99")


def test_weights_file_keys_are_unwrapped(tmp_path):
    net = nn.Linear(3, 2)
    torch.save({"model": {"_orig_mod." + k: v for k, v in net.state_dict().items()}}, tmp_path / "w.pt")
    assert sorted(read_state_dict(tmp_path / "w.pt")) == ["bias", "weight"]
