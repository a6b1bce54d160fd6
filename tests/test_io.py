"""Portable pruned models: safetensors + the architecture change as data, rebuilt without pickle."""

import json
import pickle
import struct

import pytest
import torch
import torchvision

import softprune
from softprune.check import max_difference
from softprune.errors import SoftpruneError


def _pruned(factory, x, residual):
    torch.manual_seed(0)
    model = factory()
    pruner = softprune.Pruner(model, "ghfp", 0.4, 2, example_inputs=x, residual=residual, layers="all")
    pruner.step()
    pruner.step()
    return model, pruner.compact()


CASES = [
    ("resnet56", lambda: softprune.create_model("resnet56"), (1, 3, 32, 32)),
    ("mobilenet_v3_small", lambda: torchvision.models.mobilenet_v3_small(num_classes=5), (1, 3, 64, 64)),
    ("shufflenet_v2_x0_5", lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=5), (1, 3, 64, 64)),
]


@pytest.mark.parametrize("residual", ["coupled", "independent"])
@pytest.mark.parametrize("name,factory,shape", CASES, ids=[c[0] for c in CASES])
def test_round_trip_gives_the_same_outputs_without_unpickling(
    tmp_path, monkeypatch, name, factory, shape, residual
):
    x = torch.randn(*shape)
    _, small = _pruned(factory, x, residual)
    path = softprune.save(small, tmp_path / "small.safetensors")

    def refuse(*args, **kwargs):
        raise AssertionError("softprune.load must not unpickle anything")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    back = softprune.load(path, factory)
    monkeypatch.undo()
    batch = torch.randn(3, *shape[1:])
    diff, scale = max_difference(small, back, (batch,))
    assert diff == 0.0 and scale > 0
    assert type(back).__name__ == type(small).__name__
    assert sum(p.numel() for p in back.parameters()) == sum(p.numel() for p in small.parameters())


def test_file_is_plain_safetensors_with_the_plan_as_json(tmp_path):
    x = torch.randn(1, 3, 32, 32)
    _, small = _pruned(lambda: softprune.create_model("resnet20"), x, "coupled")
    path = softprune.save(small, tmp_path / "m.safetensors")
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    plan = json.loads(header["__metadata__"]["softprune"])
    assert plan["format"] == "softprune-1" and plan["model"]["name"] == "resnet20"
    assert {g["name"] for g in plan["groups"]} and all(len(g["pruned"]) < g["size"] for g in plan["groups"])
    kept = {g["name"]: g["size"] - len(g["pruned"]) for g in plan["groups"]}
    assert kept["layer1.0.conv1"] == small.layer1[0].conv1.out_channels
    # every tensor entry is plain data: dtype, shape and byte offsets
    assert all(set(v) == {"dtype", "shape", "data_offsets"} for k, v in header.items() if k != "__metadata__")
    # softprune's own models need no factory: the plan names the constructor
    back = softprune.load(path)
    assert max_difference(small, back, (x,))[0] == 0.0


def test_wrong_factory_is_a_clear_error(tmp_path):
    x = torch.randn(1, 3, 32, 32)
    _, small = _pruned(lambda: softprune.create_model("resnet20"), x, "coupled")
    path = softprune.save(small, tmp_path / "m.safetensors")
    with pytest.raises(SoftpruneError, match="pruned from a different architecture"):
        softprune.load(path, lambda: softprune.create_model("resnet32"))


def test_corrupt_and_truncated_files(tmp_path):
    x = torch.randn(1, 3, 32, 32)
    _, small = _pruned(lambda: softprune.create_model("resnet20"), x, "coupled")
    path = softprune.save(small, tmp_path / "m.safetensors")
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(SoftpruneError, match="t.safetensors"):
        softprune.load(truncated)
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(SoftpruneError, match="not a readable safetensors file"):
        softprune.load(garbage)
    with pytest.raises(SoftpruneError, match="not found"):
        softprune.load(tmp_path / "missing.safetensors")


def test_dense_models_save_and_load_too(tmp_path):
    model = softprune.create_model("lenet5", in_channels=1)
    path = softprune.save(model, tmp_path / "dense.safetensors")
    back = softprune.load(path)
    x = torch.randn(2, 1, 28, 28)
    assert max_difference(model, back, (x,))[0] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("residual", ["coupled", "independent"])
def test_onnx_export_matches_pytorch(tmp_path, residual):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    x = torch.randn(2, 3, 32, 32)
    _, small = _pruned(lambda: softprune.create_model("resnet20"), x, residual)
    result = softprune.export_onnx(small, x, tmp_path / "small.onnx")
    assert result["max_abs_diff"] <= 1e-4 * max(result["output_scale"], 1.0)
    assert (tmp_path / "small.onnx").stat().st_size > 10_000
    # the batch dimension stays dynamic
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "small.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: torch.randn(5, 3, 32, 32).numpy()})[0]
    assert out.shape == (5, 10)
