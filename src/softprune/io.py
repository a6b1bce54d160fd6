"""Portable pruned models: weights in safetensors, the architecture change as data.

``save(model, path)`` writes the model's tensors with safetensors and, in the file's metadata, a JSON
*plan*: for every channel group, its name, size and the pruned unit indices, plus what is needed to
trace the original model again (example input shapes, residual mode, ignored modules) and, for
softprune's own models, the ``create_model`` arguments. ``load(path, model_factory)`` builds the
original model with the user's constructor, replays the same compaction, and loads the weights.
Nothing is unpickled at any point.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import SoftpruneError

FORMAT = "softprune-1"
PLAN_KEY = "softprune"


def make_plan(
    pruner: Any, model_spec: dict | None = None, removed_only: bool = False, removed: list | None = None
) -> dict:
    """The architecture change made by ``pruner.compact()``, as plain data; with ``removed_only``, the
    change already made to ``pruner.model`` by compact_hard() (units removed during training);
    ``removed`` (bool per unit and group) when compact() removes other units than the pruned ones
    (the filter scope's carriers stay)."""
    removed = removed if removed is not None else [m.pruned for m in pruner.masks]
    return {
        "format": FORMAT,
        "residual": pruner.residual,
        "ignore": list(getattr(pruner, "ignore", [])),
        "inputs": [
            {"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}
            for x in pruner.example_inputs
            if isinstance(x, torch.Tensor)
        ],
        # in the original model's terms, also after compaction during training (compact_hard)
        "groups": [
            {
                "name": g.name,
                "size": size,
                "pruned": sorted(set(gone.tolist()) | (set() if removed_only else set(origin[r].tolist()))),
            }
            for g, r, size, origin, gone in zip(
                pruner.prunable, removed, pruner.original_sizes, pruner.origins, pruner._gone
            )
        ],
        "model": model_spec or pruner.model_spec,
        "base": getattr(pruner, "base_plan", None),
    }


def save(model: nn.Module, path: str | Path, plan: dict | None = None) -> Path:
    """Write ``model``'s state to ``path`` (safetensors) with its pruning plan as metadata.

    A model returned by ``Pruner.compact()`` carries its plan; a dense model is saved with an empty
    one. The file is written next to its destination and renamed, so a crash never leaves half a file.
    """
    path = Path(path)
    plan = plan if plan is not None else getattr(model, "softprune_plan", None)
    if plan is None:
        plan = {"format": FORMAT, "groups": [], "model": getattr(model, "softprune_spec", None)}
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tensors = _unshare(tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={PLAN_KEY: json.dumps(plan)})
    tmp.replace(path)
    return path


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied weights); store each once as its own copy."""
    seen: dict[tuple, str] = {}
    out = {}
    for key, t in tensors.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        out[key] = t.clone() if ident in seen else t
        seen.setdefault(ident, key)
    return out


def read_plan(path: str | Path, required: bool = True) -> dict | None:
    """The softprune plan in a safetensors file's metadata; a file without one is an error, or, when
    not ``required``, None (a plain safetensors state_dict)."""
    path = Path(path)
    if not path.is_file():
        raise SoftpruneError(f"model file {str(path)!r} not found")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise SoftpruneError(f"{str(path)!r} is not a readable safetensors file ({exc})") from None
    if PLAN_KEY not in meta:
        if not required:
            return None
        raise SoftpruneError(
            f"{str(path)!r} is a safetensors file without a softprune plan; load it with safetensors"
        )
    try:
        plan = json.loads(meta[PLAN_KEY])
    except json.JSONDecodeError:
        raise SoftpruneError(f"{str(path)!r} has a corrupt softprune plan") from None
    if plan.get("format") != FORMAT:
        raise SoftpruneError(
            f"{str(path)!r} has plan format {plan.get('format')!r}; this softprune reads {FORMAT}"
        )
    return plan


def load(path: str | Path, model_factory: Callable[[], nn.Module], map_location: str = "cpu") -> nn.Module:
    """Rebuild a saved (pruned) model: ``model_factory()`` gives the original, unpruned architecture.

    ``softprune.load`` (softprune.models.load) supplies the factory for models softprune can build
    from the plan's record; this module builds none itself.
    """
    plan = read_plan(path)
    model = model_factory()
    if not isinstance(model, nn.Module):
        raise SoftpruneError(f"model_factory must return a torch.nn.Module, got {type(model).__name__}")
    try:
        state = load_file(str(path), device=map_location)
    except (SafetensorError, OSError) as exc:
        raise SoftpruneError(f"cannot read the weights of {str(path)!r}: {exc}") from None
    spec = getattr(model, "softprune_spec", None)
    model = _replay(model, plan, str(path))
    if spec is not None:
        model.softprune_spec = spec
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise SoftpruneError(
            f"the weights in {str(path)!r} do not fit the rebuilt model: {first[1].strip() if len(first) > 1 else first[0]}"
        ) from None
    return model.to(map_location)


def _replay(model: nn.Module, plan: dict, path: str) -> nn.Module:
    """The compaction a plan records, applied to the original model; a plan made by pruning an
    already pruned model (``base``) replays that first pruning before its own."""
    from .compact import compact_model
    from .graph import analyze, build_groups, selector

    if plan.get("base"):
        model = _replay(model, plan["base"], path)
    if not plan.get("groups"):
        return model
    dtypes = {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "float64": torch.float64,
    }
    inputs = tuple(
        torch.zeros(spec["shape"], dtype=dtypes.get(spec["dtype"], torch.float32)) for spec in plan["inputs"]
    )
    analysis = analyze(
        model, inputs, residual=plan.get("residual", "coupled"), leaf_modules=plan.get("ignore", [])
    )
    groups = build_groups(analysis, selector(), plan.get("ignore", []))
    by_name = {g.name: g for g in groups}
    pruned = torch.zeros(int(analysis.ids.label.max()) + 1, dtype=torch.bool)
    for saved in plan["groups"]:
        group = by_name.get(saved["name"])
        if group is None or group.size != saved["size"]:
            raise SoftpruneError(
                f"{path!r} was pruned from a different architecture: group {saved['name']!r} "
                f"({saved['size']} channels) is not in the model the factory built"
            )
        units = torch.tensor(saved["pruned"], dtype=torch.long)
        if units.numel() and (units.min() < 0 or units.max() >= group.size):
            raise SoftpruneError(f"{path!r} has a corrupt plan: unit index out of range in {saved['name']!r}")
        pruned[group.classes[units]] = True
    model = compact_model(model, analysis, pruned)
    model.softprune_plan = plan
    return model


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    dynamic_batch: bool = True,
    check: bool = True,
    tolerance: float = 1e-4,
) -> dict:
    """Export ``model`` to ONNX (torch.onnx's dynamo exporter) and, with ``check``, run the file in
    onnxruntime and compare its outputs with PyTorch's on ``example_inputs``.

    Needs the optional extra: ``pip install softprune[onnx]`` (onnx, onnxscript, onnxruntime).
    Returns {"path", "max_abs_diff", "output_scale"} (the differences are None without ``check``).
    """
    import logging as _logging
    import warnings

    try:
        import onnxscript  # noqa: F401  (the exporter needs it)
    except ImportError:
        raise SoftpruneError("ONNX export needs the onnx extra: pip install 'softprune[onnx]'") from None
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    dynamic = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic = tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet = _logging.getLogger("torch.onnx")
        level = quiet.level
        quiet.setLevel(_logging.ERROR)
        try:
            program = torch.onnx.export(model, inputs, dynamo=True, dynamic_shapes=dynamic, verbose=False)
        except Exception as exc:  # the exporter raises many types; one line is what the user needs
            raise SoftpruneError(
                f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            ) from None
        finally:
            quiet.setLevel(level)
    program.save(str(path))
    result: dict = {"path": str(path), "max_abs_diff": None, "output_scale": None}
    if not check:
        return result
    try:
        import onnxruntime as ort
    except ImportError:
        raise SoftpruneError(
            "checking the ONNX file needs onnxruntime: pip install 'softprune[onnx]'"
        ) from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.detach().cpu().numpy() for i, x in zip(session.get_inputs(), inputs)}
    got = session.run(None, feeds)
    with torch.no_grad():
        ref = model(*inputs)
    ref = [ref] if isinstance(ref, torch.Tensor) else [r for r in ref if isinstance(r, torch.Tensor)]
    diff = max(float(abs(r.detach().cpu().numpy() - g).max()) for r, g in zip(ref, got))
    scale = max(float(r.abs().max()) for r in ref)
    result.update(max_abs_diff=diff, output_scale=scale)
    if diff > tolerance * max(scale, 1.0):
        raise SoftpruneError(f"onnxruntime's outputs differ from PyTorch's by {diff:.3g} (scale {scale:.3g})")
    return result
